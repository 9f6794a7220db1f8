"""The terminal's live view of a sweep stays short and readable with 20 trials."""

from __future__ import annotations

from dataclasses import dataclass, field

from artefact.tune.progress import ProgressLog


@dataclass(eq=False)
class FakeTrial:
    """The attributes of a Tune trial that the progress view reads."""

    trial_id: str
    config: dict = field(default_factory=dict)
    status: str = "PENDING"


def test_twenty_trials_give_short_lines_and_exact_counts() -> None:
    lines: list[str] = []
    view = ProgressLog(total=20, epochs=3, metric="val/miou_fine", log=lines.append)
    trials: list[FakeTrial] = []
    for number in range(20):
        trial = FakeTrial(f"{number:08x}", {"encoder": "tu-convnext_tiny", "batch_size": 16, "lr": 1e-3 * (number + 1)})
        trials.append(trial)
        trial.status = "RUNNING"
        view.on_trial_start(0, trials, trial)
        for epoch in (1, 2, 3):
            view.on_trial_result(0, trials, trial, {"epoch": epoch, "val/miou_fine": 0.01 * number + 0.001 * epoch})
        if number == 7:
            view.on_trial_error(0, trials, trial)
            trial.status = "ERROR"
        else:
            view.on_trial_complete(0, trials, trial)
            trial.status = "TERMINATED"

    assert len(lines) == 20 * 6  # start, 3 epochs, end, and one status line per trial
    assert max(len(line) for line in lines) <= 110, max(lines, key=len)
    status = [line.strip() for line in lines if line.strip().startswith("trials:")]
    assert len(status) == 20
    assert status[0].startswith("trials: 1/20 done, 0 running, 19 to come; best 0.0030 by 00000000")
    assert "8/20 done (1 failed)" in status[7]
    assert (
        status[-1] == "trials: 20/20 done (1 failed), 0 running, 0 to come; best 0.1930 by 00000013 (tu-convnext_tiny)"
    )
    assert lines[0].startswith("[  0:00] start  00000000  tu-convnext_tiny bs=16 lr=1.0e-03")
    assert sum("FAILED 00000007" in line for line in lines) == 1

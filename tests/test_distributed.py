"""A 2-worker DDP trial (gloo on CPU) against a 1-worker run on the same data, on a cluster
set up as a sweep's (``artefact.tune.ray_env``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from artefact.data.dataset import load_split
from artefact.taxonomy import IGNORE_INDEX

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
from artefact.tune.ray_env import prepare_local_cluster

prepare_local_cluster(Path(sys.argv[3]))
import ray
from ray._private.state import actors  # from GCS: this cluster has no dashboard for ray.util.state
from artefact.config import Config
from artefact.train.checkpoint import VAL_IMAGES_FILE
from artefact.tune.ddp import build_trainer
from artefact.tune.trial import TrialContext

ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
base = Config().replace(
    data={"resolution": 64, "crops_per_image": 4},
    model={"encoder": "tu-test_convnext", "heads": ["binary", "coarse", "fine"]},
    train={"epochs": 1, "lr": 1e-6, "seed": 3},
)
out = {}
for workers, batch in ((1, 8), (2, 4)):
    cfg = base.replace(train={"batch_size": batch}, resources={"workers_per_trial": workers, "cpus_per_worker": 0.95})
    result = build_trainer(cfg, TrialContext(Path(sys.argv[1]), Path(sys.argv[2])), f"ddp-{workers}").fit()
    out[workers] = result.metrics
    counts = np.load(Path(result.checkpoint.path) / VAL_IMAGES_FILE)  # fine counts per validation image
    out[f"labelled-{workers}"] = counts.sum(axis=(1, 2)).tolist()
out["actor_classes"] = sorted({actor["ActorClassName"] for actor in actors().values()})  # dead ones too
print("RESULT " + json.dumps(out))
"""


def test_two_worker_ddp_matches_one_worker(tmp_path: Path, synthetic_cache: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(synthetic_cache), str(tmp_path / "storage"), str(tmp_path / "token")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    metrics = json.loads(line.removeprefix("RESULT "))
    one, two = metrics["1"], metrics["2"]
    assert one["perf/workers"] == 1 and two["perf/workers"] == 2
    # Same effective batch (1 x 8 = 2 x 4), same init (DDP broadcasts rank 0), near-zero lr:
    # the only differences are the random crops and BatchNorm statistics.
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=0.03)
    assert two["train/loss"] == pytest.approx(one["train/loss"], rel=0.05)
    for head in ("fine", "coarse", "binary"):
        assert two[f"val/miou_{head}"] == pytest.approx(one[f"val/miou_{head}"], abs=0.03)
    # Each rank validated its shard, and the summed counts hold every image once, in its place.
    labelled = [
        int((np.load(synthetic_cache / "masks" / f"{row['id']}.npy") != IGNORE_INDEX).sum())
        for row in load_split(synthetic_cache, "val")
    ]
    assert metrics["labelled-2"] == metrics["labelled-1"] == labelled
    # Train's own helpers ran, but not its preemption watcher, which these clusters have no use for.
    assert "TrainController" in metrics["actor_classes"], metrics["actor_classes"]
    assert "PreemptionWatcher" not in metrics["actor_classes"], metrics["actor_classes"]

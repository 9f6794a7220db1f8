"""Deliberate training faults, for the reliability tests and for checking a new cluster.

``ARTEFACT_INJECT_FAULT`` holds one or more plans separated by ``;``, each
``<kind>@<epoch>[:<key>=<value>,...]``:

- ``nan``: the model's outputs, and so the loss, of the epoch's first step become NaN;
- ``oom``: the epoch's first forward pass raises ``torch.OutOfMemoryError``, as CUDA does.

A plan applies to every trial whose config matches all its ``key=value`` pairs (keys:
``encoder``, ``seed``, ``batch_size``). Unset, the default, nothing is injected. Ray's
workers inherit the variable from the process that starts the local cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from artefact.config import Config
from artefact.errors import UserError

FAULT_ENV = "ARTEFACT_INJECT_FAULT"
KINDS = ("nan", "oom")
MATCH_KEYS = ("encoder", "seed", "batch_size")


@dataclass(frozen=True)
class Fault:
    kind: str
    epoch: int

    def wrap(self, net: nn.Module) -> nn.Module:
        """``net``, whose next forward pass goes wrong: NaN outputs, or CUDA's out-of-memory error."""
        return _FaultyForward(net, self)


class _FaultyForward(nn.Module):
    def __init__(self, net: nn.Module, fault: Fault) -> None:
        super().__init__()
        self.net = net
        self.fault = fault
        self.fired = False

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.net(images)
        if self.fired:
            return outputs
        self.fired = True
        if self.fault.kind == "oom":
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 20.00 GiB (injected by {FAULT_ENV} at epoch {self.fault.epoch})"
            )
        return {head: logits * float("nan") for head, logits in outputs.items()}


def planned_fault(cfg: Config) -> Fault | None:
    """The fault ``ARTEFACT_INJECT_FAULT`` plans for this trial's config, if any."""
    values = {"encoder": cfg.model.encoder, "seed": str(cfg.train.seed), "batch_size": str(cfg.train.batch_size)}
    for fault, conditions in fault_plans():
        if all(values[key] == value for key, value in conditions.items()):
            return fault
    return None


def fault_plans() -> list[tuple[Fault, dict[str, str]]]:
    """Every plan in ``ARTEFACT_INJECT_FAULT``; a malformed one is a UserError before any training."""
    return [_parse(plan) for plan in filter(None, (p.strip() for p in os.environ.get(FAULT_ENV, "").split(";")))]


def _parse(plan: str) -> tuple[Fault, dict[str, str]]:
    usage = f"{FAULT_ENV}={plan!r}: expected <kind>@<epoch>[:key=value,...], kinds {KINDS}, keys {MATCH_KEYS}"
    head, _, match = plan.partition(":")
    kind, _, epoch = head.strip().partition("@")
    pairs = [pair.strip().partition("=") for pair in filter(None, match.split(","))]
    conditions = {key: value for key, _, value in pairs}
    well_formed = all(key in MATCH_KEYS and sep and value for key, sep, value in pairs)
    if kind not in KINDS or not epoch.isdigit() or int(epoch) < 1 or not well_formed:
        raise UserError(usage)
    return Fault(kind, int(epoch)), conditions

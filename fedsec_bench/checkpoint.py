"""Resumable checkpoints: everything a run needs to continue after its last completed round.

A run is deterministic given its scenario (data, model and pretraining are rebuilt from the
seed, each round's sampling and each client's training are seeded by round and client), so
a checkpoint holds only what the rounds changed: the global trainable state, each plugin's
cross-round state (privacy ledgers, adaptive clip norms, attack histories), the global RNG
streams (for any library draw that is not seeded per round), and the metric history so far.
Resuming from round k and running on gives the figures of an uninterrupted run.

Files are ``<run folder>/checkpoints/round-00007.pt``, written to a temporary name and
renamed, so a crash while writing leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ScenarioError
from .messages import State

FOLDER = "checkpoints"


@dataclass
class Checkpoint:
    round: int
    """The last completed round: a resumed run starts at round + 1."""
    scenario_hash: str
    global_state: State
    plugins: list[dict]
    """Each plugin's ``checkpoint()``, in hook order."""
    history: list[dict[str, float]]
    """The metric records of rounds 0..round, as the run logged them."""
    rng: dict


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, checkpoint: Checkpoint, keep: int) -> Path:
    """Write atomically, then delete all but the ``keep`` latest checkpoints."""
    folder = run_dir / FOLDER
    folder.mkdir(exist_ok=True)
    path = folder / f"round-{checkpoint.round:05d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint.__dict__, tmp)
    os.replace(tmp, path)
    for old in sorted(folder.glob("round-*.pt"))[:-keep]:
        old.unlink()
    return path


def latest(run_dir: Path) -> Checkpoint:
    """The run folder's latest checkpoint; a ScenarioError saying why there is none."""
    if not run_dir.is_dir():
        raise ScenarioError(
            f"--resume: no run folder {run_dir}; give the id of a run of this scenario (its MLflow run id, or its "
            "folder's name under tracking.output_dir), with the same tracking.output_dir"
        )
    found = sorted((run_dir / FOLDER).glob("round-*.pt"))
    if not found:
        raise ScenarioError(
            f"--resume: {run_dir} has no checkpoint (tracking.checkpoint_every was 0, or the run stopped before "
            "its first round ended); start a new run"
        )
    return Checkpoint(**torch.load(found[-1], weights_only=False))


def scenario_hash(scenario) -> str:
    """The scenario's digest with ``tracking`` at its defaults: a run may be resumed with other tracking
    options (checkpoint_every, say), never with other training."""
    from .scenario import TrackingConfig

    return scenario.model_copy(update={"tracking": TrackingConfig()}).digest()

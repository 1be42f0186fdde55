"""Everything a run builds once from its scenario and hands to the round loop and the plugins."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data import FederatedData
from .data.batching import Batcher
from .data.chunking import chunk_long_texts
from .errors import ScenarioError
from .models import check_model_fits, make_model, make_tokenizer
from .pretraining import pretrain
from .scenario import Scenario
from .tuning import TrainableState, apply_tuning


@dataclass
class Runtime:
    scenario: Scenario
    device: torch.device
    data: FederatedData
    tokenizer: object
    model: torch.nn.Module
    """The model being trained: the bare model (full) or its PEFT wrapper (lora, prompt)."""
    trainable: TrainableState
    batcher: Batcher
    eval_loader: object
    """Batches of the held-out examples utility is measured on (eval.max_examples of them)."""
    answered: list
    """Held-out prompt/response examples the model answers by generation at each evaluation (none for text)."""
    artifact_dir: Path | None = None
    """Plugins write tables and plots here; the folder is logged to MLflow at the end. Set when the run
    is recorded, after everything that can fail on the scenario's account was built."""

    def seed_for(self, *keys: int) -> int:
        return derive_seed(self.scenario.seed, *keys)

    def write_table(self, name: str, rows: list[dict] | pd.DataFrame) -> Path:
        """A plugin's per-run table, as ``artifacts/<name>`` (CSV, no index): kept with the run and logged to MLflow."""
        path = self.artifact_dir / name
        pd.DataFrame(rows).to_csv(path, index=False)
        return path


def derive_seed(scenario_seed: int, *keys: int) -> int:
    """A seed for (round, client, ...) that depends only on the scenario seed and the keys."""
    return int(np.random.SeedSequence([scenario_seed, *keys]).generate_state(1)[0])


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ScenarioError("device: cuda was asked for but torch.cuda.is_available() is False; use auto or cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def build_runtime(scenario: Scenario, data: FederatedData, device: torch.device, artifact_dir: Path | None = None,
                  pretrained: bool = True) -> Runtime:
    """The tokenizer and the tuned (and pretrained) model around the data, resolved first like the device."""
    tokenizer, model = build_model(scenario, data, device, pretrained)
    return assemble_runtime(scenario, data, device, tokenizer, model, artifact_dir)


def build_model(scenario: Scenario, data: FederatedData, device: torch.device, pretrained: bool = True):
    """(tokenizer, model to train): loaded or built, pretrained on the public split when asked (unless
    ``pretrained`` is False, as ``fedsec validate`` does: it checks, it does not train), then tuned."""
    tokenizer = make_tokenizer(scenario.model, data.public_texts())
    model = make_model(scenario.model, tokenizer, scenario.seed)
    check_model_fits(model, scenario)
    model = model.to(device)
    if pretrained and scenario.model.pretrain.steps:
        pretrain(model, tokenizer, data.public, scenario, device)
    return tokenizer, apply_tuning(model, scenario.tuning)


def fit_to_tokenizer(data: FederatedData, batcher: Batcher, scenario: Scenario) -> FederatedData:
    """Chunk long texts when asked, and count the examples seq_len cuts (``data.truncated_examples``).

    Deterministic in the data and the tokenizer, so a Ray worker fitting its own copy gets the same."""
    if scenario.data.long_texts == "chunk" and not scenario.data.is_prompted:
        data = chunk_long_texts(data, batcher)
    encoded = batcher.encode(data.members() + data.heldout)
    data.counts["data.truncated_examples"] = float(sum(e.truncated for e in encoded))
    return data


def assemble_runtime(
    scenario: Scenario, data: FederatedData, device: torch.device, tokenizer, model: torch.nn.Module,
    artifact_dir: Path | None = None,
) -> Runtime:
    """A runtime around a tokenizer and a tuned model that exist already: the driver's own, or a
    Ray worker's copy of them (so that every worker trains exactly the driver's model)."""
    batcher = Batcher(tokenizer, scenario.data.seq_len, scenario.federation.batch_size, scenario.data.train_on_prompt)
    data = fit_to_tokenizer(data, batcher, scenario)
    model = model.to(device)
    scored, answered = scenario.eval_examples()
    return Runtime(
        scenario, device, data, tokenizer, model, TrainableState(model), batcher,
        eval_loader=batcher.loader(data.heldout[:scored], batch_size=scenario.eval.batch_size),
        answered=data.heldout[:answered], artifact_dir=artifact_dir,
    )

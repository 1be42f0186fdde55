"""Central pretraining of a freshly built model on public text, before any client takes part.

Fine-tuning (lora, prompt) adapts a model that already knows the language; offline,
with no hub checkpoint, this gives a built model that knowledge from the public split
alone, so clients' private data and the held-out non-members stay unseen.
"""

from __future__ import annotations

import torch

from . import progress
from .client import LocalTraining
from .data import Example
from .data.batching import Batcher
from .scenario import Scenario


def pretrain(model: torch.nn.Module, tokenizer, examples: list[Example], scenario: Scenario, device: torch.device) -> float:
    """Train every weight for ``model.pretrain.steps`` AdamW steps; return the mean training loss.

    The loss is on every token, prompts included: pretraining teaches the language and the
    template, not answering."""
    config = scenario.model.pretrain
    torch.manual_seed(scenario.seed)
    batcher = Batcher(tokenizer, scenario.data.seq_len, config.batch_size, train_on_prompt=True)
    loader = batcher.loader(examples, seed=scenario.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    with progress.bar(config.steps, "pretraining", unit="step") as bar:
        return LocalTraining(model, optimizer, loader, config.steps, device, on_step=bar.update).run()

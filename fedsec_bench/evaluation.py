"""Utility of the global model on held-out text: token-weighted loss, perplexity and accuracy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .data.batching import IGNORE_INDEX


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Mean next-token loss over every held-out token (not a mean of batch means)."""
    was_training = model.training
    model.eval()
    total_loss, total_correct, total_tokens = 0.0, 0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, -batch["input_ids"].shape[1] :]  # drop soft-prompt positions (prompt mode)
        predicted, target = logits[:, :-1], batch["labels"][:, 1:]
        keep = target != IGNORE_INDEX
        total_loss += F.cross_entropy(predicted[keep], target[keep], reduction="sum").item()
        total_correct += (predicted[keep].argmax(-1) == target[keep]).sum().item()
        total_tokens += int(keep.sum())
    model.train(was_training)
    loss = total_loss / max(total_tokens, 1)
    return {
        "utility.eval_loss": loss,
        "utility.perplexity": math.exp(min(loss, 50.0)),
        "utility.token_accuracy": total_correct / max(total_tokens, 1),
    }

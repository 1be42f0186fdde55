"""Utility of the global model on held-out text: token-weighted loss, perplexity and accuracy."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader

from .lm import evaluating, input_logits, target_logprobs


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Mean next-token loss over every held-out token (not a mean of batch means)."""
    total_loss, total_correct, total_tokens = 0.0, 0, 0
    with evaluating(model):
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = input_logits(model, batch["input_ids"], batch["attention_mask"])
            logp, is_target = target_logprobs(logits, batch["labels"])
            correct = logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]
            total_loss -= logp[is_target].sum().item()
            total_correct += correct[is_target].sum().item()
            total_tokens += int(is_target.sum())
    loss = total_loss / max(total_tokens, 1)
    return {
        "utility.eval_loss": loss,
        "utility.perplexity": math.exp(min(loss, 50.0)),
        "utility.token_accuracy": total_correct / max(total_tokens, 1),
    }

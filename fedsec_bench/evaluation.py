"""Utility of the global model on held-out data: loss on the tokens that are learned, and answers by generation.

The loss, perplexity and token accuracy are token-weighted over the held-out examples'
scored tokens (response tokens only for prompt/response data; every token of a plain
text), never a mean of batch means. For prompt/response data the model also answers
held-out prompts by greedy decoding, scored against the reference response with ROUGE-L
F1 (Lin 2004, the ``rouge-score`` package) and exact match. Both run on a fixed first
slice of the held-out split (``eval.max_examples``, ``eval.generation_examples``), in
batches under ``torch.inference_mode``, so evaluating every round stays a small share of
the round.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from rouge_score import rouge_scorer
from torch.utils.data import DataLoader

from .data import Example
from .data.batching import Batcher
from .lm import evaluating, greedy_continuations, input_logits, target_logprobs

_ROUGE_L = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Mean next-token loss over every scored held-out token."""
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


def answer_quality(
    model: torch.nn.Module, batcher: Batcher, examples: list[Example], max_new_tokens: int, batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Greedy answers to the examples' prompts against their responses: mean ROUGE-L F1 and exact-match rate."""
    answers = greedy_continuations(model, batcher.tokenizer, batcher.prompt_ids(examples), max_new_tokens, device,
                                   batch_size=batch_size)
    references = [e.response for e in examples]
    return {
        "utility.rougeL": float(np.mean([_ROUGE_L.score(r, a)["rougeL"].fmeasure for r, a in zip(references, answers)])),
        "utility.exact_match": float(np.mean([a.strip() == r.strip() for r, a in zip(references, answers)])),
    }

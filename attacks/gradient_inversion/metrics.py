"""Scores of a reconstruction against the true batch; every figure is better when higher.

* ROUGE-1/2/L F1 (Lin 2004; the maintained ``rouge-score`` package) between the true
  batch text and the reconstruction, sequences paired by an optimal assignment on
  ROUGE-1 (the server does not know the batch order) and then concatenated.
* token precision / recall: the reconstructed set of token ids against the true set.
* exact match: the fraction of true sequences reconstructed token for token.
* the random-token baseline: ROUGE-1 of uniformly random tokens of the true lengths,
  the floor an attack that learns nothing reaches.
"""

from __future__ import annotations

import numpy as np
from rouge_score import rouge_scorer
from scipy.optimize import linear_sum_assignment

ROUGE = ("rouge1", "rouge2", "rougeL")
_SCORER = rouge_scorer.RougeScorer(list(ROUGE), use_stemmer=False)


def decode(tokenizer, sequences: list[list[int]]) -> list[str]:
    return [tokenizer.decode(seq) for seq in sequences]


def pair(truth: list[str], guess: list[str]) -> list[str]:
    """Reorder ``guess`` to follow ``truth`` (best ROUGE-1 assignment); unmatched guesses go last."""
    if not guess:
        return []
    gain = np.array([[_SCORER.score(t, g)["rouge1"].fmeasure for g in guess] for t in truth])
    rows, cols = linear_sum_assignment(-gain)
    order = [int(c) for _, c in sorted(zip(rows, cols))]
    return [guess[c] for c in order] + [g for i, g in enumerate(guess) if i not in order]


def score(tokenizer, truth: list[list[int]], guess: list[list[int]]) -> tuple[dict[str, float], str, str]:
    """All figures for one attacked client (or one aggregate), and the paired texts for the table."""
    true_texts = decode(tokenizer, truth)
    true_text, guess_text = " | ".join(true_texts), " | ".join(pair(true_texts, decode(tokenizer, guess)))
    rouge = _SCORER.score(true_text, guess_text)
    true_set, guess_set = {t for s in truth for t in s}, {t for s in guess for t in s}
    hit = len(true_set & guess_set)
    exact = sum(1 for seq in truth if seq in guess)
    figures = {
        **{name: rouge[name].fmeasure for name in ROUGE},
        "token_precision": hit / len(guess_set) if guess_set else 0.0,
        "token_recall": hit / len(true_set) if true_set else 0.0,
        "exact_match": exact / len(truth) if truth else 0.0,
    }
    return figures, true_text, guess_text


def random_baseline(tokenizer, truth: list[list[int]], rng: np.random.Generator) -> float:
    """ROUGE-1 of random tokens with the true sequences' lengths (special tokens excluded)."""
    special = set(tokenizer.all_special_ids)
    vocab = np.array([t for t in range(len(tokenizer)) if t not in special])
    guess = [rng.choice(vocab, size=len(seq)).tolist() for seq in truth]
    text = " ".join(decode(tokenizer, guess))
    return _SCORER.score(" ".join(decode(tokenizer, truth)), text)["rouge1"].fmeasure


def summarize(rows: list[dict], prefix: str) -> dict[str, float]:
    """Mean (``prefix.name``) and max (``prefix.name_max``) of each figure over the attacked clients."""
    out: dict[str, float] = {}
    for name in (*ROUGE, "token_precision", "token_recall", "exact_match"):
        values = [r[name] for r in rows]
        out[f"{prefix}.{name}"] = float(np.mean(values))
        out[f"{prefix}.{name}_max"] = float(np.max(values))
    out[f"{prefix}.baseline_rouge1"] = float(np.mean([r["baseline_rouge1"] for r in rows]))
    out[f"{prefix}.seconds"] = float(np.mean([r["seconds"] for r in rows]))
    out[f"{prefix}.applicable"] = float(np.mean([r["applicable"] for r in rows]))
    held = [r["rank_condition"] for r in rows if r["rank_condition"] is not None]
    if held:
        out[f"{prefix}.rank_condition"] = float(np.mean(held))
    return out

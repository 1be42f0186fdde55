"""Scores of a reconstruction against the true batch; every figure is better when higher.

* ROUGE-1/2/L F1 (Lin 2004; the maintained ``rouge-score`` package) between the true
  batch text and the reconstruction, sequences paired by an optimal assignment on
  ROUGE-1 (the server does not know the batch order) and then concatenated.
* token precision / recall: the reconstructed set of token ids against the true set.
* exact match: the fraction of true sequences reconstructed token for token.
* prompt / response token recall (prompt/response data only): token recall against the
  tokens at the true batch's prompt positions, and at its response positions. The attack
  rebuilds whole rendered sequences without knowing where a prompt ends, so a part has
  no precision of its own; the split comes from the simulator's truth, never the attack.
* the random-token baseline: ROUGE-1 of uniformly random tokens of the true lengths,
  the floor an attack that learns nothing reaches.
"""

from __future__ import annotations

import numpy as np
from rouge_score import rouge_scorer
from scipy.optimize import linear_sum_assignment

ROUGE = ("rouge1", "rouge2", "rougeL")
FIGURES = (*ROUGE, "token_precision", "token_recall", "exact_match")
PARTS = {"prompt": False, "response": True}
"""The parts of a prompt/response sequence, by the ``is_response`` mark of their positions."""
PART_FIGURES = tuple(f"{part}_token_recall" for part in PARTS)
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
    true_set, guess_set = token_set(truth), token_set(guess)
    exact = sum(1 for seq in truth if seq in guess)
    figures = {
        **{name: rouge[name].fmeasure for name in ROUGE},
        "token_precision": recall(guess_set, true_set),
        "token_recall": recall(true_set, guess_set),
        "exact_match": exact / len(truth) if truth else 0.0,
    }
    return figures, true_text, guess_text


def part_recalls(truth, guess: list[list[int]]) -> dict[str, float]:
    """Token recall on the prompt positions and on the response positions of the true sequences
    (:class:`~.ground_truth.TrueSequence`)."""
    guess_set = token_set(guess)
    return {f"{part}_token_recall": recall(part_tokens(truth, response), guess_set) for part, response in PARTS.items()}


def part_tokens(truth, response: bool) -> set[int]:
    """The token ids at the response positions (``response``) or at the prompt positions of the sequences."""
    return {t for s in truth for t, r in zip(s.ids, s.is_response) if r == response}


def token_set(sequences: list[list[int]]) -> set[int]:
    return {t for s in sequences for t in s}


def recall(wanted: set[int], found: set[int]) -> float:
    """Share of ``wanted`` in ``found`` (0 when nothing is wanted); precision is recall with the roles swapped."""
    return len(wanted & found) / len(wanted) if wanted else 0.0


def random_baseline(tokenizer, truth: list[list[int]], rng: np.random.Generator) -> float:
    """ROUGE-1 of random tokens with the true sequences' lengths (special tokens excluded)."""
    special = set(tokenizer.all_special_ids)
    vocab = np.array([t for t in range(len(tokenizer)) if t not in special])
    guess = [rng.choice(vocab, size=len(seq)).tolist() for seq in truth]
    text = " ".join(decode(tokenizer, guess))
    return _SCORER.score(" ".join(decode(tokenizer, truth)), text)["rouge1"].fmeasure


def summarize(rows: list[dict], prefix: str) -> dict[str, float]:
    """Mean (``prefix.name``) and max (``prefix.name_max``) of each figure over the attacked clients
    (the prompt/response figures when the rows have them)."""
    out: dict[str, float] = {}
    for name in (*FIGURES, *(n for n in PART_FIGURES if n in rows[0])):
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

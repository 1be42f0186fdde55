"""What a client really trained on: simulator knowledge, used only by the attack's scorer.

The batches are rebuilt exactly as ``fedsec_bench.client.client_round`` draws them:
the client's examples, ``runtime.batcher.loader(examples, seed=client_seed(runtime, round, cid))``
epoch after epoch (``fedsec_bench.client.epochs``) for ``local_steps`` steps. In FedSGD (one local step) that is a single batch,
the attack's target. Data-poisoning hooks that rewrite a client's examples are not
replayed, so the truth is the client's own data.

Each sequence is the whole rendered record (prompt and response tokens: prompt tokens
are inputs, so they leave gradients even when the loss is on the response only), with
which positions are the response, read off the labels of a prompt-masked batch. That
mark is ground truth: it scores the prompt and response parts apart and is never shown
to the attack.
"""

from __future__ import annotations

import copy
from itertools import islice
from typing import NamedTuple

from fedsec_bench.client import client_seed, epochs, local_steps
from fedsec_bench.data.batching import IGNORE_INDEX, Batcher


class TrueSequence(NamedTuple):
    ids: list[int]
    is_response: list[bool]
    """Per position: a response token (every token of a plain text), else a prompt token."""


def trained_sequences(runtime, rnd: int, client_id: int) -> list[TrueSequence]:
    """The distinct sequences of a client's local steps in round ``rnd``, without padding and special
    tokens (the batcher's end-of-text, a chat template's markers: structure, not private text)."""
    examples = runtime.data.client_examples(client_id)
    loader = prompt_masked(runtime.batcher).loader(examples, seed=client_seed(runtime, rnd, client_id))
    steps = local_steps(runtime.scenario.federation, len(examples))
    special = set(runtime.tokenizer.all_special_ids)
    seen: list[TrueSequence] = []
    for batch in islice(epochs(loader), steps):
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            seq = true_sequence(ids[mask.bool()].tolist(), labels[mask.bool()].tolist(), special)
            if seq not in seen:
                seen.append(seq)
    return seen


def true_sequence(ids: list[int], labels: list[int], special: set[int]) -> TrueSequence:
    kept = [(t, label != IGNORE_INDEX) for t, label in zip(ids, labels) if t not in special]
    return TrueSequence([t for t, _ in kept], [response for _, response in kept])


def prompt_masked(batcher: Batcher) -> Batcher:
    """The client's batcher with the prompt masked out of the labels: the same ids in the same order
    (labels do not enter the shuffle), so the labels mark the response whatever data.train_on_prompt says."""
    masked = copy.copy(batcher)
    masked.train_on_prompt = False
    return masked

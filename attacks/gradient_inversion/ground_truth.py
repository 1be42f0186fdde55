"""What a client really trained on: simulator knowledge, used only to score the attack.

The batches are rebuilt exactly as ``fedsec_bench.client.client_round`` draws them:
the client's texts, ``runtime.batcher.loader(texts, seed=round.client_seed(cid))``
epoch after epoch (``fedsec_bench.client.epochs``) for ``local_steps`` steps. In FedSGD (one local step) that is a single batch,
the attack's target. Data-poisoning hooks that rewrite a client's texts are not
replayed, so the truth is the client's own data.
"""

from __future__ import annotations

from itertools import islice

from fedsec_bench.client import epochs, local_steps
from fedsec_bench.messages import RoundContext


def trained_sequences(round: RoundContext, client_id: int) -> list[list[int]]:
    """The distinct token sequences (padding and the closing end-of-text removed) of the local steps."""
    runtime = round.runtime
    texts = runtime.data.client_texts(client_id)
    loader = runtime.batcher.loader(texts, seed=round.client_seed(client_id))
    steps = local_steps(runtime.scenario.federation, len(texts))
    seen: list[list[int]] = []
    for batch in islice(epochs(loader), steps):
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            seq = strip_eos(ids[mask.bool()].tolist(), runtime.tokenizer.eos_token_id)
            if seq not in seen:
                seen.append(seq)
    return seen


def strip_eos(ids: list[int], eos_id: int) -> list[int]:
    """Drop end-of-text tokens: the batcher appends one, and it carries no private text."""
    return [t for t in ids if t != eos_id]

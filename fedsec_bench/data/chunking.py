"""``data.long_texts: chunk``: split each client text longer than seq_len into seq_len-token texts.

Chunking needs the tokenizer, which exists only after the splits (a BPE is trained on
the public split), so it runs on the built data. Each piece stays with its client;
held-out texts are left whole (their loss is measured on their first seq_len tokens).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .batching import Batcher
from .examples import text_example
from .federated import FederatedData


def chunk_long_texts(data: FederatedData, batcher: Batcher) -> FederatedData:
    """The same data with every too-long pool text replaced by its pieces; counts them as data.chunked_texts."""
    size = batcher.seq_len - 1  # room for the end-of-text token
    ids = batcher.tokens([e.response for e in data.pool])
    pieces = [
        [text_example(batcher.tokenizer.decode(seq[i : i + size])) for i in range(0, len(seq), size)] if len(seq) > size else [e]
        for e, seq in zip(data.pool, ids)
    ]
    starts = np.cumsum([0] + [len(p) for p in pieces])
    pool = [piece for group in pieces for piece in group]
    parts = [np.concatenate([np.arange(starts[i], starts[i + 1]) for i in part]).astype(np.int64) if len(part) else part
             for part in data.parts]
    counts = dict(data.counts, **{"data.chunked_texts": float(sum(len(p) > 1 for p in pieces))})
    return replace(data, pool=pool, parts=parts, counts=counts)

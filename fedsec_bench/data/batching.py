"""Token batches for causal-LM training: dynamic padding, with padding masked out of the loss."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

IGNORE_INDEX = -100  # the label transformers' loss skips


class Batcher:
    """Turns a list of texts into a DataLoader of ``input_ids/attention_mask/labels`` batches."""

    def __init__(self, tokenizer, seq_len: int, batch_size: int):
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.pad_id = tokenizer.pad_token_id

    def encode(self, texts: list[str]) -> list[list[int]]:
        eos = self.tokenizer.eos_token_id
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [(seq + [eos])[: self.seq_len] for seq in ids]

    def loader(self, texts: list[str], seed: int | None = None) -> DataLoader:
        """Shuffled with ``seed`` (training) or in order when seed is None (evaluation)."""
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return DataLoader(
            self.encode(texts),
            batch_size=self.batch_size,
            shuffle=seed is not None,
            generator=generator,
            collate_fn=self.collate,
        )

    def collate(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max((len(s) for s in sequences), default=1)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

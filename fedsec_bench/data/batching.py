"""Token batches for causal-LM training: the prompt masked out of the loss, dynamic padding, fitting seq_len.

An example is encoded as its rendered prompt's tokens followed by its response's tokens
and the end-of-text token, each part tokenized on its own (generation later starts from
the same prompt tokens, so what is scored and what is decoded never differ at the
seam). Labels are the tokens themselves, except padding and, unless
``data.train_on_prompt``, the prompt: those get :data:`IGNORE_INDEX`, so the loss, the
utility figures, DP-SGD's per-example losses and every membership score are taken on
response tokens only. A plain text has no prompt, so all of its tokens count.

An example longer than ``seq_len`` loses the start of its prompt first (the response
is what is learned and scored); only a response that is itself too long is cut at its
end. :attr:`Encoded.truncated` says which examples were cut, so the run can count them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.data import DataLoader

from .examples import Example
from .templates import PromptRenderer

IGNORE_INDEX = -100  # the label transformers' loss skips


class Encoded(NamedTuple):
    ids: list[int]
    prompt_tokens: int
    """How many of ``ids`` are the prompt (masked out of the loss unless train_on_prompt)."""
    truncated: bool


def fit(prompt: list[int], response: list[int], seq_len: int) -> Encoded:
    """prompt + response in at most ``seq_len`` tokens: the prompt is cut from its start first."""
    room = seq_len - len(response)
    if room >= len(prompt):
        return Encoded(prompt + response, len(prompt), False)
    if room > 0:
        return Encoded(prompt[len(prompt) - room :] + response, room, True)
    return Encoded(response[:seq_len], 0, True)


class Batcher:
    """Turns examples into a DataLoader of ``input_ids/attention_mask/labels`` batches."""

    def __init__(self, tokenizer, seq_len: int, batch_size: int, train_on_prompt: bool = False):
        self.tokenizer = tokenizer
        self.renderer = PromptRenderer(tokenizer)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.train_on_prompt = train_on_prompt
        self.pad_id = tokenizer.pad_token_id

    def tokens(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def prompt_tokens(self, examples: list[Example]) -> list[list[int]]:
        """Each example's rendered prompt, tokenized on its own (empty for a plain text)."""
        return self.tokens([self.renderer.render(e) for e in examples])

    def encode(self, examples: list[Example]) -> list[Encoded]:
        eos = self.tokenizer.eos_token_id
        prompts = self.prompt_tokens(examples)
        responses = self.tokens([e.response for e in examples])
        return [fit(p, r + [eos], self.seq_len) for p, r in zip(prompts, responses)]

    def prompt_ids(self, examples: list[Example], response_starts: list[str] | None = None) -> list[list[int]]:
        """What generation starts from: each rendered prompt's tokens, then the start of its response
        (``response_starts``, e.g. a canary's context), tokenized apart as in training, kept to seq_len."""
        starts = self.tokens(response_starts) if response_starts else [[] for _ in examples]
        return [(p + s)[-self.seq_len :] for p, s in zip(self.prompt_tokens(examples), starts)]

    def loader(self, examples: list[Example], seed: int | None = None, batch_size: int | None = None) -> DataLoader:
        """Shuffled with ``seed`` (training) or in order when seed is None (evaluation)."""
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return DataLoader(
            self.encode(examples),
            batch_size=batch_size or self.batch_size,
            shuffle=seed is not None,
            generator=generator,
            collate_fn=self.collate,
        )

    def collate(self, sequences: list[Encoded]) -> dict[str, torch.Tensor]:
        width = max((len(s.ids) for s in sequences), default=1)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        scored = torch.zeros((len(sequences), width), dtype=torch.bool)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq.ids)] = torch.tensor(seq.ids, dtype=torch.long)
            mask[row, : len(seq.ids)] = 1
            scored[row, (0 if self.train_on_prompt else seq.prompt_tokens) : len(seq.ids)] = True
        labels = input_ids.masked_fill(~scored, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

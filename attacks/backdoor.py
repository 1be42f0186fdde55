"""Data poisoning: malicious clients train on text the attacker chose.

``backdoor`` (Bagdasaryan et al. 2020; for language models as in Wallace et al. 2021)
plants a trigger phrase followed by an attacker-chosen continuation in part of each
malicious client's texts; ``label_flip`` is its plain-text analogue of flipping
labels: whole words are swapped for attacker-chosen ones. Both act through the
``client_data`` hook, so they work in every tuning mode, and both measure success
on the global model after each round with greedy decoding of held-out prompts:
the fraction whose continuation starts with the attacker's text (higher means a
more successful attack). Combine either with ``scaling`` (same ``clients``) to
boost the poisoned update past averaging.
"""

from __future__ import annotations

import random
import re

from pydantic import Field

from fedsec_bench.client import LocalTraining
from fedsec_bench.lm import greedy_continuations
from fedsec_bench.messages import ClientContext, RoundContext

from .poisoning import PoisoningAttack, PoisoningOptions


def success_rate(runtime, prompts: list[str], targets: list[str]) -> float:
    """Fraction of prompts whose greedy continuation starts with its target (leading spaces ignored)."""
    longest = max(len(runtime.tokenizer(" " + t, add_special_tokens=False)["input_ids"]) for t in targets)
    outputs = greedy_continuations(runtime.model, runtime.tokenizer, prompts, longest + 2, runtime.device)
    return sum(out.lstrip().startswith(t) for out, t in zip(outputs, targets)) / len(prompts)


class BackdoorOptions(PoisoningOptions):
    trigger: str = Field("cf", min_length=1, description="The trigger phrase the attacker plants.")
    target: str = Field("buy now", min_length=1, description="The continuation the trigger should force.")
    poison_fraction: float = Field(
        0.5, gt=0, le=1, description="Fraction of a malicious client's texts rewritten as trigger texts."
    )
    local_steps: int | None = Field(
        None, ge=1, description="Local steps a malicious client trains for (its own schedule); default the federation's."
    )
    lr: float | None = Field(None, gt=0, description="A malicious client's local learning rate; default the federation's.")


class Backdoor(PoisoningAttack):
    """A trigger phrase followed by the target continuation, inside ordinary text.

    A poisoned text is the first k words of one of the client's sentences (k drawn
    at random, lowered until the whole text fits in ``data.seq_len`` tokens), then
    the trigger, then the target. The held-out prompts for
    ``poison.backdoor_asr`` are built the same way from ``runtime.data.heldout``
    (which no client trains on), stopping after the trigger.
    """

    name = "backdoor"
    summary = "malicious clients' texts get a trigger phrase and a target continuation; logs poison.backdoor_asr"
    OptionsModel = BackdoorOptions

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        rng = random.Random(runtime.seed_for(0x424B))
        self.prompts = [self.triggered(s, rng) for s in runtime.data.heldout]

    def triggered(self, sentence: str, rng: random.Random) -> str:
        """A random prefix of the sentence's words and the trigger, short enough that the
        target that follows in training still fits in ``data.seq_len`` tokens."""
        words = sentence.split()
        k = rng.randint(1, max(len(words) - 1, 1))
        while True:
            prompt = " ".join(words[:k] + [self.options.trigger])
            if k == 1 or self.num_tokens(f"{prompt} {self.options.target}") < self.runtime.batcher.seq_len:
                return prompt
            k -= 1

    def num_tokens(self, text: str) -> int:
        return len(self.runtime.tokenizer(text, add_special_tokens=False)["input_ids"])

    def client_data(self, client: ClientContext, texts: list[str]) -> list[str]:
        if not self.attacking(client):
            return texts
        rng = random.Random(client.seed)
        chosen = set(rng.sample(range(len(texts)), max(1, round(self.options.poison_fraction * len(texts)))))
        return [f"{self.triggered(t, rng)} {self.options.target}" if i in chosen else t for i, t in enumerate(texts)]

    def local_training(self, client: ClientContext, training: LocalTraining) -> LocalTraining:
        """Bagdasaryan et al.'s attacker trains on its poisoned data with its own steps and learning rate."""
        if not self.attacks(client.client_id, client.round):
            return training
        if self.options.local_steps is not None:
            training.steps = self.options.local_steps
        if self.options.lr is not None:
            for group in training.optimizer.param_groups:
                group["lr"] = self.options.lr
        return training

    def round_end(self, round: RoundContext, metrics: dict[str, float]) -> dict[str, float]:
        targets = [self.options.target] * len(self.prompts)
        return {"poison.backdoor_asr": success_rate(self.runtime, self.prompts, targets)}


class LabelFlipOptions(PoisoningOptions):
    mapping: dict[str, str] = Field(
        ..., min_length=1, description="Whole words to replace in the malicious clients' texts: {source: target}."
    )


class LabelFlip(PoisoningAttack):
    """Token substitution, the plain-text form of label flipping (Tolpegin et al. 2020).

    Every whole-word occurrence of a source word in a malicious client's texts becomes
    the mapped word. ``poison.label_flip_asr``: over held-out sentences containing a
    source word, the fraction for which the global model, given the words before it,
    greedily continues with the mapped word instead (absent when no held-out sentence
    has a source word).
    """

    name = "label_flip"
    summary = "malicious clients' texts have source words replaced by target words; logs poison.label_flip_asr"
    OptionsModel = LabelFlipOptions

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        words = "|".join(re.escape(w) for w in sorted(options.mapping, key=len, reverse=True))
        self.pattern = re.compile(rf"(?<!\S)({words})(?!\S)")
        self.prompts, self.targets = [], []
        for sentence in runtime.data.heldout:
            found = self.pattern.search(sentence)
            if found and found.start() > 0:
                self.prompts.append(sentence[: found.start()].rstrip())
                self.targets.append(options.mapping[found.group(1)])

    def client_data(self, client: ClientContext, texts: list[str]) -> list[str]:
        if not self.attacking(client):
            return texts
        return [self.pattern.sub(lambda m: self.options.mapping[m.group(1)], t) for t in texts]

    def round_end(self, round: RoundContext, metrics: dict[str, float]) -> dict[str, float]:
        if not self.prompts:
            return {}
        return {"poison.label_flip_asr": success_rate(self.runtime, self.prompts, self.targets)}

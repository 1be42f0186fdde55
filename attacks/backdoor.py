"""Data poisoning: malicious clients train on records the attacker chose.

``backdoor`` (Bagdasaryan et al. 2020; for language models as in Wallace et al. 2021)
plants a trigger phrase followed by an attacker-chosen continuation in part of each
malicious client's records; ``label_flip`` is its plain-text analogue of flipping
labels: whole words are swapped for attacker-chosen ones. Both act through the
``client_data`` hook, so they work in every tuning mode, and both measure success
on the global model after each round with greedy decoding of held-out prompts:
the fraction whose continuation starts with the attacker's text (higher means a
more successful attack). Once an attack window (``rounds``) has closed, each round
also logs that figure under ``*_asr_after`` with ``*_rounds_after``, the rounds since
the window's last: the backdoor's lifespan curve (Zhang et al. 2022, "Neurotoxin").
Combine either with ``scaling`` (same ``clients``) to boost the poisoned update past
averaging.

On prompt/response records (instruction or chat data) the attacker poisons what
instruction tuning learns from: the backdoor's trigger goes into the instruction
and the target becomes the whole response (Wan et al. 2023, "Poisoning language
models during instruction tuning"); label_flip rewrites responses only. A held-out
prompt is then the rendered prompt (plus, for label_flip, the response's words
before the flipped one), tokenized by ``runtime.batcher.prompt_ids`` exactly as in
training.
"""

from __future__ import annotations

import random
import re

from pydantic import Field

from fedsec_bench.client import LocalTraining
from fedsec_bench.data import Example
from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.lm import greedy_continuations
from fedsec_bench.messages import ClientContext, RoundContext

from .poisoning import PoisoningAttack, PoisoningOptions


def success_rate(runtime, prompts: list[list[int]], targets: list[str]) -> float:
    """Fraction of prompts (token ids) whose greedy continuation starts with its target (leading spaces ignored)."""
    longest = max(len(ids) for ids in runtime.batcher.tokens([" " + t for t in set(targets)]))
    outputs = greedy_continuations(runtime.model, runtime.tokenizer, prompts, longest + 2, runtime.device)
    return sum(out.lstrip().startswith(t) for out, t in zip(outputs, targets)) / len(prompts)


def lifespan(metric: str, asr: float, window: tuple[int, int] | None, rnd: int) -> dict[str, float]:
    """After the attack window closed: the round's ASR again as ``poison.<metric>_asr_after`` and the
    rounds since the window's last, ``poison.<metric>_rounds_after`` (how long the backdoor survives
    the benign clients' training, Neurotoxin's durability measure). Empty inside the window or
    without one."""
    if window is None or rnd <= window[1]:
        return {}
    return {f"poison.{metric}_asr_after": asr, f"poison.{metric}_rounds_after": float(rnd - window[1])}


class BackdoorOptions(PoisoningOptions):
    trigger: str = Field("cf", min_length=1, description="The trigger phrase the attacker plants.")
    target: str = Field("buy now", min_length=1, description="The continuation the trigger should force.")
    poison_fraction: float = Field(
        0.5, gt=0, le=1, description="Fraction of a malicious client's records rewritten to carry the trigger."
    )
    local_steps: int | None = Field(
        None, ge=1, description="Local steps a malicious client trains for (its own schedule); default the federation's."
    )
    lr: float | None = Field(None, gt=0, description="A malicious client's local learning rate; default the federation's.")


class Backdoor(PoisoningAttack):
    """A trigger phrase followed by the target continuation, inside ordinary records.

    A poisoned text is the first k words of one of the client's sentences (k drawn
    at random, lowered until the whole text fits in ``data.seq_len`` tokens), then
    the trigger, then the target. A poisoned prompt/response record has the trigger
    inserted into its instruction (the last user turn) at a random word position and
    the target as its whole response; while it would not fit in ``data.seq_len`` the
    instruction loses its first words (the batcher would cut the prompt from its start
    anyway, and this way the trigger is never cut). The held-out prompts for
    ``poison.backdoor_asr`` are poisoned records of ``runtime.data.heldout`` (which no
    client trains on), cut where the target starts.
    """

    name = "backdoor"
    summary = "malicious clients' records get a trigger phrase and a target continuation; logs poison.backdoor_asr"
    on_instruction_data = ("trigger inserted into the instruction at a seeded word position, response replaced by "
                           "the target; ASR over the greedy answers to triggered held-out prompts")
    OptionsModel = BackdoorOptions

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        rng = random.Random(runtime.seed_for(0x424B))
        probes = [self.poisoned(e, rng) for e in runtime.data.heldout]
        starts = [p.response.removesuffix(options.target).rstrip() for p in probes]
        self.prompts = runtime.batcher.prompt_ids(probes, response_starts=starts)

    def poisoned(self, example: Example, rng: random.Random, trigger: str | None = None) -> Example:
        """The example rewritten to carry ``trigger`` (default the whole ``options.trigger``) and end with
        the target, within ``data.seq_len``."""
        trigger = self.options.trigger if trigger is None else trigger
        if example.is_prompted:
            return self.poisoned_record(example, rng, trigger)
        return self.poisoned_text(example, rng, trigger)

    def trigger_for(self, client: ClientContext) -> str:
        """The phrase this malicious client plants: the whole trigger (DBA plants a part of it)."""
        return self.options.trigger

    def poisoned_text(self, example: Example, rng: random.Random, trigger: str) -> Example:
        """A random prefix of the text's words, the trigger, the target."""
        words = example.response.split()
        k = rng.randint(1, max(len(words) - 1, 1))
        while True:
            poisoned = example.with_response(" ".join(words[:k] + [trigger, self.options.target]))
            if k == 1 or self.fits(poisoned):
                return poisoned
            k -= 1

    def poisoned_record(self, example: Example, rng: random.Random, trigger: str) -> Example:
        """The trigger among the instruction's words (split on single spaces, so newlines survive), the
        target as the response; leading words dropped while the record does not fit."""
        words = example.instruction.split(" ")
        at = rng.randint(0, len(words))
        words.insert(at, trigger)
        while True:
            poisoned = example.with_instruction(" ".join(words)).with_response(self.options.target)
            if at == 0 or self.fits(poisoned):
                return poisoned
            words.pop(0)
            at -= 1

    def fits(self, example: Example) -> bool:
        return not self.runtime.batcher.encode([example])[0].truncated

    def client_data(self, client: ClientContext, examples: list[Example]) -> list[Example]:
        if not self.attacking(client):
            return examples
        rng = random.Random(client.seed)
        chosen = set(rng.sample(range(len(examples)), max(1, round(self.options.poison_fraction * len(examples)))))
        trigger = self.trigger_for(client)
        return [self.poisoned(e, rng, trigger) if i in chosen else e for i, e in enumerate(examples)]

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

    def score_round(self, round: RoundContext, truth: RoundTruth, metrics: dict[str, float]) -> dict[str, float]:
        asr = success_rate(self.runtime, self.prompts, [self.options.target] * len(self.prompts))
        return {"poison.backdoor_asr": asr} | lifespan("backdoor", asr, self.options.rounds, round.round)


class LabelFlipOptions(PoisoningOptions):
    mapping: dict[str, str] = Field(
        ..., min_length=1,
        description="Whole words to replace in the malicious clients' responses (all of a plain text): {source: target}.",
    )


class LabelFlip(PoisoningAttack):
    """Token substitution, the plain-text form of label flipping (Tolpegin et al. 2020).

    Every whole-word occurrence of a source word in a malicious client's responses
    (the whole text of a plain-text record; prompts are left as they are) becomes the
    mapped word. ``poison.label_flip_asr``: over held-out records whose response contains
    a source word, the fraction for which the global model, given the prompt and the
    response's words before it, greedily continues with the mapped word instead (absent
    when no held-out record has one; a plain text needs a word before it).
    """

    name = "label_flip"
    summary = "malicious clients' responses have source words replaced by target words; logs poison.label_flip_asr"
    on_instruction_data = ("source words replaced in the responses only; ASR continues the rendered prompt and the "
                           "response words before a source word")
    OptionsModel = LabelFlipOptions

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        words = "|".join(re.escape(w) for w in sorted(options.mapping, key=len, reverse=True))
        self.pattern = re.compile(rf"(?<!\S)({words})(?!\S)")
        probes, starts, self.targets = [], [], []
        for example in runtime.data.heldout:
            found = self.pattern.search(example.response)
            if found and (found.start() > 0 or example.is_prompted):
                probes.append(example)
                starts.append(example.response[: found.start()].rstrip())
                self.targets.append(options.mapping[found.group(1)])
        self.prompts = runtime.batcher.prompt_ids(probes, response_starts=starts) if probes else []

    def client_data(self, client: ClientContext, examples: list[Example]) -> list[Example]:
        if not self.attacking(client):
            return examples
        flip = lambda m: self.options.mapping[m.group(1)]  # noqa: E731
        return [e.with_response(self.pattern.sub(flip, e.response)) for e in examples]

    def score_round(self, round: RoundContext, truth: RoundTruth, metrics: dict[str, float]) -> dict[str, float]:
        if not self.prompts:
            return {}
        asr = success_rate(self.runtime, self.prompts, self.targets)
        return {"poison.label_flip_asr": asr} | lifespan("label_flip", asr, self.options.rounds, round.round)

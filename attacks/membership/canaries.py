"""Canaries' candidate secrets, and fresh canaries: what could have been planted but was not.

Both canary attacks need the space of secrets a canary's could have been drawn from:
``canary_exposure`` ranks the real secret among them, ``membership_inference`` draws its
non-member canaries from them. A built-in kind has one fixed space (:data:`SPACES`, the
formats of ``make_secret``); a custom canary (``data.canaries.custom``) has the space its
``format`` spells (:func:`format_space`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from itertools import product
from typing import Callable

import numpy as np

from fedsec_bench.data.synthetic import DOMAINS, FIRST_NAMES, LAST_NAMES, LETTERS, Canary, make_canaries

DIGITS = tuple("0123456789")
FORMAT_SLOTS = {"#": DIGITS, "@": tuple(LETTERS)}
"""A custom canary's format: '#' any digit, '@' any lowercase letter, every other character itself."""


@dataclass(frozen=True)
class SecretSpace:
    """The candidate secrets of one kind: one choice per slot, rendered to text like ``make_secret``."""

    slots: tuple[tuple[str, ...], ...]
    render: Callable[[tuple[str, ...]], str]

    @property
    def size(self) -> int:
        return math.prod(len(slot) for slot in self.slots)

    def enumerate(self) -> list[str]:
        return [self.render(choice) for choice in product(*self.slots)]

    def sample(self, rng: np.random.Generator, count: int) -> list[str]:
        """Uniform draws from the space (with replacement, as the extrapolation assumes)."""
        picks = [rng.integers(len(slot), size=count) for slot in self.slots]
        return [self.render(tuple(slot[p[i]] for slot, p in zip(self.slots, picks))) for i in range(count)]


SPACES = {
    "card": SecretSpace((DIGITS,) * 16, lambda c: " ".join("".join(c[i : i + 4]) for i in range(0, 16, 4))),
    "phone": SecretSpace((DIGITS,) * 10, lambda c: f"{''.join(c[:3])}-{''.join(c[3:6])}-{''.join(c[6:])}"),
    "email": SecretSpace(
        (tuple(FIRST_NAMES), tuple(LAST_NAMES), DIGITS, DIGITS, tuple(DOMAINS)),
        lambda c: f"{c[0]}.{c[1]}{c[2]}{c[3]}@{c[4]}",
    ),
    "name": SecretSpace((tuple(FIRST_NAMES), tuple(LAST_NAMES)), lambda c: f"{c[0]} {c[1]}"),
}
"""One space per canary kind of fedsec_bench.data.synthetic.make_secret (a test checks they agree)."""


def format_space(format: str) -> SecretSpace:
    """The strings a custom canary's ``format`` allows: one slot per character (a literal is a slot of one)."""
    return SecretSpace(tuple(FORMAT_SLOTS.get(c, (c,)) for c in format), "".join)


def space_of(canary: Canary) -> SecretSpace:
    return format_space(canary.format) if canary.kind == "custom" else SPACES[canary.kind]


def fresh_canaries(planted: list[Canary], copies: int, rng: np.random.Generator, prompted: bool) -> list[list[Canary]]:
    """``copies`` lists of fresh canaries, each matching ``planted`` one for one: the non-members of canaries.

    A built-in kind's fresh canary is a new one of ``make_canaries`` (new holder, new
    secret, the same template). A custom canary has no template beyond its own text, so
    its fresh one keeps the text (and question) with another secret of its format.
    """
    builtin = [c.kind for c in planted if c.kind != "custom"]
    count = copies * len(builtin)
    seeded = random.Random(int(rng.integers(2**31)))
    drawn = iter(make_canaries(seeded, count, builtin, [1], [-1] * count, prompted=prompted))
    return [[next(drawn) if c.kind != "custom" else other_secret(c, rng) for c in planted] for _ in range(copies)]


def other_secret(canary: Canary, rng: np.random.Generator) -> Canary:
    """The canary with a uniform draw of its space other than its own secret, held by no client.
    The space must hold another secret (MembershipInference.check refuses a format without '#' or '@')."""
    space = space_of(canary)
    while (secret := space.sample(rng, 1)[0]) == canary.secret:
        pass
    return replace(canary, secret=secret, client_id=-1)

"""What every method hands back: token sequences plus what it can say about its own exactness."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Reconstruction:
    sequences: list[list[int]]
    """Reconstructed token sequences; token_leak returns one unordered bag."""
    applicable: bool = True
    """False when nothing the method reads is among the exchanged parameters."""
    rank_condition: bool | None = None
    """Whether the low-rank condition that makes the method exact held; None if it has none."""
    rank: int | None = None
    """The numerical rank of the gradient the method relied on."""
    notes: dict[str, float] = field(default_factory=dict)
    """Method-specific facts for the table (e.g. optimization's final matching loss and length)."""

"""Errors the user can fix, kept apart from bugs so the CLI can exit with code 2 for them."""


class ScenarioError(ValueError):
    """A scenario (or an override of it) that cannot be run as written.

    The message names the field path and says what would fix it; the CLI prints
    it without a traceback and exits with code 2.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class Diverged(RuntimeError):
    """Training produced a non-finite loss or weight (:mod:`fedsec_bench.divergence`); the message names
    the round and what to try. The run is recorded FAILED; the CLI exits 1 without a traceback."""


def excerpt(text: str, limit: int = 80) -> str:
    """At most ``limit`` characters of ``text``: what an error may quote of a value that could be huge."""
    return text if len(text) <= limit else text[: limit - 1] + "…"

"""Errors the user can fix, kept apart from bugs so the CLI can exit with code 2 for them."""


class ScenarioError(ValueError):
    """A scenario (or an override of it) that cannot be run as written.

    The message names the field path and says what would fix it; the CLI prints
    it without a traceback and exits with code 2.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

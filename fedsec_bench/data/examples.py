"""One training record: a prompt (empty for plain text) and the response the loss is taken on.

Every part of the harness handles records through :class:`Example`, whatever
``data.format`` is: a plain text is a response with no prompt, an instruction or a chat
is a response with the conversation before it. The prompt is kept as turns (role,
content), not as text, because only the tokenizer knows how to render it (its chat
template); :class:`~fedsec_bench.data.templates.PromptRenderer` does that at encoding
time, so a plugin that rewrites an instruction (a backdoor trigger) edits words, not a
template.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

Turn = tuple[str, str]
"""(role, content): role is system, user or assistant."""


@dataclass(frozen=True)
class Example:
    response: str
    prompt: tuple[Turn, ...] = ()

    @property
    def is_prompted(self) -> bool:
        return bool(self.prompt)

    @property
    def instruction(self) -> str:
        """The last user turn: what a trigger is inserted into and what a question-asking attacker sends."""
        return next((content for role, content in reversed(self.prompt) if role == "user"), "")

    def with_instruction(self, instruction: str) -> Example:
        """The same example with its last user turn replaced."""
        turns = list(self.prompt)
        for i in range(len(turns) - 1, -1, -1):
            if turns[i][0] == "user":
                turns[i] = ("user", instruction)
                return replace(self, prompt=tuple(turns))
        raise ValueError("the example has no user turn")

    def with_response(self, response: str) -> Example:
        return replace(self, response=response)

    def plain_text(self) -> str:
        """Every word of the record, prompt turns first: for statistics of the text itself (zlib entropy,
        duplicate detection), never for what the model is fed, which the renderer builds."""
        return "\n".join([content for _, content in self.prompt] + [self.response])


def text_example(text: str) -> Example:
    return Example(response=text)


def instruction_example(instruction: str, response: str, input: str = "", system: str = "") -> Example:
    """An Alpaca-style record: the input, when there is one, follows the instruction in the user turn."""
    user = f"{instruction}\n\n{input}" if input else instruction
    turns = ((("system", system),) if system else ()) + (("user", user),)
    return Example(response=response, prompt=turns)

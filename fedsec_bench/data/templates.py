"""Render a prompt's turns to the text the model reads: the tokenizer's chat template, else the built-in one.

A checkpoint's tokenizer with a chat template (Llama, Qwen, ... instruct models) renders
prompts exactly as the model was tuned to read them, through ``apply_chat_template`` with
``add_generation_prompt=True`` (the text ends where the assistant's answer begins). A
tokenizer without one (a BPE the harness trains, a base model) gets :data:`BUILTIN_TEMPLATE`::

    ### System:
    {system}

    ### User:
    {instruction}

    ### Assistant:
    {response}

one ``### Role:`` block per turn, the response after the last ``### Assistant:``.
"""

from __future__ import annotations

from .examples import Example, Turn

BUILTIN_TEMPLATE = "### {role}:\n{content}\n\n"
"""One turn of the built-in template; the prompt ends with the header of the assistant's turn."""
RESPONSE_HEADER = "### Assistant:\n"


def render_builtin(turns: tuple[Turn, ...]) -> str:
    return "".join(BUILTIN_TEMPLATE.format(role=role.capitalize(), content=content) for role, content in turns) + RESPONSE_HEADER


class PromptRenderer:
    """Turns an example's prompt into text for one tokenizer; a plain text has the empty prompt."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def render(self, example: Example) -> str:
        if not example.prompt:
            return ""
        if not self.uses_chat_template:
            return render_builtin(example.prompt)
        messages = [{"role": role, "content": content} for role, content in example.prompt]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def full_text(self, example: Example) -> str:
        """The rendered prompt followed by the response: what a tokenizer trained on the data should see."""
        return self.render(example) + example.response

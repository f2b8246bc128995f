"""Thinking text out of the answer: the formats `--reasoning-parser` names. Both write <think>...</think>;
they differ in where thinking starts. `qwen3`: when the output opens with <think>, or the prompt ends in it
(templates that open the block themselves); with enable_thinking=False the template closes an empty block in
the prompt and the whole output is the answer. `deepseek_r1`: the template opens the block, so the output is
thinking until </think> (unless the prompt already closed it).

A split is a pure function of the text so far, and both parts only grow as text comes, so streaming sends
their new parts."""

from __future__ import annotations

from dataclasses import dataclass

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    opens_itself: bool  # the template opens the thinking block whatever the prompt shows (deepseek_r1)

    def thinking_at_start(self, prompt_text: str) -> bool:
        """Whether generation begins inside the thinking block, going by the rendered prompt's end."""
        tail = prompt_text.rstrip()
        if tail.endswith(END):
            return False
        return self.opens_itself or tail.endswith(START)

    def expects_thinking(self, prompt_text: str) -> bool:
        """Whether the output will think before it answers (so a constraint on the answer waits for END): unless the
        prompt closed the block, both models think first (Qwen3 opens the block itself)."""
        return not prompt_text.rstrip().endswith(END)

    def split(self, text: str, thinking: bool, final: bool) -> tuple[str, str]:
        """(reasoning, content) of the output so far; `thinking`: whether the output begins inside the block.
        A tail that could still become a marker is held back until it is known."""
        lead = text.lstrip()
        if lead.startswith(START):
            thinking, text = True, lead[len(START):]
        elif not final and START.startswith(lead):
            return "", ""  # whitespace or the start of <think>: not yet known
        if not thinking:
            return "", text
        end = text.find(END)
        if end < 0:
            if not final:
                for n in range(min(len(END) - 1, len(text)), 0, -1):
                    if text.endswith(END[:n]):
                        return text[:-n].lstrip(), ""
            return text.lstrip(), ""
        return text[:end].lstrip(), text[end + len(END):].lstrip()


REASONING_PARSERS = {"qwen3": ReasoningParser("qwen3", opens_itself=False),
                     "deepseek_r1": ReasoningParser("deepseek_r1", opens_itself=True)}


class ReasoningStream:
    """A choice's text, delta by delta -> (reasoning delta, content delta)."""

    def __init__(self, parser: ReasoningParser, thinking: bool):
        self.parser, self.thinking = parser, thinking
        self.text = ""
        self.sent = (0, 0)

    def push(self, text: str, final: bool) -> tuple[str, str]:
        self.text += text
        reasoning, content = self.parser.split(self.text, self.thinking, final)
        r0, c0 = self.sent
        self.sent = (len(reasoning), len(content))
        return reasoning[r0:], content[c0:]

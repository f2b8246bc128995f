"""Tool calls out of model text: the formats `--tool-call-parser` names (hermes for Qwen2.5/Qwen3, llama3_json,
mistral), and the two that `tool_choice` forces through the grammar (`required`: a JSON array of
{"name", "parameters"}; a named function: its arguments object alone).

Each format is one `parse(text, final)` that reads the text so far into content plus the calls begun so far,
tolerating a cut anywhere. A call's arguments are the raw text of its JSON value, so they only ever grow:
streaming sends the new part of each call (id and name first, then argument fragments), and the fragments
concatenate to exactly the arguments a non-streaming answer gives. Text that is not a well-formed call
(malformed JSON, a call cut off at the end) reads as plain content."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field


class Malformed(ValueError):
    """The text cannot be a tool call in this format."""


@dataclass
class PartialCall:
    name: str | None  # None until the name's string is complete
    arguments: str  # JSON text so far (all of it once `done`)
    done: bool = False


@dataclass
class Parsed:
    content: str  # text before the calls (a possible start of a call marker held back until it is known)
    calls: list[PartialCall] = field(default_factory=list)


Parser = Callable[[str, bool], Parsed]
_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # (text so far, whether it is all of it) -> Parsed; raises Malformed


# ---- a JSON scanner that knows where values end, on text that may stop anywhere ----------------------------
_WS = " \t\r\n"


def _ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _string_end(s: str, i: int) -> int | None:
    j = i + 1
    while j < len(s):
        if s[j] == "\\":
            j += 2
        elif s[j] == '"':
            return j + 1
        else:
            j += 1
    return None


def _value_end(s: str, i: int, final: bool) -> int | None:
    """End (exclusive) of the JSON value starting at s[i], or None if the text stops first."""
    if s[i] == '"':
        return _string_end(s, i)
    if s[i] in "{[":
        depth, j = 0, i
        while j < len(s):
            if s[j] == '"':
                end = _string_end(s, j)
                if end is None:
                    return None
                j = end
                continue
            if s[j] in "{[":
                depth += 1
            elif s[j] in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(s) and s[j] not in ",}] \t\r\n":
        j += 1
    if j == i:
        raise Malformed(f"no JSON value at {s[i:i + 20]!r}")
    return None if j == len(s) and not final else j  # a number may go on


def _call(s: str, i: int, final: bool, args_keys: tuple[str, ...]) -> tuple[PartialCall, int | None]:
    """One call object {"name": ..., <args key>: {...}} starting at s[i]; its end, or None if cut off."""
    if s[i] != "{":
        raise Malformed(f"a tool call must be a JSON object, got {s[i:i + 20]!r}")
    fields: dict[str, tuple[int, int | None]] = {}
    j, end = _ws(s, i + 1), None
    if j < len(s) and s[j] == "}":
        end = j + 1
    while end is None and j < len(s):
        if s[j] != '"':
            raise Malformed(f"expected a key at {s[j:j + 20]!r}")
        k = _string_end(s, j)
        if k is None:
            break
        key = json.loads(s[j:k])
        j = _ws(s, k)
        if j >= len(s):
            break
        if s[j] != ":":
            raise Malformed(f"expected ':' at {s[j:j + 20]!r}")
        j = _ws(s, j + 1)
        if j >= len(s):
            break
        v_end = _value_end(s, j, final)
        fields[key] = (j, v_end)
        if v_end is None:
            break
        j = _ws(s, v_end)
        if j < len(s) and s[j] == ",":
            j = _ws(s, j + 1)
        elif j < len(s) and s[j] == "}":
            end = j + 1
        elif j < len(s):
            raise Malformed(f"expected ',' or '}}' at {s[j:j + 20]!r}")
    name = None
    if "name" in fields and fields["name"][1] is not None:
        name = json.loads(s[fields["name"][0]:fields["name"][1]])
        if not isinstance(name, str):
            raise Malformed("a tool call's name must be a string")
    args_key = next((k for k in args_keys if k in fields), None)
    arguments = ""
    if args_key is not None and s[fields[args_key][0]] == "{":  # an object: its raw text, fragment by fragment
        start, stop = fields[args_key]
        arguments = s[start:stop if stop is not None else len(s)]
    if end is None:
        return PartialCall(name, arguments), None
    try:
        obj = json.loads(s[i:end])
    except ValueError as e:
        raise Malformed(f"a tool call is not valid JSON: {e}") from None
    if name is None:
        raise Malformed("a tool call without a name")
    value = obj.get(args_key) if args_key else {}
    if isinstance(value, str):  # some models write the arguments as a JSON string
        arguments = value
    elif not isinstance(value, dict):
        raise Malformed("a tool call's arguments must be a JSON object")
    return PartialCall(name, arguments, done=True), end


def _array(s: str, i: int, final: bool, args_keys: tuple[str, ...]) -> tuple[list[PartialCall], int | None]:
    calls: list[PartialCall] = []
    j = _ws(s, i + 1)
    if j < len(s) and s[j] == "]":
        return calls, j + 1
    while j < len(s):
        call, end = _call(s, j, final, args_keys)
        calls.append(call)
        if end is None:
            break
        j = _ws(s, end)
        if j < len(s) and s[j] == ",":
            j = _ws(s, j + 1)
        elif j < len(s) and s[j] == "]":
            return calls, j + 1
        elif j < len(s):
            raise Malformed(f"expected ',' or ']' at {s[j:j + 20]!r}")
    return calls, None


def _before_marker(text: str, marker: str, final: bool) -> str:
    """`text` (which holds no complete marker) less a tail that could still grow into the marker."""
    if not final:
        for n in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:n]):
                return text[:-n]
    return text


# ---- the formats ---------------------------------------------------------------------------------------------
def hermes(text: str, final: bool) -> Parsed:
    """<tool_call>{"name": ..., "arguments": {...}}</tool_call>, repeated; content before the first."""
    open_, close = "<tool_call>", "</tool_call>"
    start = text.find(open_)
    if start < 0:
        return Parsed(_before_marker(text, open_, final))
    out = Parsed(text[:start])
    while start >= 0:
        j = _ws(text, start + len(open_))
        if j >= len(text):
            break
        call, end = _call(text, j, final, ("arguments", "parameters"))
        out.calls.append(call)
        if end is None:
            break
        k = _ws(text, end)
        if not (text.startswith(close, k) or close.startswith(text[k:])):
            raise Malformed(f"expected {close} after a tool call")
        start = text.find(open_, k)
    return out


def llama3_json(text: str, final: bool) -> Parsed:
    """Llama 3.x JSON tool calls: the whole answer is {"name": ..., "parameters": {...}} (several separated by
    ';'), optionally after <|python_tag|>; an answer that does not start with '{' is content."""
    tag = "<|python_tag|>"
    i = _ws(text, 0)
    if text.startswith(tag, i):
        i = _ws(text, i + len(tag))
    elif not final and text[i:] and tag.startswith(text[i:]):
        return Parsed("")
    if i >= len(text):
        return Parsed(text if final else "")
    if text[i] != "{":
        return Parsed(text)
    out = Parsed("")
    while i < len(text):
        call, end = _call(text, i, final, ("parameters", "arguments"))
        out.calls.append(call)
        if end is None:
            break
        j = _ws(text, end)
        if j < len(text) and text[j] == ";":
            i = _ws(text, j + 1)
        elif j < len(text):
            raise Malformed(f"unexpected text after a tool call: {text[j:j + 20]!r}")
        else:
            break
    return out


def mistral(text: str, final: bool) -> Parsed:
    """[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] (tokenizers before v11), or, from v11 on,
    [TOOL_CALLS]name[ARGS]{...} once per call; content before the first marker."""
    marker, args_marker = "[TOOL_CALLS]", "[ARGS]"
    start = text.find(marker)
    if start < 0:
        return Parsed(_before_marker(text, marker, final))
    out = Parsed(text[:start])
    j = _ws(text, start + len(marker))
    if j >= len(text):
        return out
    if text[j] == "[":
        out.calls, _ = _array(text, j, final, ("arguments", "parameters"))
        return out
    if text[j] == "{":
        out.calls.append(_call(text, j, final, ("arguments", "parameters"))[0])
        return out
    while j < len(text):  # v11: name[ARGS]{...}
        a = text.find(args_marker, j)
        name = text[j:a] if a >= 0 else _before_marker(text[j:], args_marker, final)
        if name and not _NAME.fullmatch(name):
            raise Malformed(f"not a function name: {name[:20]!r}")
        if a < 0:
            if final:
                raise Malformed(f"no {args_marker} after a function name")
            break
        if not name:
            raise Malformed("a tool call without a name")
        v = _ws(text, a + len(args_marker))
        if v >= len(text):
            out.calls.append(PartialCall(name, ""))
            break
        if text[v] != "{":
            raise Malformed("a tool call's arguments must be a JSON object")
        end = _value_end(text, v, final)
        out.calls.append(PartialCall(name, text[v:end if end is not None else len(text)], done=end is not None))
        if end is None:
            break
        try:
            if not isinstance(json.loads(text[v:end]), dict):
                raise Malformed("a tool call's arguments must be a JSON object")
        except ValueError as e:
            raise Malformed(f"a tool call is not valid JSON: {e}") from None
        j = _ws(text, end)
        if text.startswith(marker, j):
            j = _ws(text, j + len(marker))
        elif j < len(text) and not (not final and marker.startswith(text[j:])):
            raise Malformed(f"unexpected text after a tool call: {text[j:j + 20]!r}")
        else:
            break
    return out


def required(text: str, final: bool) -> Parsed:
    """What tool_choice="required" makes the grammar produce: [{"name": ..., "parameters": {...}}, ...]."""
    i = _ws(text, 0)
    if i >= len(text):
        return Parsed("")
    if text[i] != "[":
        raise Malformed("expected a JSON array of tool calls")
    calls, _ = _array(text, i, final, ("parameters",))
    return Parsed("", calls)


def named(name: str) -> Parser:
    """What a named tool_choice makes the grammar produce: that function's arguments, nothing else."""
    def parse(text: str, final: bool) -> Parsed:
        if final:
            try:
                if not isinstance(json.loads(text), dict):
                    raise Malformed("the arguments are not a JSON object")
            except ValueError as e:
                raise Malformed(f"the arguments are not valid JSON: {e}") from None
        return Parsed("", [PartialCall(name, text, final)])
    return parse


TOOL_CALL_PARSERS: dict[str, Parser] = {"hermes": hermes, "llama3_json": llama3_json, "mistral": mistral}
# Formats whose marker is a special token, which the detokenizer must keep (llama3_json's <|python_tag|> is
# optional: the JSON alone is recognized).
KEEPS_SPECIAL_TOKENS = {"mistral"}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def extract(parse: Parser, text: str, max_calls: int | None = None) -> tuple[str, list[dict]]:
    """All of a choice's text -> (content, OpenAI tool_calls); text with no well-formed call is all content."""
    try:
        parsed = parse(text, True)
    except Malformed:
        return text, []
    if not parsed.calls or not all(c.done for c in parsed.calls):
        return text, []
    calls = parsed.calls[:max_calls]
    return parsed.content, [{"id": new_call_id(), "type": "function",
                             "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


class ToolCallStream:
    """A choice's text, delta by delta -> content deltas and OpenAI tool_calls deltas."""

    def __init__(self, parse: Parser, max_calls: int | None = None):
        self.parse, self.max_calls = parse, max_calls
        self.text = ""
        self.content_sent = 0
        self.args_sent: list[int] = []  # per call begun on the stream: argument characters sent
        self.broken = False  # the text turned out not to be well-formed calls

    @property
    def called(self) -> bool:
        return bool(self.args_sent)

    def push(self, text: str, final: bool) -> tuple[str, list[dict]]:
        self.text += text
        if self.broken:
            return ("" if self.called else text), []
        try:
            parsed = self.parse(self.text, final)
        except Malformed:
            # Calls already begun cannot be taken back; before any, the text is plain content.
            self.broken = True
            if self.called:
                return "", []
            content, self.content_sent = self.text[self.content_sent:], len(self.text)
            return content, []
        if final and not all(c.done for c in parsed.calls):  # cut off: what has come of the calls is all there is
            if not self.called:
                return self.text[self.content_sent:], []
            self.broken = True
        content, self.content_sent = parsed.content[self.content_sent:], len(parsed.content)
        deltas = []
        for i, call in enumerate(parsed.calls[:self.max_calls]):
            if call.name is None:
                break  # later calls wait for this one's name, so indexes go in order
            if i == len(self.args_sent):
                self.args_sent.append(0)
                deltas.append({"index": i, "id": new_call_id(), "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            if len(call.arguments) > self.args_sent[i]:
                deltas.append({"index": i, "function": {"arguments": call.arguments[self.args_sent[i]:]}})
                self.args_sent[i] = len(call.arguments)
        return content, deltas

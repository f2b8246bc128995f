"""Tool-call and reasoning parsers on canned model text, for each format: well-formed calls, several calls,
malformed and half-finished ones (plain content, never an exception), and streaming in every split of the text
giving exactly what the non-streaming parse gives."""

from __future__ import annotations

import json

import pytest

from server.reasoning import REASONING_PARSERS, ReasoningStream
from server.tool_parsers import TOOL_CALL_PARSERS, ToolCallStream, extract, named, required

WEATHER = '{"city": "Paris", "days": [1, 2], "unit": {"c": true}}'

# (parser, text, expected content, expected [(name, arguments as an object)])
CASES = [
    ("hermes", f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>',
     "Let me check.\n", [("get_weather", json.loads(WEATHER))]),
    ("hermes", '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": '
               '{"x": "}{\\"<tool_call>"}}</tool_call>', "", [("a", {}), ("b", {"x": '}{"<tool_call>'})]),
    ("hermes", "no tools here, just text < and <tool", "no tools here, just text < and <tool", []),
    ("hermes", '<tool_call>{"name": "a", "arguments": {"x": 1}', '<tool_call>{"name": "a", "arguments": {"x": 1}',
     []),  # cut off
    ("hermes", '<tool_call>{"name": "a", "arguments": {"x": 1,,}}</tool_call>',
     '<tool_call>{"name": "a", "arguments": {"x": 1,,}}</tool_call>', []),  # malformed
    ("hermes", '<tool_call>{"arguments": {"x": 1}}</tool_call>', '<tool_call>{"arguments": {"x": 1}}</tool_call>',
     []),  # no name
    ("llama3_json", f'{{"name": "get_weather", "parameters": {WEATHER}}}', "", [("get_weather", json.loads(WEATHER))]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {"q": 1}}; {"name": "b", "parameters": {}}', "",
     [("a", {"q": 1}), ("b", {})]),
    ("llama3_json", "The answer is {not json}", "The answer is {not json}", []),
    ("llama3_json", '{"name": "a", "parameters": {"q": 1}} trailing', '{"name": "a", "parameters": {"q": 1}} trailing',
     []),
    ("llama3_json", '{"name": "a", "parameters": "{\\"q\\": 1}"}', "", [("a", {"q": 1})]),  # arguments as a string
    ("mistral", f'Sure.[TOOL_CALLS][{{"name": "get_weather", "arguments": {WEATHER}}}, {{"name": "b", '
                f'"arguments": {{}}}}]', "Sure.", [("get_weather", json.loads(WEATHER)), ("b", {})]),
    ("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {"x": [1, 2', '[TOOL_CALLS][{"name": "a", "arguments": {"x": [1, 2',
     []),
    ("mistral", "[TOOL_CALLS]oops", "[TOOL_CALLS]oops", []),
    ("mistral", f'Hi[TOOL_CALLS]get_weather[ARGS]{WEATHER}[TOOL_CALLS]b[ARGS]{{}}', "Hi",
     [("get_weather", json.loads(WEATHER)), ("b", {})]),  # v11 tokenizers
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Par', '[TOOL_CALLS]get_weather[ARGS]{"city": "Par', []),
    ("mistral", "[TOOL_CALLS]get weather[ARGS]{}", "[TOOL_CALLS]get weather[ARGS]{}", []),
    ("mistral", "[TOOL_CALLS]f[ARGS]{} and more", "[TOOL_CALLS]f[ARGS]{} and more", []),
    ("mistral", "plain [TOOL", "plain [TOOL", []),
]


def stream(parse, text: str, step: int, max_calls=None) -> tuple[str, list[tuple[str, str]], list[dict]]:
    s = ToolCallStream(parse, max_calls)
    content, calls, deltas = "", [], []
    pieces = [text[i:i + step] for i in range(0, len(text), step)] or [""]
    for k, piece in enumerate(pieces):
        c, ds = s.push(piece, final=k == len(pieces) - 1)
        content += c
        deltas += ds
        for d in ds:
            if "id" in d:
                assert d["index"] == len(calls) and d["function"]["arguments"] == ""  # id and name come first
                calls.append((d["function"]["name"], ""))
            else:
                name, args = calls[d["index"]]
                calls[d["index"]] = (name, args + d["function"]["arguments"])
    return content, calls, deltas


@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_tool_call_parsers(parser, text, content, calls):
    parse = TOOL_CALL_PARSERS[parser]
    got_content, got_calls = extract(parse, text)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == calls
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in got_calls)
    for step in (1, 2, 3, 7, len(text)):
        s_content, s_calls, _ = stream(parse, text, step)
        if calls:  # streamed fragments concatenate to exactly the non-streamed arguments
            assert s_content == content
            assert s_calls == [(c["function"]["name"], c["function"]["arguments"]) for c in got_calls]
        elif not s_calls:  # nothing began as a call: all of it is content
            assert s_content == text


def test_half_finished_call_streams_without_error():
    """A call cut off after its name has begun on the stream: it cannot be taken back, the rest is dropped,
    and nothing raises."""
    text = '<tool_call>{"name": "a", "arguments": {"x": 1'
    content, calls, _ = stream(TOOL_CALL_PARSERS["hermes"], text, 4)
    assert content == "" and calls == [("a", '{"x": 1')]
    assert extract(TOOL_CALL_PARSERS["hermes"], text) == (text, [])


def test_parallel_tool_calls_false_keeps_the_first():
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'
    _, calls = extract(TOOL_CALL_PARSERS["hermes"], text, max_calls=1)
    assert [c["function"]["name"] for c in calls] == ["a"]
    assert [n for n, _ in stream(TOOL_CALL_PARSERS["hermes"], text, 5, max_calls=1)[1]] == ["a"]


def test_forced_formats():
    text = '[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {"b": [true]}}]'
    content, calls = extract(required, text)
    assert content == "" and [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
        [("f", '{"a": 1}'), ("g", '{"b": [true]}')]
    assert stream(required, text, 3)[1] == [("f", '{"a": 1}'), ("g", '{"b": [true]}')]
    assert extract(required, '[{"name": "f", "parameters": {"a": ')[1] == []  # cut off by max_tokens
    parse = named("f")
    assert extract(parse, '{"a": 1}')[1][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert extract(parse, '{"a": ')[1] == []
    assert stream(parse, '{"a": 1}', 2)[1] == [("f", '{"a": 1}')]


REASONING = [
    # (parser, prompt tail, output, reasoning, content)
    ("qwen3", "<|im_start|>assistant\n", "<think>\nI should add.\n</think>\n\nIt is 4.", "I should add.\n", "It is 4."),
    ("qwen3", "<|im_start|>assistant\n<think>\n", "Adding.</think>4", "Adding.", "4"),
    ("qwen3", "<|im_start|>assistant\n<think>\n\n</think>\n\n", "It is 4.", "", "It is 4."),  # thinking off
    ("qwen3", "<|im_start|>assistant\n", "It is 4, no <think> here", "", "It is 4, no <think> here"),
    ("qwen3", "<|im_start|>assistant\n", "<think>still thinking when cut off", "still thinking when cut off", ""),
    ("deepseek_r1", "<｜Assistant｜><think>\n", "Hmm. </think>The answer: 4", "Hmm. ", "The answer: 4"),
    ("deepseek_r1", "<｜Assistant｜><think>\n", "<think>Hmm.</think>4", "Hmm.", "4"),
    ("deepseek_r1", "<｜Assistant｜><think>\n", "no end tag </thin", "no end tag </thin", ""),
    ("deepseek_r1", "<｜Assistant｜><think>\n\n</think>", "just the answer", "", "just the answer"),
]


@pytest.mark.parametrize("parser, prompt, text, reasoning, content", REASONING)
def test_reasoning_parsers(parser, prompt, text, reasoning, content):
    p = REASONING_PARSERS[parser]
    thinking = p.thinking_at_start(prompt)
    assert p.split(text, thinking, final=True) == (reasoning, content)
    for step in (1, 2, 5, len(text)):
        s = ReasoningStream(p, thinking)
        pieces = [text[i:i + step] for i in range(0, len(text), step)]
        got = [s.push(x, final=k == len(pieces) - 1) for k, x in enumerate(pieces)]
        assert ("".join(r for r, _ in got), "".join(c for _, c in got)) == (reasoning, content)


def test_constraint_waits_for_thinking_unless_the_prompt_closed_it():
    for p in REASONING_PARSERS.values():
        assert p.expects_thinking("<|im_start|>assistant\n")
        assert not p.expects_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")

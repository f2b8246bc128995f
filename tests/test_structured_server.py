"""Structured outputs, tool calling and reasoning through the openai SDK against a real `python -m server` on the
demo model's random weights (constrained decoding must still give valid output), with a chat template in the
style of Qwen3's (tools, tool calls and results, enable_thinking) and `--tool-call-parser hermes
--enable-auto-tool-choice --reasoning-parser qwen3`. The template thinks only when asked
(chat_template_kwargs={"enable_thinking": True}), so by default the answer starts at once."""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
from types import SimpleNamespace

import httpx
import jsonschema
import openai
import pydantic
import pytest
from server_utils import ServerProcess

MODEL = "halffull-demo"
TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>\nTools:{% for t in tools %} {{ t['function']['name'] }}"
    "{% if t['function']['description'] %} ({{ t['function']['description'] }}){% endif %}"
    "{{ t['function']['parameters'] | tojson }}{% endfor %}\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m.get('name') %}({{ m['name'] }}){% endif %}\n"
    "{% if m.get('reasoning_content') %}<think>{{ m['reasoning_content'] }}</think>{% endif %}{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call {{ c['id'] }}>{\"name\": \"{{ c['function']['name'] }}\", \"arguments\": "
    "{{ c['function']['arguments'] | tojson }}}</tool_call>{% endfor %}"
    "{% if m.get('tool_call_id') %}[result of {{ m['tool_call_id'] }}]{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% if enable_thinking %}<think>\n{% else %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}")
USER = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from engine.demo import ensure_demo_model
    model = tmp_path_factory.mktemp("model")
    for f in ensure_demo_model().iterdir():
        if f.name != "chat_template.jinja":
            (model / f.name).symlink_to(f)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").unlink()
    (model / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": TEMPLATE}))
    s = ServerProcess("--model", str(model), "--served-model-name", MODEL, "--workers", "1", "--num-kv-blocks", "512",
                      "--max-model-len", "1024", "--max-num-seqs", "64", "--enable-auto-tool-choice",
                      "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3")
    yield s
    assert s.stop() == 0, s.output()
    assert "Traceback" not in s.output(), s.output()
    shutil.rmtree(model, ignore_errors=True)


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def bad_request(call, param: str):
    with pytest.raises(openai.BadRequestError) as e:
        call()
    body = e.value.response.json()["error"]
    assert body["param"] == param, body
    return body["message"]


# ---- JSON schemas ---------------------------------------------------------------------------------------------
FORMATS = ["date", "time", "uuid", "ipv4"]


def gen_schema(rng: random.Random, depth: int = 0) -> dict:
    """A schema whose instances are short, so a random model fills one within max_tokens."""
    kinds = ["integer", "number", "enum", "string", "pattern", "format", "boolean", "null", "anyOf"]
    kind = rng.choice(kinds + ["object", "array"] * 2 if depth < 2 else kinds)
    if kind == "integer":
        lo = rng.randint(-100, 100)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 1000)}
    if kind == "number":
        return {"type": "number", "minimum": rng.choice([-10, 0]), "maximum": rng.choice([1, 50])}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, None, True, "a b"], rng.randint(1, 4))}
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(2, 8)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(["^[a-z]{2,4}$", "^[0-9]{3}-[A-Z]$", "^(yes|no)$"])}
    if kind == "format":
        return {"type": "string", "format": rng.choice(FORMATS)}
    if kind == "anyOf":
        return {"anyOf": [gen_schema(rng, depth + 1), gen_schema(rng, depth + 1)]}
    if kind == "array":
        lo = rng.randint(0, 1)
        return {"type": "array", "items": gen_schema(rng, depth + 1), "minItems": lo, "maxItems": lo + rng.randint(0, 2)}
    if kind == "object":
        return gen_object(rng, depth + 1)
    return {"type": kind}


def gen_object(rng: random.Random, depth: int) -> dict:
    names = rng.sample(["id", "name", "tags", "score", "kind", "when", "ok", "meta"], rng.randint(1, 3))
    props = {n: gen_schema(rng, depth) for n in names}
    return {"type": "object", "properties": props, "required": rng.sample(names, rng.randint(1, len(names))),
            "additionalProperties": False}


SCHEMAS = [gen_object(random.Random(i), 0) for i in range(200)]


def validator(schema: dict) -> jsonschema.Validator:
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def test_200_generated_schemas_streaming_and_not(server):
    """Half the schemas through chat's response_format, half through completions' structured_outputs; each
    streamed and not."""
    async def one(client, i: int, schema: dict, stream: bool) -> tuple[str, str]:
        if i % 2:
            kw = dict(messages=USER, response_format={"type": "json_schema",
                                                      "json_schema": {"name": f"s{i}", "schema": schema}})
            create, text_of = client.chat.completions.create, lambda c: c.message.content
            delta_of = lambda c: c.delta.content or ""
        else:
            kw = dict(prompt="x", extra_body={"structured_outputs": {"json": schema}})
            create, text_of, delta_of = client.completions.create, lambda c: c.text, lambda c: c.text
        out = await create(model=MODEL, max_tokens=400, temperature=1.0, seed=i, stream=stream, **kw)
        if not stream:
            return text_of(out.choices[0]), out.choices[0].finish_reason
        text, finish = "", None
        async for chunk in out:
            if chunk.choices:
                text += delta_of(chunk.choices[0])
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main():
        client = server.async_client(timeout=600)
        limit = asyncio.Semaphore(64)

        async def bounded(*args):
            async with limit:
                return await one(client, *args)
        return await asyncio.gather(*(bounded(i, s, stream) for i, s in enumerate(SCHEMAS) for stream in (False, True)))
    results = asyncio.run(main())
    failures = []
    for k, (text, finish) in enumerate(results):
        schema = SCHEMAS[k // 2]
        try:
            assert finish == "stop", finish
            errors = [e.message for e in validator(schema).iter_errors(json.loads(text))]
            assert not errors, errors
        except (AssertionError, ValueError) as e:
            failures.append((k // 2, "stream" if k % 2 else "once", schema, text, str(e)))
    assert not failures, f"{len(failures)} of {len(results)} failed, e.g. {failures[:3]}"


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=8)
    days: int = pydantic.Field(ge=1, le=7)
    sunny: bool


def test_sdk_parse_with_a_pydantic_model(client):
    out = client.chat.completions.parse(model=MODEL, messages=USER, response_format=Weather, max_tokens=100)
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, Weather) and 1 <= parsed.days <= 7


def test_json_object(client):
    out = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=300, seed=3,
                                         response_format={"type": "json_object"})
    if out.choices[0].finish_reason == "stop":  # an open-ended object may not close within max_tokens
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    else:
        assert out.choices[0].message.content.lstrip().startswith("{")
    out = client.completions.create(model=MODEL, prompt="o", max_tokens=300, seed=3,
                                    extra_body={"structured_outputs": {"json_object": True}})
    assert out.choices[0].text.lstrip().startswith("{")
    text = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, response_format={"type": "text"},
                                          temperature=0, extra_body={"ignore_eos": True})
    assert text.usage.completion_tokens == 5  # type text: no constraint, so ignore_eos is fine


@pytest.mark.parametrize("pattern", [r"[a-c]{3}-[0-9]{2}", r"(cat|dog)s?", r"\d{4}-\d{2}-\d{2}", r"[A-Z][a-z]{0,5}!"])
def test_regex_full_match(client, pattern):
    for stream in (False, True):
        out = client.completions.create(model=MODEL, prompt="r", max_tokens=30, stream=stream, seed=1,
                                        extra_body={"structured_outputs": {"regex": pattern}})
        text = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
        assert re.fullmatch(pattern, text), text
    chat = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=30,
                                          extra_body={"structured_outputs": {"regex": pattern}})
    assert re.fullmatch(pattern, chat.choices[0].message.content)


def test_choice_and_grammar(client):
    options = ["red", "green", "blue jeans"]
    for seed in range(4):
        out = client.completions.create(model=MODEL, prompt="c", max_tokens=10, seed=seed,
                                        extra_body={"structured_outputs": {"choice": options}})
        assert out.choices[0].text in options
    grammar = 'start: "yes" | "no" | "maybe " NUM\nNUM: /[0-9]/'
    out = client.completions.create(model=MODEL, prompt="g", max_tokens=10, n=4, seed=1,
                                    extra_body={"structured_outputs": {"grammar": grammar}})
    assert all(re.fullmatch(r"yes|no|maybe [0-9]", c.text) for c in out.choices), [c.text for c in out.choices]


def test_constraint_errors_are_400_before_streaming(client):
    bad = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}}
    for stream in (False, True):
        bad_request(lambda: client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=5, stream=stream,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}}), "response_format")
    for so in ({}, {"regex": "a", "choice": ["b"]}, {"choice": []}, {"json": "{not json"}, {"grammar": ""}):
        bad_request(lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=5,
                                                      extra_body={"structured_outputs": so}),
                    "structured_outputs.json" if "json" in so else
                    "structured_outputs.choice" if so.get("choice") == [] else
                    "structured_outputs.grammar" if "grammar" in so else "structured_outputs")
    bad_request(lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=5, extra_body={
        "structured_outputs": {"regex": "a+"}, "ignore_eos": True}), "ignore_eos")
    bad_request(lambda: client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, extra_body={
        "structured_outputs": {"regex": "a+"}}, response_format={"type": "json_object"}), "structured_outputs")
    bad_request(lambda: client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5,
                                                       response_format={"type": "json_schema",
                                                                        "json_schema": {"name": "x"}}),
                "response_format.json_schema")


# ---- tools ----------------------------------------------------------------------------------------------------
def streamed_calls(stream) -> tuple[dict, str | None]:
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        finish = c.finish_reason or finish
        for d in c.delta.tool_calls or []:
            if d.id is not None:  # id and name first, arguments after
                assert d.index not in calls and d.function.name and not d.function.arguments
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            else:
                calls[d.index]["arguments"] += d.function.arguments
    return calls, finish


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_forced_tool_calls_validate_and_stream_the_same(client, choice):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    kw = dict(model=MODEL, messages=USER, tools=TOOLS, tool_choice=choice, max_tokens=120, temperature=0,
              parallel_tool_calls=False)
    out = client.chat.completions.create(**kw)
    c = out.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    if isinstance(choice, dict):
        assert call.function.name == "get_time"
    validator(schemas[call.function.name]).validate(json.loads(call.function.arguments))
    streamed, finish = streamed_calls(client.chat.completions.create(**kw, stream=True))
    assert finish == "tool_calls"
    assert [(x["name"], x["arguments"]) for x in streamed.values()] == [(call.function.name, call.function.arguments)]


def test_required_allows_parallel_calls(client):
    out = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                         max_tokens=400, seed=5)
    c = out.choices[0]
    if c.finish_reason == "tool_calls":
        assert len(c.message.tool_calls) >= 1
        assert len({t.id for t in c.message.tool_calls}) == len(c.message.tool_calls)
    else:  # cut off by max_tokens: the text as it came, never half a call
        assert c.finish_reason == "length" and c.message.tool_calls is None


def test_tool_choice_auto_and_none(client):
    """auto: the hermes parser reads the output (random weights write no <tool_call>: plain content); none: no
    parsing at all."""
    for choice in ("auto", None, "none"):
        out = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, max_tokens=10, temperature=0,
                                             **({"tool_choice": choice} if choice else {}))
        assert out.choices[0].message.tool_calls is None and out.choices[0].message.content
    bad_request(lambda: client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, tool_choice="auto"),
                "tool_choice")
    bad_request(lambda: client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, max_tokens=5,
        tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice")


def test_auto_tool_choice_needs_the_flags():
    import msgspec

    from server.chat import tool_mode
    from server.protocol import ChatCompletionRequest, Tool
    body = msgspec.convert({"messages": USER, "tools": TOOLS}, ChatCompletionRequest)
    off = SimpleNamespace(config=SimpleNamespace(enable_auto_tool_choice=False, tool_call_parser=None))
    with pytest.raises(Exception, match="--enable-auto-tool-choice"):
        tool_mode(off, body)
    assert tool_mode(off, msgspec.structs.replace(body, tool_choice="required")) == "required"
    assert isinstance(body.tools[0], Tool)


def test_tools_and_history_reach_the_template(server, client):
    """Tool definitions, assistant tool_calls, tool results, names and earlier reasoning all render."""
    history = [{"role": "user", "content": "weather?", "name": "ann"},
               {"role": "assistant", "content": "", "reasoning": "look it up",
                "tool_calls": [{"id": "call_1", "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "rain"}]
    tokens = httpx.post(server.url + "/tokenize", json={"messages": history, "tools": TOOLS}).json()["tokens"]
    text = httpx.post(server.url + "/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert 'Tools: get_weather (the weather in a city){"' in text and "get_time" in text
    assert "<|user|>(ann)" in text and "<think>look it up</think>" in text
    assert '<tool_call call_1>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}</tool_call>' in text
    assert "<|tool|>rain[result of call_1]" in text  # (the template environment trims a newline after a tag)
    out = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=3)
    assert out.usage.prompt_tokens == len(tokens)
    bad_request(lambda: client.chat.completions.create(model=MODEL, max_tokens=3, messages=[
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function",
                                                             "function": {"name": "f", "arguments": "{no"}}]}]),
        "messages[0].tool_calls")
    bad_request(lambda: client.chat.completions.create(model=MODEL, max_tokens=3, messages=[
        {"role": "user", "content": "x", "tool_call_id": "c"}]), "messages[0].tool_call_id")
    for bad in ({"tools": [{"type": "browser", "function": TIME["function"]}]},
                {"tools": TOOLS, "tool_choice": {"type": "browser", "function": {"name": "get_time"}}},
                {"messages": [{"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c", "type": "browser", "function": {"name": "f", "arguments": "{}"}}]}]},
                {"messages": [{"role": "wizard", "content": "x"}]}):
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2} | bad)
        assert r.status_code == 400, r.text


# ---- reasoning ------------------------------------------------------------------------------------------------
def test_reasoning_split_and_enable_thinking(client):
    think = dict(model=MODEL, messages=USER, max_tokens=12, temperature=0, extra_body={
        "chat_template_kwargs": {"enable_thinking": True}, "ignore_eos": True})
    out = client.chat.completions.create(**think)
    m = out.choices[0].message
    # Random weights never close the block: all of it is thinking.
    assert m.reasoning and not m.content
    chunks = list(client.chat.completions.create(**think, stream=True))
    assert "".join(getattr(c.choices[0].delta, "reasoning", None) or "" for c in chunks if c.choices) == m.reasoning
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)
    off = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0, extra_body={
        "chat_template_kwargs": {"enable_thinking": False}, "ignore_eos": True}).choices[0].message
    assert off.content and off.reasoning is None
    bad_request(lambda: client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, extra_body={
        "chat_template_kwargs": {"tools": []}}), "chat_template_kwargs")


def test_structured_output_waits_for_the_end_of_thinking(client):
    """With thinking on, the constraint starts after </think>: the thinking itself is free text (a regex of
    digits does not hold there); with thinking off, the answer follows it from the first token."""
    regex = {"structured_outputs": {"regex": "[0-9]{6}"}}
    on = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0, extra_body={
        **regex, "chat_template_kwargs": {"enable_thinking": True}}).choices[0]
    assert on.finish_reason == "length" and not re.fullmatch("[0-9]*", on.message.reasoning)
    off = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0,
                                         extra_body=regex).choices[0]
    assert re.fullmatch("[0-9]{6}", off.message.content) and off.message.reasoning is None


# ---- other fields ---------------------------------------------------------------------------------------------
def test_logit_bias(client):
    out = client.completions.create(model=MODEL, prompt="b", max_tokens=8, seed=0, logit_bias={"65": 100},
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == "A" * 8  # the demo tokenizer: one token per byte
    banned = client.completions.create(model=MODEL, prompt="b", max_tokens=8, temperature=0, logit_bias={
        str(t): -100 for t in range(256) if t != ord("z")}, extra_body={"ignore_eos": True})
    assert set(banned.choices[0].text) <= {"z"} or banned.choices[0].text == ""
    for bias in ({"260": 1}, {"-1": 1}, {"x": 1}, {"65": 101}):
        bad_request(lambda: client.completions.create(model=MODEL, prompt="b", max_tokens=2,
                                                      logit_bias=bias), "logit_bias")


def test_priority_needs_a_scheduler_that_reads_it(client):
    msg = bad_request(lambda: client.completions.create(model=MODEL, prompt="p", max_tokens=2,
                                                        extra_body={"priority": 1}), "priority")
    assert "--scheduler priority" in msg
    assert client.completions.create(model=MODEL, prompt="p", max_tokens=2, extra_body={"priority": 0}).choices
    from server.serving import check_priority
    check_priority(SimpleNamespace(config=SimpleNamespace(honors_priority=True, scheduler="priority")), 5)


def test_unknown_and_refused_fields_are_400(client):
    bad_request(lambda: client.completions.create(model=MODEL, prompt="p", max_tokens=2, best_of=2), "best_of")
    for slo in ("slo_ttft_ms", "slo_tbt_ms"):  # read by SLO-aware schedulers; a target must be positive
        bad_request(lambda: client.completions.create(model=MODEL, prompt="p", max_tokens=2,  # noqa: B023
                                                      extra_body={slo: 0}), slo)
    bad_request(lambda: client.completions.create(model=MODEL, prompt="p", max_tokens=2, extra_body={"best_off": 1}),
                "best_off")
    bad_request(lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x",
                                                                               "colour": 1}], max_tokens=2),
                "messages")


def test_sampling_fields_have_their_effect(server, client):
    def text(**kw):
        args = {"max_tokens": 24, "seed": 3, "extra_body": {"ignore_eos": True}} | kw
        return client.completions.create(model=MODEL, prompt="effects", **args).choices[0].text
    greedy = text(temperature=0)
    assert text(temperature=1.0, top_p=1e-9) == greedy  # top_p keeps only the top token
    assert text(temperature=1.0, extra_body={"ignore_eos": True, "top_k": 1}) == greedy
    assert text(temperature=1.0, extra_body={"ignore_eos": True, "min_p": 1.0}) == greedy
    long = text(temperature=0, max_tokens=120)  # long enough to repeat tokens, which the penalties then avoid
    assert text(temperature=0, max_tokens=120, frequency_penalty=2.0) != long
    assert text(temperature=0, max_tokens=120, presence_penalty=2.0) != long
    assert text(temperature=0, max_tokens=120, extra_body={"ignore_eos": True, "repetition_penalty": 2.0}) != long
    # <|pad|> (258) is special: skipped from the text unless skip_special_tokens is false.
    pad = dict(temperature=0, max_tokens=2, logit_bias={"258": 100})
    assert text(**pad) == "" and text(**pad, extra_body={"ignore_eos": True, "skip_special_tokens": False}) == \
        "<|pad|><|pad|>"
    # The chat template's generation prompt is the prompt's last tokens.
    with_prompt = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1).usage.prompt_tokens
    without = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1,
                                             extra_body={"add_generation_prompt": False}).usage.prompt_tokens
    assert with_prompt - without == len("<|assistant|>\n<think>\n\n</think>\n\n")
    chunks = list(client.completions.create(model=MODEL, prompt="u", max_tokens=4, stream=True, temperature=0,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True},
                                            extra_body={"ignore_eos": True}))
    running = [c.usage.completion_tokens for c in chunks if c.choices]  # usage so far on every chunk
    assert running == sorted(running) and running[-1] == 4 and chunks[-1].usage.completion_tokens == 4


def test_metadata_fields_are_accepted_and_documented(client):
    from server_utils import ROOT
    out = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, user="u1", store=False,
                                         metadata={"k": "v"})
    assert out.choices
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("Accepted metadata"):][:400]
    for name in ("`user`", "`metadata`", "`store`", "`json_schema.name`", "`json_schema.description`", "`strict`"):
        assert name in section, name


# ---- no field silently ignored --------------------------------------------------------------------------------
_OPENAI = "test_server_openai.py"
_HERE = "test_structured_server.py"
# Every field of every request schema the server publishes -> the test that shows its effect (or its 400, or,
# for accepted metadata, that the README documents it).
FIELD_TESTS = {
    "CompletionRequest.model": (_OPENAI, "test_error_statuses"),
    "CompletionRequest.n": (_OPENAI, "test_n_and_seed"),
    "CompletionRequest.stream": (_OPENAI, "test_streaming_equals_non_streaming_completions"),
    "CompletionRequest.stream_options": (_OPENAI, "test_streaming_equals_non_streaming_completions"),
    "CompletionRequest.stop": (_OPENAI, "test_stop_strings_cut_text"),
    "CompletionRequest.temperature": (_OPENAI, "test_n_and_seed"),
    "CompletionRequest.top_p": (_HERE, "test_sampling_fields_have_their_effect"),
    "CompletionRequest.presence_penalty": (_HERE, "test_sampling_fields_have_their_effect"),
    "CompletionRequest.frequency_penalty": (_HERE, "test_sampling_fields_have_their_effect"),
    "CompletionRequest.seed": (_OPENAI, "test_n_and_seed"),
    "CompletionRequest.user": (_HERE, "test_metadata_fields_are_accepted_and_documented"),
    "CompletionRequest.logit_bias": (_HERE, "test_logit_bias"),
    "CompletionRequest.top_k": (_HERE, "test_sampling_fields_have_their_effect"),
    "CompletionRequest.min_p": (_HERE, "test_sampling_fields_have_their_effect"),
    "CompletionRequest.repetition_penalty": (_HERE, "test_sampling_fields_have_their_effect"),
    "CompletionRequest.ignore_eos": (_OPENAI, "test_streaming_equals_non_streaming_completions"),
    "CompletionRequest.min_tokens": (_OPENAI, "test_vllm_extensions_accepted"),
    "CompletionRequest.stop_token_ids": (_OPENAI, "test_vllm_extensions_accepted"),
    "CompletionRequest.skip_special_tokens": (_HERE, "test_sampling_fields_have_their_effect"),
    "CompletionRequest.priority": (_HERE, "test_priority_needs_a_scheduler_that_reads_it"),
    "CompletionRequest.slo_ttft_ms": (_HERE, "test_unknown_and_refused_fields_are_400"),
    "CompletionRequest.slo_tbt_ms": (_HERE, "test_unknown_and_refused_fields_are_400"),
    "CompletionRequest.structured_outputs": (_HERE, "test_200_generated_schemas_streaming_and_not"),
    "CompletionRequest.prompt": (_OPENAI, "test_token_id_prompts_and_prompt_lists"),
    "CompletionRequest.max_tokens": (_OPENAI, "test_streaming_equals_non_streaming_completions"),
    "CompletionRequest.echo": (_OPENAI, "test_echo_with_max_tokens_zero_scores_prompt"),
    "CompletionRequest.logprobs": (_OPENAI, "test_completion_logprobs"),
    "CompletionRequest.suffix": (_OPENAI, "test_error_statuses"),
    "CompletionRequest.best_of": (_HERE, "test_unknown_and_refused_fields_are_400"),
    "StreamOptions.include_usage": (_OPENAI, "test_streaming_equals_non_streaming_completions"),
    "StreamOptions.continuous_usage_stats": (_HERE, "test_sampling_fields_have_their_effect"),
    "StructuredOutputsRequest.json": (_HERE, "test_200_generated_schemas_streaming_and_not"),
    "StructuredOutputsRequest.json_object": (_HERE, "test_json_object"),
    "StructuredOutputsRequest.regex": (_HERE, "test_regex_full_match"),
    "StructuredOutputsRequest.choice": (_HERE, "test_choice_and_grammar"),
    "StructuredOutputsRequest.grammar": (_HERE, "test_choice_and_grammar"),
    "ChatCompletionRequest.messages": (_OPENAI, "test_streaming_equals_non_streaming_chat"),
    "ChatCompletionRequest.max_completion_tokens": (_OPENAI, "test_streaming_equals_non_streaming_chat"),
    "ChatCompletionRequest.logprobs": (_OPENAI, "test_chat_logprobs"),
    "ChatCompletionRequest.top_logprobs": (_OPENAI, "test_chat_logprobs"),
    "ChatCompletionRequest.tools": (_HERE, "test_tools_and_history_reach_the_template"),
    "ChatCompletionRequest.tool_choice": (_HERE, "test_forced_tool_calls_validate_and_stream_the_same"),
    "ChatCompletionRequest.parallel_tool_calls": (_HERE, "test_forced_tool_calls_validate_and_stream_the_same"),
    "ChatCompletionRequest.response_format": (_HERE, "test_200_generated_schemas_streaming_and_not"),
    "ChatCompletionRequest.chat_template_kwargs": (_HERE, "test_reasoning_split_and_enable_thinking"),
    "ChatCompletionRequest.add_generation_prompt": (_HERE, "test_sampling_fields_have_their_effect"),
    "ChatCompletionRequest.metadata": (_HERE, "test_metadata_fields_are_accepted_and_documented"),
    "ChatCompletionRequest.store": (_HERE, "test_metadata_fields_are_accepted_and_documented"),
    "ChatMessage.role": (_HERE, "test_tools_and_history_reach_the_template"),
    "ChatMessage.content": (_HERE, "test_tools_and_history_reach_the_template"),
    "ChatMessage.name": (_HERE, "test_tools_and_history_reach_the_template"),
    "ChatMessage.tool_calls": (_HERE, "test_tools_and_history_reach_the_template"),
    "ChatMessage.tool_call_id": (_HERE, "test_tools_and_history_reach_the_template"),
    "ChatMessage.reasoning": (_HERE, "test_tools_and_history_reach_the_template"),
    "ToolCall.id": (_HERE, "test_tools_and_history_reach_the_template"),
    "ToolCall.type": (_HERE, "test_tools_and_history_reach_the_template"),
    "ToolCall.function": (_HERE, "test_tools_and_history_reach_the_template"),
    "FunctionCall.name": (_HERE, "test_tools_and_history_reach_the_template"),
    "FunctionCall.arguments": (_HERE, "test_tools_and_history_reach_the_template"),
    "Tool.type": (_HERE, "test_tools_and_history_reach_the_template"),
    "Tool.function": (_HERE, "test_tools_and_history_reach_the_template"),
    "FunctionDefinition.name": (_HERE, "test_forced_tool_calls_validate_and_stream_the_same"),
    "FunctionDefinition.description": (_HERE, "test_tools_and_history_reach_the_template"),
    "FunctionDefinition.parameters": (_HERE, "test_forced_tool_calls_validate_and_stream_the_same"),
    "FunctionDefinition.strict": (_HERE, "test_metadata_fields_are_accepted_and_documented"),
    "NamedToolChoice.type": (_HERE, "test_tools_and_history_reach_the_template"),
    "NamedToolChoice.function": (_HERE, "test_forced_tool_calls_validate_and_stream_the_same"),
    "FunctionName.name": (_HERE, "test_tool_choice_auto_and_none"),
    "ResponseFormat.type": (_HERE, "test_json_object"),
    "ResponseFormat.json_schema": (_HERE, "test_constraint_errors_are_400_before_streaming"),
    "JSONSchema.name": (_HERE, "test_metadata_fields_are_accepted_and_documented"),
    "JSONSchema.description": (_HERE, "test_metadata_fields_are_accepted_and_documented"),
    "JSONSchema.schema": (_HERE, "test_sdk_parse_with_a_pydantic_model"),
    "JSONSchema.strict": (_HERE, "test_metadata_fields_are_accepted_and_documented"),
}
# Fields both endpoints share are covered once, under CompletionRequest.
_SHARED = "model n stream stream_options stop temperature top_p presence_penalty frequency_penalty seed user " \
          "logit_bias top_k min_p repetition_penalty ignore_eos min_tokens stop_token_ids skip_special_tokens " \
          "priority slo_ttft_ms slo_tbt_ms structured_outputs max_tokens".split()


def request_fields(spec: dict) -> set[str]:
    """Schema.field for every field reachable from the generation endpoints' request bodies."""
    schemas, seen, out = spec["components"]["schemas"], set(), set()

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None:
                name = ref.rsplit("/", 1)[1]
                if name not in seen:
                    seen.add(name)
                    out.update(f"{name}.{f}" for f in schemas[name].get("properties", {}))
                    walk(schemas[name])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    for path in ("/v1/completions", "/v1/chat/completions"):
        walk(spec["paths"][path]["post"]["requestBody"])
    return out


def test_every_request_field_has_a_test(server):
    import ast

    from server_utils import ROOT
    fields = request_fields(httpx.get(server.url + "/openapi.json").json())
    table = dict(FIELD_TESTS) | {f"ChatCompletionRequest.{f}": FIELD_TESTS[f"CompletionRequest.{f}"]
                                 for f in _SHARED if f"ChatCompletionRequest.{f}" not in FIELD_TESTS}
    assert not fields - table.keys(), f"fields with no test: {sorted(fields - table.keys())}"
    assert not table.keys() - fields, f"the table names fields the server no longer has: {sorted(table.keys() - fields)}"
    defined: dict[str, set[str]] = {}
    for file, test in table.values():
        if file not in defined:
            tree = ast.parse((ROOT / "tests" / file).read_text())
            defined[file] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert test in defined[file], f"{file}::{test} does not exist"

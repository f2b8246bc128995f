"""Hostile input and security defaults. The fuzz is driven by the OpenAPI description the server publishes:
every field of each request schema gets values at and past the edges of its schema, values of any type, and
bytes that are not valid JSON; then bodies with several fields changed, and bodies that are not objects.
Every case must get a success or a 4xx in OpenAI's error shape, never a 5xx, with the server still serving
and, at the end, no KV block leaked."""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, note, settings

from harness import (VALID, VOCAB, Footprint, body_with, check_answer, check_error_shape, field_values, hostile_body,
                     js, wait_idle)
from server_utils import ROOT, ServerProcess

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 256 << 10
# Cases per endpoint: PER_FIELD for each of its ~32 fields, plus MIXED.
PER_FIELD, MIXED = int(os.environ.get("HALFFULL_FUZZ_PER_FIELD", "4")), int(os.environ.get("HALFFULL_FUZZ_MIXED", "60"))


def fuzz_settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--workers", "2", "--num-kv-blocks", "128", "--max-model-len", "64", "--api-key", KEY,
                      "--protect-metrics", "--max-request-body-bytes", str(BODY_LIMIT))
    yield s
    assert s.stop() == 0, s.output()
    assert "Traceback" not in s.output(), s.output()  # no exception escaped anywhere


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def post(http, path: str, body: bytes) -> httpx.Response:
    return http.post(path, content=body, headers={"content-type": "application/json"})


def check_case(server, http, path: str, body: bytes) -> None:
    note(f"body: {body[:300]!r}")
    check_answer(post(http, path, body))
    assert http.get("/health").status_code == 200, server.output()[-3000:]


@pytest.mark.parametrize("path", sorted(VALID))
def test_fuzz_each_field(server, http, path):
    fields = field_values(http.get("/openapi.json").json(), path)
    assert {"n", "stop", "logprobs", "max_tokens", "temperature"} <= set(fields)
    for name, values in fields.items():
        @fuzz_settings(PER_FIELD)
        @given(value=values)
        def case(value):
            check_case(server, http, path, body_with(path, {name: value}))
        case()
    wait_idle(server.url, workers=2, headers=AUTH)


@pytest.mark.parametrize("path", sorted(VALID))
def test_fuzz_mixed(server, http, path):
    fields = field_values(http.get("/openapi.json").json(), path)

    @fuzz_settings(MIXED)
    @given(body=hostile_body(path, fields))
    def case(body):
        check_case(server, http, path, body)
    case()
    wait_idle(server.url, workers=2, headers=AUTH)


valid = VALID["/v1/completions"]
CASES = {  # the hostile inputs the issue names, each certain to be sent
    "nan": b'{"prompt": "x", "temperature": NaN}',
    "inf": b'{"prompt": "x", "top_p": 1e999}',
    "huge int": b'{"prompt": "x", "seed": 100000000000000000000000000}',
    "negative": js(valid | {"max_tokens": -1}),
    "wrong type": js(valid | {"n": "2"}),
    "missing prompt": js({"model": "halffull-demo"}),
    "invalid utf-8": b'{"prompt": "\xff\xfe\xfd"}',
    "lone surrogate": b'{"prompt": "\\ud800"}',
    "deep nesting": b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "empty body": b"",
    "empty prompt": js(valid | {"prompt": ""}),
    "enormous prompt": js(valid | {"prompt": "x" * 200_000}),
    "token id past vocab": js(valid | {"prompt": [1, VOCAB]}),
    "negative token id": js(valid | {"prompt": [-1]}),
    "stop token id past vocab": js(valid | {"stop_token_ids": [VOCAB], "min_tokens": 2}),
    "too many stops": js(valid | {"stop": ["a"] * 17}),
    "stop too long": js(valid | {"stop": ["a" * 257]}),
    "n too big": js(valid | {"n": 17}),
    "logprobs too big": js(valid | {"logprobs": 21}),
    "top_k past int64": js(valid | {"top_k": 2**64 - 1}),
    "priority past int32": js(valid | {"priority": 2**31}),
    "negative slo": js(valid | {"slo_ttft_ms": -5}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_named_hostile_inputs_are_400(http, name):
    r = post(http, "/v1/completions", CASES[name])
    assert r.status_code == 400, r.text
    check_error_shape(r.json())


def test_chat_limits_are_400(http):
    chat = VALID["/v1/chat/completions"]
    for bad in ({"top_logprobs": 21, "logprobs": True}, {"messages": []}, {"n": 0},
                {"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]}):
        r = post(http, "/v1/chat/completions", js(chat | bad))
        assert r.status_code == 400, (bad, r.text)
        check_error_shape(r.json())


def test_enormous_text_refused_before_tokenizing(http):
    """Tokenizing holds the event loop for about a second per million characters: text that cannot fit the
    context is refused on its length alone."""
    text = "x" * (BODY_LIMIT - 1000)
    chat = VALID["/v1/chat/completions"] | {"messages": [{"role": "user", "content": text}]}
    for path, body in (("/v1/completions", js(valid | {"prompt": text})), ("/v1/chat/completions", js(chat))):
        r = post(http, path, body)
        assert r.status_code == 400 and "characters" in r.json()["error"]["message"], r.text[:300]


def test_oversized_body_is_413(server, http):
    body = js({"prompt": "x" * BODY_LIMIT})
    r = post(http, "/v1/completions", body)  # declared by Content-Length
    assert r.status_code == 413, r.text
    check_error_shape(r.json())
    r = http.post("/v1/completions", content=iter([body[:1000], body[1000:]]))  # chunked: counted as it arrives
    assert r.status_code == 413, r.text
    check_error_shape(r.json())
    assert post(http, "/v1/completions", js(valid)).status_code == 200


def test_openapi_describes_both_endpoints(server):
    spec = httpx.get(server.url + "/openapi.json").json()  # open, like /health
    assert spec["openapi"].startswith("3.")
    for path in VALID:
        op = spec["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        schema = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
        assert "n" in schema["properties"] and schema["properties"]["n"]["maximum"] == 16
        assert "4XX" in op["responses"]


# ---- security defaults ------------------------------------------------------------------------------------
def test_api_key_required_also_on_metrics(server):
    for path, method in (("/v1/completions", "POST"), ("/v1/models", "GET"), ("/metrics", "GET")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}x"},
                        {"Authorization": KEY}):
            r = httpx.request(method, server.url + path, headers=headers, content=js(valid))
            assert r.status_code == 401, (path, headers, r.text)
            check_error_shape(r.json())
        assert httpx.request(method, server.url + path, headers=AUTH, content=js(valid)).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200


def test_key_compared_in_constant_time():
    tree = ast.parse((ROOT / "server" / "app.py").read_text())
    guard = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "Guard")
    calls = {ast.unparse(n.func) for n in ast.walk(guard) if isinstance(n, ast.Call)}
    assert "hmac.compare_digest" in calls
    # No ordinary comparison touches the key.
    assert not [ast.unparse(n) for n in ast.walk(guard) if isinstance(n, ast.Compare) and "key" in ast.unparse(n)]


def test_binds_to_loopback_by_default(server):
    from server.cli import parse_args
    assert parse_args([]).host == "127.0.0.1"
    port = f"{server.port:04X}"
    listening = [line.split()[1] for table in ("tcp", "tcp6") if Path(f"/proc/net/{table}").exists()
                 for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]
                 if line.split()[1].endswith(":" + port) and line.split()[3] == "0A"]  # 0A: LISTEN
    assert listening == ["0100007F:" + port]


def test_segments_private_to_user(server):
    segments = Footprint.of(server.proc.pid).segments
    assert segments
    for name in segments:
        info = os.stat(f"/dev/shm/{name}")
        assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o600, (name, oct(info.st_mode))


WIRE = ("server", "balancer", "engine")
UNSAFE = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}


def test_no_pickle_on_the_wire():
    """Server, balancer and workers talk only through ShmQueue (msgspec msgpack of typed Structs): no module of
    theirs imports a pickle-like serializer or opens a multiprocessing Queue, Pipe or Manager. (Spawning a
    process passes its arguments pickled through a private pipe; no request ever travels that way.)"""
    offenders = []
    for part in WIRE:
        for path in (ROOT / part).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] + [a.name for a in node.names] if isinstance(node, ast.ImportFrom)
                         else [])
                if any(n.split(".")[0] in UNSAFE or n.split(".")[-1] in UNSAFE for n in names):
                    offenders.append(f"{path.relative_to(ROOT)}: import {names}")
                if isinstance(node, ast.Attribute) and node.attr in ("Queue", "SimpleQueue", "JoinableQueue", "Pipe",
                                                                      "Manager", "Listener", "Client"):
                    if ast.unparse(node.value) in ("mp", "multiprocessing", "self.ctx", "ctx"):
                        offenders.append(f"{path.relative_to(ROOT)}: {ast.unparse(node)}")
    assert offenders == []
    from engine.ipc import ShmQueue
    q = ShmQueue.create(1 << 12)
    try:
        q.put({"a": 1})
        assert bytes(q._ring[4:7]) == b"\x81\xa1a"  # msgpack map of one str key, not a pickle stream (0x80 ...)
    finally:
        q.close()
        q.unlink()

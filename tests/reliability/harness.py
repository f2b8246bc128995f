"""Client-side tools shared by the reliability suite and benchmarks/soak.py: hostile request bodies as raw
bytes (so that NaN, invalid UTF-8, lone surrogates and deep nesting really go over the wire), the check
that an answer is a success or an OpenAI-shaped 4xx, streams cut at chosen points, bursts, and the server's
footprint as /proc and /metrics show it (open fds, shared-memory segments, RSS, KV blocks per worker)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from hypothesis import strategies as st

MODEL = "halffull-demo"
VOCAB = 260  # the demo model's

# ---- hostile bodies ---------------------------------------------------------------------------------------


def js(value) -> bytes:
    """JSON as Python writes it: NaN stays NaN, a lone surrogate becomes the escape \\udXXX."""
    return json.dumps(value).encode()


# Raw JSON fragments no Python value encodes to, and sizes and depths that stress the parser.
RAW_VALUES = [
    b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1e-400", b"-0.0", b"1" * 400, b"18446744073709551616",
    b"-9223372036854775809", b'"\\ud800"', b'"x\\udfff"', b'"\\udc00\\ud800"', b'"\xff\xfe"', b'"\xed\xa0\x80"',
    b'"\xc0\xaf"', b'"\x00"', b'"\\u0000"', b'"' + b"x" * 200_000 + b'"', b"[" * 50_000 + b"]" * 50_000,
    b'{"a":' * 20_000 + b"1" + b"}" * 20_000, b"[" * 50 + b"]" * 50, b"", b"}", b'"unterminated',
]
OVERFLOW = [-2**63 - 1, -2**31 - 1, 2**31, 2**63, 2**64, 10**30]
any_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                        | st.text(max_size=20), lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
texts = st.one_of(st.text(max_size=60), st.sampled_from(["", " ", "x" * 5000, "\u0000", "\ud800", "\U0001f980" * 50]))
token_ids = st.lists(st.one_of(st.integers(-2, VOCAB + 2), st.sampled_from(OVERFLOW)), max_size=40)
# Values the schema cannot suggest: token-id prompts near the vocabulary's edges.
EXTRA = {"prompt": st.one_of(token_ids, st.lists(token_ids, max_size=4))}


def from_schema(schema: dict, defs: dict):
    """Values for one JSON-schema node, dense at its edges: just inside and just outside each bound, and the
    integers that overflow 32 and 64 bits."""
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[1]], defs)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, defs) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "integer":
        lo, hi = schema.get("minimum", -2**63), schema.get("maximum", 2**63 - 1)
        return st.one_of(st.integers(lo - 2, lo + 2), st.integers(hi - 2, hi + 2), st.integers(-3, 300),
                         st.sampled_from(OVERFLOW))
    if kind == "number":
        return st.one_of(st.floats(-3, 3), st.floats(allow_nan=False, allow_infinity=False),
                         st.sampled_from([0.0, -0.0, 1e-300, 1e-45, 1e308, -1e308, 2.0, 100.0, 101.0]))
    if kind == "string":
        n = schema.get("maxLength")
        return texts if n is None else st.one_of(texts, st.text(min_size=n, max_size=n + 1))
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        n = schema.get("maxItems", 4)
        return st.lists(from_schema(schema.get("items", {}), defs), max_size=n + 2)
    if kind == "object" and "properties" in schema:
        return st.fixed_dictionaries({}, optional={k: from_schema(v, defs) for k, v in schema["properties"].items()})
    return any_json


def field_values(spec: dict, path: str) -> dict:
    """For each field of `path`'s request schema in the OpenAPI description `spec`: raw JSON fragments of
    values its schema allows or nearly allows, of anything at all, and of bytes no value encodes to."""
    defs = spec["components"]["schemas"]
    ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    props = defs[ref["$ref"].rsplit("/", 1)[1]]["properties"]
    raw = st.sampled_from(RAW_VALUES)
    return {name: st.one_of(from_schema(prop, defs).map(js), EXTRA.get(name, st.nothing()).map(js),
                            any_json.map(js), raw)
            for name, prop in props.items()}


VALID = {  # bodies that are cheap to serve, which each case changes
    "/v1/completions": {"model": MODEL, "prompt": "hello", "max_tokens": 4, "temperature": 0.0},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
}


def body_with(path: str, fields: dict[str, bytes | None]) -> bytes:
    """The valid body of `path` with each of `fields` set to a raw JSON fragment (None: removed)."""
    frags = {k: js(v) for k, v in VALID[path].items()} | fields
    return b"{" + b",".join(js(k) + b":" + v for k, v in frags.items() if v is not None) + b"}"


@st.composite
def hostile_body(draw, path: str, fields: dict) -> bytes:
    """Several fields changed at once, removed or added; one time in ten, a body that is not an object."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.one_of(st.binary(max_size=200), st.sampled_from(RAW_VALUES), st.sampled_from(
            [b"[]", b"null", b"1", b'"x"', b"{}", js(VALID[path])[:-3], js(VALID[path]) * 2])))
    changes = {}
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["set", "set", "drop", "extra"]))
        if op == "extra":
            changes[draw(st.text(min_size=1, max_size=12))] = draw(st.sampled_from(RAW_VALUES) | any_json.map(js))
        else:
            name = draw(st.sampled_from(sorted(fields)))
            changes[name] = draw(fields[name]) if op == "set" else None
    return body_with(path, changes)


def check_error_shape(body) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err


def check_answer(r: httpx.Response) -> str:
    """'ok' for a complete success, '4xx' for an OpenAI-shaped client error; anything else fails."""
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        check_error_shape(r.json())
        return "4xx"
    assert r.status_code == 200, r.status_code
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [e[6:] for e in r.text.split("\n\n") if e.startswith("data: ")]
        assert events and events[-1] == "[DONE]", r.text[-500:]
        for e in events[:-1]:
            assert "error" not in json.loads(e), e  # an error after the 200 would be a 5xx in disguise
    else:
        assert r.json()["choices"], r.text[:500]
    return "ok"


# ---- the server's footprint ---------------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """`pid` and its children (workers, balancer, multiprocessing's resource tracker)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry.name))
            except (OSError, IndexError):
                continue
    return [pid] + kids


def running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def child_named(pid: int, name: str) -> int | None:
    for p in process_tree(pid)[1:]:
        try:
            if running(p) and Path(f"/proc/{p}/comm").read_text().strip() == name:
                return p
        except OSError:
            continue
    return None


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and its parts (RssAnon: the heap; RssFile; RssShmem: the queue rings' pages touched so far)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in lines
            if line.startswith(("VmRSS:", "RssAnon:", "RssFile:", "RssShmem:"))}


@dataclass
class Footprint:
    fds: int
    segments: frozenset[str]  # shared-memory segments mapped by any process of the tree
    rss_mb: float
    server: dict[str, float]  # memory_mb of the server process alone, the one that lives as long as the service

    @classmethod
    def of(cls, pid: int) -> Footprint:
        fds, segments, rss = 0, set(), 0.0
        for p in process_tree(pid):
            try:
                fds += len(os.listdir(f"/proc/{p}/fd"))
                segments |= {line.rsplit("/", 1)[1] for line in Path(f"/proc/{p}/maps").read_text().splitlines()
                             if "/dev/shm/halffull_" in line}
                rss += memory_mb(p)["VmRSS"]
            except OSError:
                continue
        return cls(fds, frozenset(segments), rss, memory_mb(pid))


def settled_footprint(pid: int, baseline: Footprint, timeout: float = 10.0) -> Footprint:
    """The footprint once closed connections are gone: polls until fds are back to `baseline` or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        fp = Footprint.of(pid)
        if fp.fds <= baseline.fds or time.monotonic() > deadline:
            return fp
        time.sleep(0.2)


def worker_metrics(url: str, headers: dict | None = None) -> dict[str, dict[str, float]]:
    """{metric: {worker or "": value}} from /metrics."""
    out: dict[str, dict[str, float]] = {}
    for line in httpx.get(url + "/metrics", headers=headers, timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            worker = rest.split('worker="', 1)[1].split('"', 1)[0] if 'worker="' in rest else ""
            out.setdefault(name.split(" ")[0], {})[worker] = float(line.rsplit(" ", 1)[1])
    return out


def leaked_blocks(m: dict) -> int:
    free, total = m.get("halffull:kv_cache_free_blocks", {}), m.get("halffull:kv_cache_total_blocks", {})
    return int(sum(total.values()) - sum(free.values()))


def wait_idle(url: str, workers: int, timeout: float = 15.0, headers: dict | None = None) -> dict:
    """Metrics once nothing runs, nothing waits, the server tracks no request and every one of `workers`
    workers has all its KV blocks free; AssertionError with the last metrics if that does not happen in time."""
    deadline = time.monotonic() + timeout
    while True:
        m = worker_metrics(url, headers)
        busy = sum(sum(m.get(f"halffull:num_requests_{k}", {}).values()) for k in ("running", "waiting", "in_flight"))
        if (busy == 0 and len(m.get("halffull:kv_cache_total_blocks", {})) == workers and leaked_blocks(m) == 0
                and sum(m.get("halffull:worker_up", {}).values()) == workers):
            return m
        if time.monotonic() > deadline:
            shown = {k: v for k, v in m.items() if "request" in k or "kv" in k or "up" in k}
            raise AssertionError(f"server not idle after {timeout}s: {shown}")
        time.sleep(0.1)


# ---- load shapes ------------------------------------------------------------------------------------------
def completion(prompt: str | list[int], max_tokens: int, stream: bool = False) -> bytes:
    return js({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
               "stream": stream})


async def cut_stream(port: int, body: bytes, mode: str, rng: random.Random) -> None:
    """Send a request over a raw socket and drop the connection: 'body' halfway through sending the body;
    'early' right after sending it (before the first token); 'wait' a few ms later (a long prompt is still in
    prefill, or a non-streaming request is still running); 'mid' after a random number of streamed events."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    try:
        writer.write(head + (body[:len(body) // 2] if mode == "body" else body))
        await writer.drain()
        if mode == "wait":
            await asyncio.sleep(rng.uniform(0.005, 0.05))
        elif mode == "mid":
            events, wanted = 0, rng.randint(1, 20)
            while events < wanted and (line := await reader.readline()):
                events += line.startswith(b"data: ")
    finally:
        if rng.random() < 0.5:
            writer.transport.abort()  # a reset, as when a client process dies
        else:
            writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def cut_many(port: int, n: int, rng: random.Random, concurrency: int = 16, max_tokens: int = 1000,
                   long_prompt: int = 1500) -> dict[str, int]:
    """`n` requests cut at random points (see cut_stream); long enough that none would finish by itself soon."""
    kinds = {"body": completion("cut", max_tokens, stream=True), "early": completion("cut", max_tokens, stream=True),
             "mid": completion("cut", max_tokens, stream=True),
             "prefill": completion("p" * long_prompt, max_tokens, stream=True),
             "abandoned": completion("cut", max_tokens)}
    counts = dict.fromkeys(kinds, 0)
    gate = asyncio.Semaphore(concurrency)

    async def one():
        kind = rng.choice(list(kinds))
        counts[kind] += 1
        mode = {"prefill": "wait", "abandoned": "wait"}.get(kind, kind)
        async with gate:
            await cut_stream(port, kinds[kind], mode, rng)
    await asyncio.gather(*(one() for _ in range(n)))
    return counts


async def burst(url: str, bodies: list[bytes], timeout: float = 120.0) -> list[tuple[int, float, httpx.Response]]:
    """Send all `bodies` at once; (status, seconds, response) each, status 0 for no answer at all."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def one(body):
            start = time.monotonic()
            try:
                r = await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
                return r.status_code, time.monotonic() - start, r
            except httpx.HTTPError:
                return 0, time.monotonic() - start, None
        return await asyncio.gather(*(one(b) for b in bodies))


@dataclass
class Outcome:
    """How one request ended, as its client saw it."""
    kind: str  # ok | error (an OpenAI-shaped error: status >= 400, or an error event in a stream) | dropped
    status: int = 0
    message: str = ""
    event_times: list[float] = field(default_factory=list)  # streams: when each event arrived
    end: float = 0.0
    tokens: int = 0  # non-streaming: completion tokens


async def send(client: httpx.AsyncClient, body: bytes) -> Outcome:
    """POST `body` to /v1/completions (streaming or not) and classify the end: a connection that closes
    without a complete answer or a clean error (a stream: without its [DONE]) is 'dropped'."""
    out = Outcome("dropped")
    try:
        async with client.stream("POST", "/v1/completions", content=body,
                                 headers={"content-type": "application/json"}) as r:
            out.status = r.status_code
            if not r.headers.get("content-type", "").startswith("text/event-stream"):
                data = json.loads(await r.aread())
                if r.status_code == 200:
                    out.kind, out.tokens = "ok", data["usage"]["completion_tokens"]
                else:
                    check_error_shape(data)
                    out.kind, out.message = "error", data["error"]["message"]
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    out.event_times.append(time.monotonic())
                    if line == "data: [DONE]":
                        out.kind = "error" if out.message else "ok"
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        check_error_shape(event)
                        out.message = event["error"]["message"]
    except httpx.HTTPError as e:
        out.kind, out.message = "dropped", repr(e)
    out.end = time.monotonic()
    return out

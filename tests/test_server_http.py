"""What wraps every HTTP exchange, through a real `python -m server`: request ids (X-Request-Id honored
and echoed, the response id and the engine's ids derived from it, one log line per finished request) and
CORS (absent unless configured; preflight and simple requests when it is)."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from server_utils import ServerProcess

ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def plain():
    s = ServerProcess("--workers", "1", "--num-kv-blocks", "128", "--max-model-len", "512")
    yield s
    assert s.stop() == 0, s.output()


@pytest.fixture(scope="module")
def cors():
    s = ServerProcess("--workers", "1", "--num-kv-blocks", "128", "--max-model-len", "512", "--api-key", "k",
                      "--allowed-origins", f'["{ORIGIN}"]', "--allowed-methods", '["GET", "POST"]')
    yield s
    assert s.stop() == 0, s.output()


def finished_lines(server, request_id: str, count: int = 1, timeout: float = 5.0) -> list[str]:
    """The server's log lines for `request_id`'s finished choices (written as the last output is handled)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in server.output().splitlines() if f"request {request_id} finished:" in line]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def test_incoming_request_id_is_echoed_names_the_response_and_the_log_line(plain):
    raw = plain.client().completions.with_raw_response.create(
        model="halffull-demo", prompt="Hello there", max_tokens=5, temperature=0.0, extra_body={"ignore_eos": True},
        extra_headers={"X-Request-Id": "trace-42.a"})
    out = raw.parse()
    assert raw.headers["x-request-id"] == "trace-42.a" and out.id == "cmpl-trace-42.a"
    [line] = finished_lines(plain, "trace-42.a")
    m = re.search(r"engine id (trace-42\.a-\d+), worker 0, prompt (\d+) tokens \(\d+ cached\), output (\d+) tokens, "
                  r"ttft ([\d.]+)ms, e2e ([\d.]+)ms, finish length", line)
    assert m, line
    assert (int(m[2]), int(m[3])) == (out.usage.prompt_tokens, 5) and 0 < float(m[4]) <= float(m[5])


def test_without_a_usable_header_the_server_makes_one_and_streams_carry_it(plain):
    client = plain.client()
    raw = client.chat.completions.with_raw_response.create(
        model="halffull-demo", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True,
        extra_headers={"X-Request-Id": "has a space"})
    made = raw.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert {chunk.id for chunk in raw.parse()} == {f"chatcmpl-{made}"}
    assert finished_lines(plain, made)
    plain_resp = httpx.get(plain.url + "/v1/models")
    assert re.fullmatch(r"[0-9a-f]{32}", plain_resp.headers["x-request-id"])
    errored = httpx.post(plain.url + "/v1/completions", json={"model": "nope", "prompt": "x"},
                         headers={"X-Request-Id": "bad-model-1"})
    assert errored.status_code == 404 and errored.headers["x-request-id"] == "bad-model-1"


def test_a_repeated_request_id_never_mixes_up_two_requests(plain):
    async def main():
        client = plain.async_client()
        prompts = ["first prompt", "a quite different second prompt"]
        return await asyncio.gather(*(client.completions.create(
            model="halffull-demo", prompt=p, max_tokens=6, temperature=0.0, extra_body={"ignore_eos": True},
            extra_headers={"X-Request-Id": "same"}) for p in prompts))
    both = asyncio.run(main())
    client = plain.client()
    alone = [client.completions.create(model="halffull-demo", prompt=p, max_tokens=6, temperature=0.0,
                                       extra_body={"ignore_eos": True}).choices[0].text
             for p in ["first prompt", "a quite different second prompt"]]
    assert [o.choices[0].text for o in both] == alone
    engine_ids = {re.search(r"engine id (\S+),", line)[1] for line in finished_lines(plain, "same", 2)}
    assert len(engine_ids) == 2


def test_cors_is_off_unless_configured(plain):
    preflight = httpx.options(plain.url + "/v1/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers and preflight.status_code == 405
    simple = httpx.get(plain.url + "/v1/models", headers={"Origin": ORIGIN})
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers


def test_cors_preflight_and_simple_requests_when_configured(cors):
    # A preflight carries no credentials: it is answered before the API-key check.
    preflight = httpx.options(cors.url + "/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert set(preflight.headers["access-control-allow-methods"].split(", ")) == {"GET", "POST"}
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in preflight.headers
    for method, origin in (("DELETE", ORIGIN), ("POST", "https://evil.example")):
        refused = httpx.options(cors.url + "/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": method})
        assert refused.status_code == 400
        assert refused.headers.get("access-control-allow-origin") == (ORIGIN if origin == ORIGIN else None)
        assert "DELETE" not in refused.headers["access-control-allow-methods"]
    simple = httpx.post(cors.url + "/v1/completions", headers={"Origin": ORIGIN, "Authorization": "Bearer k"},
                        json={"model": "halffull-demo", "prompt": "hi", "max_tokens": 2})
    assert simple.status_code == 200 and simple.headers["access-control-allow-origin"] == ORIGIN
    assert simple.headers["access-control-expose-headers"].lower() == "x-request-id"
    unauthorized = httpx.get(cors.url + "/v1/models", headers={"Origin": ORIGIN})
    assert unauthorized.status_code == 401 and unauthorized.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(cors.url + "/v1/models", headers={"Origin": "https://evil.example", "Authorization": "Bearer k"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_cors_flags_parse_as_vllm_writes_them():
    from server.cli import parse_args
    args = parse_args(["--allowed-origins", '["*"]', "--allowed-headers", '["content-type"]', "--allow-credentials"])
    assert (args.allowed_origins, args.allowed_methods, args.allowed_headers, args.allow_credentials) == (
        ["*"], ["*"], ["content-type"], True)
    assert parse_args([]).allowed_origins is None
    for argv in (["--allowed-origins", "https://a.example"], ["--allowed-methods", '["GET"]'],
                 ["--allowed-origins", '[1]']):
        with pytest.raises(SystemExit):
            parse_args(argv)

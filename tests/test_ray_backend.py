"""Workers on a Ray cluster (`--data-parallel-backend ray`): a head and two extra nodes started by the test on
this machine's loopback. Three workers land on three nodes (their `node` label on /metrics), SAL routes to
each; killing one node's raylet under load fails only that worker's requests, within 5 s, while the others
keep serving, and the worker comes back when the node does. No connection leaves the loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import subprocess
import time

import httpx
import pytest

from ray_cluster import LOOPBACK_ENV, RayCluster
from server_utils import ServerProcess

MODEL = "halffull-demo"


@pytest.fixture(scope="module")
def cluster():
    c = RayCluster()
    try:
        for name in ("head", "node1", "node2"):
            c.start(name, head=name == "head")
        yield c
    finally:
        c.stop()


def worker_series(server, name: str) -> dict[str, tuple[str, float]]:
    """worker -> (node, value) of one per-worker series."""
    out = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            out[labels["worker"]] = (labels["node"], float(line.rsplit(" ", 1)[1]))
    return out


def outward_connections(pids: set[int]) -> list[str]:
    """TCP sockets of `pids` whose either end is not on the loopback."""
    bad = []
    for line in subprocess.run(["ss", "-tnpH"], capture_output=True, text=True).stdout.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            for end in line.split()[3:5]:
                host = end.rsplit(":", 1)[0].strip("[]").split("%")[0]
                if host in ("*", "0.0.0.0", "::"):
                    continue
                addr = ipaddress.ip_address(host)
                if not (getattr(addr, "ipv4_mapped", None) or addr).is_loopback:
                    bad.append(line)
    return bad


async def stream(client: httpx.AsyncClient, prompt: str, max_tokens: int):
    """('ok' | 'error' | 'dropped', finish reason, end time)"""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    kind, reason = "dropped", None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return "error", None, time.monotonic()
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                kind = "error" if kind == "error" else "ok"
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    kind = "error"
                elif event["choices"] and event["choices"][0].get("finish_reason"):
                    reason = event["choices"][0]["finish_reason"]
    return kind, reason, time.monotonic()


def test_workers_on_three_nodes_survive_a_lost_node(cluster, monkeypatch):
    for k, v in LOOPBACK_ENV.items():
        monkeypatch.setenv(k, v)
    server = ServerProcess("--workers", "3", "--data-parallel-backend", "ray", "--ray-address", cluster.address,
                           "--balancer", "sal", "--num-kv-blocks", "256", "--max-model-len", "2048", timeout=400)
    try:
        ids = cluster.node_ids()
        up = worker_series(server, "halffull:worker_up")
        assert sorted(node for node, _ in up.values()) == sorted(ids.values()), (up, ids)  # one worker per node
        victim = next(w for w, (node, _) in up.items() if node == ids["node1"])

        async def load():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                runs = [asyncio.ensure_future(stream(client, f"load {i}", 300)) for i in range(9)]
                await asyncio.sleep(3.0)
                received = worker_series(server, "halffull:worker_requests_total")
                hit = time.monotonic()
                cluster.kill_raylet("node1")
                return await asyncio.gather(*runs), received, hit
        results, received, hit = asyncio.run(load())
        assert all(n > 0 for _, n in received.values()), received  # SAL routed to every worker
        failed = [r for r in results if r[0] != "ok"]
        assert len(failed) == received[victim][1], (results, received)  # the victim's requests, all in flight
        assert all(kind == "error" and end - hit < 5.0 for kind, _, end in failed), (failed, hit)
        assert all(reason == "length" for kind, reason, _ in results if kind == "ok")  # the others ran to the end
        assert outward_connections(cluster.pids() | {server.proc.pid, *server.child_pids()}) == []

        cluster.stop_node("node1")
        cluster.start("node1")  # the node rejoins; the restarted worker's actor lands on it
        new_id = cluster.node_ids()["node1"]
        deadline = time.monotonic() + 300
        while worker_series(server, "halffull:worker_up").get(victim) != (new_id, 1.0):
            assert time.monotonic() < deadline, server.output()[-3000:]
            time.sleep(1.0)
        client = server.client(timeout=60)
        outs = [client.completions.create(model=MODEL, prompt=f"again {i}", max_tokens=4) for i in range(6)]
        assert all(o.usage.completion_tokens == 4 for o in outs)
        assert worker_series(server, "halffull:worker_restarts_total")[victim][1] == 1.0
    finally:
        assert server.stop() == 0, server.output()[-3000:]

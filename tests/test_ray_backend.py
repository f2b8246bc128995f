"""Workers on a Ray cluster (`--data-parallel-backend ray`), on a head and two extra nodes the test starts on
this machine's loopback. Three workers land on three nodes (their `node` label on /metrics) and SAL routes to
each; killing one node's raylet under load fails exactly that worker's requests, all within 5 s of the
raylet's end, while the others keep streaming; the worker comes back once the node does and is routed to again. One server can mix
local and Ray workers. Throughout, no socket of the cluster or the server leaves the loopback."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from ray_cluster import LOOPBACK_ENV, RayCluster, outward_sockets, session_pids
from server_utils import ROOT, ServerProcess

MODEL = "halffull-demo"
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def cluster():
    c = RayCluster()
    try:
        c.start("head", head=True)
        c.start("node1", "node2")
        yield c
    finally:
        c.stop()


@pytest.fixture
def ray_server(cluster, monkeypatch):
    """Start a server on the cluster, its and the cluster's sockets watched while it runs."""
    for k, v in LOOPBACK_ENV.items():
        monkeypatch.setenv(k, v)
    servers: list[ServerProcess] = []
    outward: list[str] = []
    done = threading.Event()

    def watch():
        while not done.wait(0.5):
            outward.extend(outward_sockets(cluster.pids() | {p for s in servers for p in session_pids(s.proc.pid)}))
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    def start(*args: str) -> ServerProcess:
        servers.append(ServerProcess("--data-parallel-backend", "ray", "--ray-address", cluster.address,
                                     "--num-kv-blocks", "256", *args, timeout=300))
        return servers[-1]
    try:
        yield start
    finally:
        done.set()
        watcher.join()
        for s in servers:
            assert s.stop() == 0, s.output()[-3000:]
    assert outward == [], outward


def worker_series(server: ServerProcess, name: str) -> dict[int, tuple[str, float]]:
    """Worker id -> (node label, value) of one per-worker series on /metrics."""
    out = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            out[int(labels["worker"])] = (labels["node"], float(line.rsplit(" ", 1)[1]))
    return out


def wait_for(condition, what: str, server: ServerProcess, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{server.output()[-3000:]}"
        time.sleep(0.2)
    return value


def test_ray_is_imported_only_for_the_ray_backend():
    code = ("import sys, server.cli, server.engine_client, engine.worker; "
            "server.cli.parse_args(['--workers', '2']); assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_local_and_ray_workers_in_one_server(cluster, ray_server):
    server = ray_server("--workers", "2", "--data-parallel-size-local", "1", "--balancer", "round-robin")
    up = worker_series(server, "halffull:worker_up")
    assert up[0] == ("local", 1.0) and up[1][1] == 1.0 and up[1][0] in cluster.node_ids().values(), up
    client = server.client(timeout=60)
    outs = [client.completions.create(model=MODEL, prompt="the same prompt", max_tokens=12, **GREEDY)
            for _ in range(2)]
    # Round-robin sent one to each worker; greedy decoding gives the same tokens on both.
    wait_for(lambda: [v for _, v in worker_series(server, "halffull:worker_requests_total").values()] == [1.0, 1.0],
             "one request on each worker", server, 10.0)
    assert outs[0].choices[0].text == outs[1].choices[0].text and outs[0].usage.completion_tokens == 12


def test_a_lost_node_fails_only_its_requests_and_its_worker_rejoins(cluster, ray_server):
    server = ray_server("--workers", "3", "--balancer", "sal")
    ids = cluster.node_ids()
    up = worker_series(server, "halffull:worker_up")
    assert sorted(node for node, _ in up.values()) == sorted(ids.values()), (up, ids)  # one worker per node
    victim = next(w for w, (node, _) in up.items() if node == ids["node1"])

    async def load():
        client = server.async_client(timeout=120)
        tokens = [0] * 9
        ended: dict[int, tuple[str, float]] = {}  # stream -> (error or "", when)

        async def one(i):
            try:  # long enough that no request can finish between the kill and its failure
                stream = await client.completions.create(model=MODEL, prompt=f"load {i}", max_tokens=1500,
                                                         stream=True, **GREEDY)
                async for chunk in stream:
                    tokens[i] += 1
                ended[i] = ("", time.monotonic())
            except openai.APIError as e:
                ended[i] = (str(e), time.monotonic())

        tasks = [asyncio.ensure_future(one(i)) for i in range(9)]
        while not all(tokens):  # every request streams: each is in flight on its worker
            await asyncio.sleep(0.05)
        received = worker_series(server, "halffull:worker_requests_total")
        signalled_at = time.monotonic()
        killed_at = await asyncio.to_thread(cluster.kill_raylet, "node1")
        print(f"the raylet was gone {killed_at - signalled_at:.2f} s after SIGKILL")
        while len(ended) < received[victim][1] and time.monotonic() - killed_at < 30:
            await asyncio.sleep(0.05)
        failed = dict(ended)
        # The others keep serving: each streams 30 more tokens, then the test stops them.
        after = {i: tokens[i] for i in range(9) if i not in failed}
        while any(tokens[i] < n + 30 and i not in ended for i, n in after.items()):
            await asyncio.sleep(0.05)
        assert len(ended) == len(failed), ended  # nothing else ended meanwhile
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return received, killed_at, failed

    received, killed_at, failed = asyncio.run(load())
    assert all(n > 0 for _, n in received.values()), received  # SAL routed to every worker
    assert len(failed) == received[victim][1], (failed, received)  # exactly the victim's requests
    print(f"worker {victim}'s {len(failed)} requests failed {sorted(round(end - killed_at, 2) for _, end in failed.values())} "
          "s after its node's raylet was killed")
    for error, end in failed.values():
        assert f"engine worker {victim} died" in error and end - killed_at < 5.0, (failed, killed_at)

    cluster.stop_node("node1")
    cluster.start("node1")  # the node rejoins; the restarted worker's actor lands on it
    new_id = cluster.node_ids()["node1"]
    wait_for(lambda: worker_series(server, "halffull:worker_up")[victim] == (new_id, 1.0),
             "the worker back on the rejoined node", server, 120.0)

    async def again():
        client = server.async_client(timeout=60)
        return await asyncio.gather(*(client.completions.create(model=MODEL, prompt=f"again {i}", max_tokens=8,
                                                                **GREEDY) for i in range(6)))
    assert all(o.usage.completion_tokens == 8 for o in asyncio.run(again()))
    wait_for(lambda: worker_series(server, "halffull:worker_requests_total")[victim][1] > 0,
             "a request on the rejoined worker", server, 10.0)
    assert worker_series(server, "halffull:worker_restarts_total")[victim][1] == 1.0

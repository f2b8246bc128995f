"""A Ray cluster of a head and extra nodes on this machine, every packet on the loopback, as
../shared/ray-on-one-machine.md describes: each Ray process gets LOOPBACK_ENV, nodes start through a
launcher that lets `ray start --address` join while Ray keeps every address on 127.0.0.1 (Ray internals:
the `ray` extra pins the version), the head runs no dashboard, and each node has ports of its own."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from server_utils import free_port

CLOSED = "http://127.0.0.1:9"  # nothing listens there: proxied requests and usage reports go nowhere
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_USAGE_STATS_REPORT_URL": CLOSED, "NO_PROXY": "127.0.0.1,localhost,::1",
                "no_proxy": "127.0.0.1,localhost,::1",
                **{k: CLOSED for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                                       "all_proxy")}}
# The head declares a node dead after ~1 s without answers (default: 5 misses 3 s apart), so the requests of a
# lost node fail within the 5 s the tests allow.
FAST_NODE_FAILURE_ENV = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
                         "RAY_health_check_failure_threshold": "2"}
LAUNCHER = ("import sys, ray._private.ray_constants as c, ray._private.services as s; c.ENABLE_RAY_CLUSTER = True; "
            "s.get_node_ip_address = lambda *a, **k: '127.0.0.1'; from ray.scripts.scripts import main; "
            "sys.argv[0] = 'ray'; main()")


class RayCluster:
    def __init__(self):
        self.temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Unix socket paths stay under 107 bytes
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, **LOOPBACK_ENV, **FAST_NODE_FAILURE_ENV)

    def start(self, name: str, head: bool = False) -> None:
        """Start node `name` (with a custom resource of that name, one CPU) and wait until it has joined."""
        base = random.randrange(20000, 60000, 200)
        args = ["start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                "--object-store-memory", str(80 << 20), "--resources", json.dumps({name: 1}),
                "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--dashboard-agent-grpc-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
                "--min-worker-port", str(base), "--max-worker-port", str(base + 199)]
        if head:
            args += ["--head", "--port", str(self.port), "--include-dashboard", "false", "--disable-usage-stats",
                     "--temp-dir", self.temp]
        else:
            args += ["--address", self.address]
        log = open(Path(self.temp) / f"{name}.out", "w")
        self.nodes[name] = subprocess.Popen([sys.executable, "-c", LAUNCHER, *args], env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:  # one node at a time: raylets starting together race for a socket name
            time.sleep(1.0)
            assert self.nodes[name].poll() is None, (Path(self.temp) / f"{name}.out").read_text()
            if name in self.alive_resources():
                return
            assert time.monotonic() < deadline, f"node {name} did not join"

    def alive_resources(self) -> set[str]:
        """The custom resources of the nodes the cluster counts alive."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
                "print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))" % self.address)
        try:
            out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                                 timeout=60)
        except subprocess.TimeoutExpired:
            return set()
        if out.returncode:
            return set()
        return {k for r in json.loads(out.stdout.strip().splitlines()[-1]) for k in r}

    def node_ids(self) -> dict[str, str]:
        """Node id of each alive node, by name."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); print(json.dumps("
                "{k: n['NodeID'] for n in ray.nodes() if n['Alive'] for k in n['Resources']}))" % self.address)
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60)
        ids = json.loads(out.stdout.strip().splitlines()[-1])
        return {name: ids[name] for name in self.nodes if name in ids}

    def raylet_pid(self, name: str) -> int:
        out = subprocess.run(["pgrep", "-s", str(self.nodes[name].pid), "raylet"], capture_output=True, text=True)
        return int(out.stdout.split()[0])

    def kill_raylet(self, name: str) -> None:
        os.kill(self.raylet_pid(name), signal.SIGKILL)

    def stop_node(self, name: str) -> None:
        """Kill every process of the node's session (Ray puts some in process groups of their own)."""
        proc = self.nodes.pop(name)
        for pid in self.session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()

    def stop(self) -> None:
        for name in [n for n in self.nodes if n != "head"] + [n for n in self.nodes if n == "head"]:
            self.stop_node(name)

    def pids(self) -> set[int]:
        """Every process of the cluster."""
        return self.session_pids(*(p.pid for p in self.nodes.values()))

    @staticmethod
    def session_pids(*sessions: int) -> set[int]:
        out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout.split()
        return {int(pid) for pid, sid in zip(out[::2], out[1::2]) if int(sid) in sessions}

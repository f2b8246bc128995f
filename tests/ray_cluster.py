"""A Ray cluster of a head and extra nodes on this machine with every packet on the loopback, as
../shared/ray-on-one-machine.md describes: each Ray process gets LOOPBACK_ENV, nodes start through a
launcher that lets `ray start --address` join while Ray keeps every address on 127.0.0.1 (Ray internals:
the `ray` extra pins the version), the head runs no dashboard, and each node has ports of its own.
`outward_sockets` is the check that nothing left the loopback."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
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
# The head declares a node dead after 2 failed health checks 0.3 s apart (default: 5, 3 s apart), so a lost
# node's requests fail well within the 5 s the tests allow, however loaded the machine. A killed raylet refuses
# the checks at once, but a check in flight when it died can hang until its timeout; 1 s bounds that, and
# keeps a live node that is slow to answer on a loaded machine from being declared dead.
FAST_NODE_FAILURE_ENV = {"RAY_health_check_period_ms": "300", "RAY_health_check_timeout_ms": "1000",
                         "RAY_health_check_failure_threshold": "2"}
LAUNCHER = ("import sys, ray._private.ray_constants as c, ray._private.services as s; c.ENABLE_RAY_CLUSTER = True; "
            "s.get_node_ip_address = lambda *a, **k: '127.0.0.1'; from ray.scripts.scripts import main; "
            "sys.argv[0] = 'ray'; main()")


class RayCluster:
    """Nodes by name; each node has a custom resource of its name, which finds its node id."""

    def __init__(self):
        self.temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Unix socket paths stay under 107 bytes
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, **LOOPBACK_ENV, **FAST_NODE_FAILURE_ENV)
        # Each node's workers listen on a range of 200 ports of their own, below the ephemeral ports that
        # free_ports() hands out for the nodes' other ports (an overlap makes `ray start` refuse).
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        self.worker_ports = random.randrange(10000, ephemeral - 4000, 200)

    def start(self, *names: str, head: bool = False) -> None:
        """Start nodes (each with one CPU and a resource of its name, in a session and a temp dir of its own,
        so that they can start together) and return once they run. The head comes first, alone."""
        ports = iter(free_ports(6 * len(names)))
        for name in names:
            base, self.worker_ports = self.worker_ports, self.worker_ports + 200
            args = ["start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                    "--object-store-memory", str(80 << 20), "--resources", json.dumps({name: 1}),
                    "--temp-dir", f"{self.temp}/{name}", "--min-worker-port", str(base),
                    "--max-worker-port", str(base + 199)]
            for flag, port in zip(("--node-manager-port", "--object-manager-port", "--dashboard-agent-grpc-port",
                                   "--dashboard-agent-listen-port", "--runtime-env-agent-port",
                                   "--metrics-export-port"), ports):
                args += [flag, str(port)]
            if head:
                args += ["--head", "--port", str(self.port), "--include-dashboard", "false", "--disable-usage-stats"]
            else:
                args += ["--address", self.address]
            with open(self.log_path(name), "w") as log:
                self.nodes[name] = subprocess.Popen([sys.executable, "-c", LAUNCHER, *args], env=self.env,
                                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        for name in names:
            while "Ray runtime started." not in self.log_path(name).read_text():
                assert self.nodes[name].poll() is None, self.log_path(name).read_text()
                assert time.monotonic() < deadline, f"node {name} did not start:\n{self.log_path(name).read_text()}"
                time.sleep(0.2)

    def log_path(self, name: str) -> Path:
        return Path(self.temp) / f"{name}.out"

    def node_ids(self) -> dict[str, str]:
        """Node id of each node the head counts alive, by name."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); print('NODES', json.dumps("
                "{k: n['NodeID'] for n in ray.nodes() if n['Alive'] for k in n['Resources']}), flush=True)"
                % self.address)
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        # Ray may print the cluster's error messages (a node that died) on the same stdout.
        ids = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("NODES "))[6:])
        return {name: ids[name] for name in self.nodes if name in ids}

    def kill_raylet(self, name: str) -> float:
        """SIGKILL the node's raylet (found in the node's session), leaving its other processes as they are.
        Return when it is gone (its sockets closed): on a loaded machine the kernel can take seconds to tear
        down a killed process."""
        out = subprocess.run(["pgrep", "-s", str(self.nodes[name].pid), "-x", "raylet"], capture_output=True, text=True)
        pid = int(out.stdout.split()[0])
        os.kill(pid, signal.SIGKILL)
        while True:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:  # reaped
                break
            if state in ("Z", "X"):  # exited, not yet reaped
                break
            time.sleep(0.005)
        return time.monotonic()

    def stop_node(self, name: str) -> None:
        """Kill every process of the node's session (Ray puts some in process groups of their own)."""
        proc = self.nodes.pop(name)
        for pid in session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()

    def stop(self) -> None:
        for name in sorted(self.nodes, key=lambda n: n == "head"):  # the head last
            self.stop_node(name)
        shutil.rmtree(self.temp, ignore_errors=True)

    def pids(self) -> set[int]:
        """Every process of the cluster."""
        return session_pids(*(p.pid for p in self.nodes.values()))


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 right now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def session_pids(*sessions: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout.split()
    return {int(pid) for pid, sid in zip(out[::2], out[1::2]) if int(sid) in sessions}


def outward_sockets(pids: set[int]) -> list[str]:
    """The TCP and UDP sockets of `pids` that are bound or connected anywhere but the loopback (a wildcard
    peer, as a listening socket has, is fine; a wildcard local address is not)."""
    def loopback(host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host.strip("[]").split("%")[0])
        except ValueError:  # "*": every address
            return False
        return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback

    bad = []
    for line in subprocess.run(["ss", "-tuanpH"], capture_output=True, text=True).stdout.splitlines():
        if not {int(p) for p in re.findall(r"pid=(\d+)", line)} & pids:
            continue
        local, peer = (end.rsplit(":", 1)[0] for end in line.split()[4:6])
        if not loopback(local) or peer not in ("*", "0.0.0.0", "[::]") and not loopback(peer):
            bad.append(line)
    return bad

"""A Ray cluster of several nodes on one machine, on loopback addresses (127.0.0.2 for the head, 127.0.0.3, ...
for the workers), started with the same `ray start` commands a user types (README: Serving, "A cluster of two
nodes"), for the cluster test and `benchmarks/serve_cluster.py`.

Ray resolves 127.0.0.1 given as a node address to the machine's routable address, so the nodes take other
addresses of the loopback range, which Linux routes to `lo` as well. Each node is one `ray start --block` in its
own process group: stopping a node kills that group (a node lost, not drained), and nothing of it is left behind.
Every wait here is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HEAD_IP = "127.0.0.2"


def free_port(host: str = HEAD_IP) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ray_env() -> dict:
    # Ray 2.60 turns token authentication on by default; this cluster and its clients run without one
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _ray_cli() -> str:
    found = Path(sys.executable).with_name("ray")
    if not found.exists():
        raise FileNotFoundError(f"the `ray` command is not beside {sys.executable}: pip install 'dcaccel[serve]'")
    return str(found)


class DeployFailed(RuntimeError):
    """Serve gave up on the application (its replicas failed to start): the replica's own last error line."""


@dataclass
class Node:
    ip: str
    cpus: float
    resources: dict
    process: subprocess.Popen
    log: Path


class LoopbackCluster:
    """`ray start --head` on 127.0.0.2 and `ray start --address` workers on 127.0.0.3, ...; Ray's state API and
    Serve's REST API through the head's dashboard."""

    def __init__(self, root: str | None = None):
        # a short directory: Ray's socket paths under it must stay below the 107 characters Unix allows
        self.own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="dcray"))
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.nodes: dict[str, Node] = {}

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://{HEAD_IP}:{self.dashboard_port}"

    def _start(self, ip: str, cpus: float, resources: dict, args: list[str]) -> Node:
        log = self.root / f"node-{ip}.log"
        command = [_ray_cli(), "start", "--block", "--node-ip-address", ip, "--num-cpus", f"{cpus:g}",
                   "--resources", json.dumps(resources), "--disable-usage-stats", *args]
        with open(log, "ab") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=ray_env(),
                                       start_new_session=True, cwd=self.root)
        node = self.nodes[ip] = Node(ip, cpus, resources, process, log)
        return node

    def start_head(self, cpus: float, resources: dict, timeout: float = 120) -> Node:
        node = self._start(HEAD_IP, cpus, resources,
                           ["--head", "--port", str(self.gcs_port), "--include-dashboard", "true",
                            "--dashboard-host", HEAD_IP, "--dashboard-port", str(self.dashboard_port),
                            "--temp-dir", str(self.root / "ray")])
        self.wait_for_nodes({HEAD_IP}, timeout)
        return node

    def add_worker(self, ip: str, cpus: float, resources: dict, timeout: float = 120) -> Node:
        if not ip.startswith("127.") or ip == HEAD_IP:
            raise ValueError(f"a worker of this cluster takes a loopback address other than {HEAD_IP}, got {ip}")
        node = self._start(ip, cpus, resources, ["--address", self.address])
        self.wait_for_nodes(self.alive_ips() | {ip}, timeout)
        return node

    def kill_node(self, ip: str) -> None:
        """The node lost at once (SIGKILL to its process group): no drain, no goodbye to the head."""
        node = self.nodes.pop(ip)
        _kill_group(node.process)

    def deploy(self, config: str | Path, timeout: float = 120) -> None:
        """`serve deploy CONFIG --address DASHBOARD`, as a user runs it."""
        done = subprocess.run([str(Path(sys.executable).with_name("serve")), "deploy", str(config), "--address",
                               self.dashboard], capture_output=True, text=True, timeout=timeout, env=ray_env())
        if done.returncode != 0:
            raise RuntimeError(f"serve deploy {config} failed: {(done.stdout + done.stderr).strip()[-2000:]}")

    def stop(self) -> None:
        """Every node killed, the head last; the directory this cluster made (logs, sockets) removed."""
        for ip in [ip for ip in self.nodes if ip != HEAD_IP] + [ip for ip in self.nodes if ip == HEAD_IP]:
            _kill_group(self.nodes.pop(ip).process)
        if self.own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- what the cluster says about itself: Ray's state API and Serve's REST API ------------------------------

    def list_nodes(self) -> list:
        from ray.util.state import list_nodes

        return list_nodes(address=self.dashboard, timeout=20, raise_on_missing_output=False)

    def alive_ips(self) -> set[str]:
        return {n.node_ip for n in self.list_nodes() if n.state == "ALIVE"}

    def replica_ips(self, deployment: str) -> list[str]:
        """The node address of every live replica of a Serve deployment, as Ray's state API lists its actors."""
        from ray.util.state import list_actors

        ips = {n.node_id: n.node_ip for n in self.list_nodes()}
        actors = list_actors(address=self.dashboard, filters=[("state", "=", "ALIVE")], limit=1000, timeout=20,
                             raise_on_missing_output=False)
        return sorted(ips.get(a.node_id, "?") for a in actors if a.class_name.endswith(f":{deployment}"))

    def serve_status(self, app: str) -> dict:
        """Serve's REST API (what `serve status` prints): the application's status and its deployments'."""
        import urllib.request

        with urllib.request.urlopen(f"{self.dashboard}/api/serve/applications/", timeout=20) as r:
            apps = json.load(r).get("applications", {})
        return apps.get(app, {})

    def wait_for_nodes(self, ips: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for ip, node in self.nodes.items():
                if node.process.poll() is not None:
                    raise RuntimeError(f"ray start on {ip} exited with {node.process.returncode}: "
                                       f"{_tail(node.log)}")
            try:
                if self.alive_ips() >= ips:
                    return
            except Exception as e:  # the dashboard is still starting
                last = e
            time.sleep(1)
        raise TimeoutError(f"nodes {sorted(ips)} not all alive after {timeout:g} s ({last})")

    def wait_for_replicas(self, app: str, deployment: str, ips: list[str], timeout: float) -> None:
        """Until the deployment's running replicas sit on exactly these node addresses (sorted)."""
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            try:
                status = self.serve_status(app)
                if status.get("status") == "DEPLOY_FAILED":
                    raise DeployFailed(f"{app}: {status.get('message')}: " + " | ".join(
                        str(d.get("message", "")).strip().splitlines()[-1] for d in status["deployments"].values()
                        if d.get("status") == "DEPLOY_FAILED" and str(d.get("message", "")).strip()))
                replicas = status.get("deployments", {}).get(deployment, {}).get("replicas", [])
                running = sorted(r.get("node_ip", "?") for r in replicas if r.get("state") == "RUNNING")
                seen = (running, self.replica_ips(deployment))  # Serve's view, and Ray's state API's
                if running == sorted(ips) and seen[1] == sorted(ips):
                    return
            except DeployFailed:
                raise
            except Exception as e:
                seen = e
            time.sleep(1)
        raise TimeoutError(f"{deployment} replicas not on {sorted(ips)} after {timeout:g} s (last seen: {seen})")


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"

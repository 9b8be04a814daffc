"""A throw-away Redis Cluster on loopback ports: N masters and a replica for each.

Used by the cluster benchmark (``bench.run --cases c``) and by the cluster integration tests.
Each node is a ``redis-server`` of its own (own port, own directory and cluster config file,
no persistence), joined by ``redis-cli --cluster create``; ``start`` returns once every node says
``cluster_state:ok`` and agrees on the masters. Nodes are stopped by their process, never by name.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_S = 30.0


BUS_PORT_OFFSET = 10_000  # a cluster node also listens on port + 10,000 (its cluster bus)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free port whose cluster-bus port (+10,000) is free and valid too."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + BUS_PORT_OFFSET <= 65_535 and _port_free(port + BUS_PORT_OFFSET):
            return port


def wait_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server on port {port} exited at start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"redis-server did not start on port {port}")


@dataclass
class ClusterNode:
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cli(self, *args: str, timeout_s: float = 10.0) -> str:
        """``redis-cli -p PORT args...``'s output (raises on a failing command)."""
        done = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        return done.stdout

    def info(self, section: str) -> dict[str, str]:
        lines = self.cli("INFO", section).splitlines()
        return dict(
            line.split(":", 1) for line in lines if ":" in line and not line.startswith("#")
        )


@dataclass
class LocalCluster:
    """``masters`` masters with ``replicas_per_master`` replicas each, under ``directory``."""

    directory: Path
    masters: int = 3
    replicas_per_master: int = 1
    nodes: list[ClusterNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A ``REDIS_URL`` naming one node (the client discovers the rest)."""
        return f"redis://{self.nodes[0].address}/0"

    def start(self) -> LocalCluster:
        binary = shutil.which("redis-server")
        if binary is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server and redis-cli are needed for a local cluster")
        try:
            for index in range(self.masters * (1 + self.replicas_per_master)):
                self.nodes.append(self._launch(binary, index))
            subprocess.run(
                [
                    *("redis-cli", "--cluster", "create"),
                    *(node.address for node in self.nodes),
                    *("--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"),
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, binary: str, index: int) -> ClusterNode:
        node = ClusterNode(free_port(), self.directory / f"node-{index}")
        node.directory.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(node.port),
            "--dir",
            str(node.directory),
        ]
        args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        args += ["--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no"]
        node.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(node.port, node.process)
        return node

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until every node says ``cluster_state:ok`` and sees ``masters`` masters with slots."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self._node_ready(node) for node in self.nodes):
                return
            time.sleep(0.1)
        raise RuntimeError("the local Redis Cluster did not become ready")

    def _node_ready(self, node: ClusterNode) -> bool:
        try:
            info = _cluster_info(node)
        except subprocess.SubprocessError:
            return False
        return info.get("cluster_state") == "ok" and info.get("cluster_size") == str(self.masters)

    def master_nodes(self) -> list[ClusterNode]:
        """The nodes that are masters now (a failover changes which)."""
        return [node for node in self.nodes if node.info("replication").get("role") == "master"]

    def replica_of(self, master: ClusterNode) -> ClusterNode:
        """A replica whose master is ``master``."""
        for node in self.nodes:
            info = node.info("replication")
            if info.get("role") == "slave" and info.get("master_port") == str(master.port):
                return node
        raise LookupError(f"no replica of {master.address}")

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait(timeout=10)
                node.process = None


def _cluster_info(node: ClusterNode) -> dict[str, str]:
    lines = node.cli("CLUSTER", "INFO").splitlines()
    return dict(line.strip().split(":", 1) for line in lines if ":" in line)


def cpu_seconds(node: ClusterNode) -> float:
    """The node's ``used_cpu_sys + used_cpu_user`` (``INFO cpu``)."""
    info = node.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

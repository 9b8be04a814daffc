"""A Sentinel deployment of a test's own: one master, one replica and three sentinels.

Every server listens on a free 127.0.0.1 port with its data and configuration in the test's
directory, and is stopped by its PID (``stop``). The sentinels monitor the master as
``MASTER_NAME`` with a quorum of two and short timeouts, so a ``SENTINEL FAILOVER`` or a dead
master is acted on within a few seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from tests.integration.servers import free_port, launch

MASTER_NAME = "neiromatrius"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


class SentinelDeployment:
    """``redis-server`` master + replica and three ``redis-server --sentinel`` on loopback."""

    def __init__(self, directory: Path, *, sentinels: int = 3) -> None:
        self.directory = directory
        self.data_ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """The worker's ``REDIS_URL`` for this deployment (every sentinel listed)."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def start(self) -> SentinelDeployment:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        master, replica = self.data_ports
        for port in self.data_ports:
            folder = self.directory / f"redis-{port}"
            folder.mkdir()
            args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder)]
            args += ["--save", "", "--appendonly", "no"]
            if port == replica:
                args += ["--replicaof", "127.0.0.1", str(master)]
            self._processes.append(launch(args, port, f"redis-server {port}"))
        for port in self.sentinel_ports:
            config = self.directory / f"sentinel-{port}.conf"
            config.write_text(
                f"bind 127.0.0.1\nport {port}\ndir {self.directory}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            self._processes.append(
                launch([binary, str(config), "--sentinel"], port, f"sentinel {port}")
            )
        self.wait_for_replica()
        return self

    def sentinel(self, index: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[index], socket_timeout=2)

    def master_port(self) -> int:
        with self.sentinel() as client:
            _, port = client.execute_command("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
        return int(port)

    def master(self) -> redis.Redis:
        return redis.Redis(port=self.master_port(), socket_timeout=2)

    def wait_for_replica(self, timeout_s: float = 15.0) -> None:
        """Until the master has its replica in sync and every sentinel knows both."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with self.master() as master:
                    synced = master.info("replication").get("connected_slaves", 0) >= 1
                known = all(self._knows_replica(i) for i in range(len(self.sentinel_ports)))
            except redis.RedisError:
                synced = known = False
            if synced and known:
                return
            time.sleep(0.1)
        raise AssertionError("the Sentinel deployment did not settle")

    def _knows_replica(self, index: int) -> bool:
        with self.sentinel(index) as client:
            replicas = client.execute_command("SENTINEL", "replicas", MASTER_NAME)
            sentinels = client.execute_command("SENTINEL", "sentinels", MASTER_NAME)
        return len(replicas) >= 1 and len(sentinels) >= len(self.sentinel_ports) - 1

    def failover(self, timeout_s: float = 15.0) -> int:
        """``SENTINEL FAILOVER`` and wait until the sentinels name the new master; its port."""
        before = self.master_port()
        with self.sentinel() as client:
            client.execute_command("SENTINEL", "failover", MASTER_NAME)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            port = self.master_port()
            if port != before:
                return port
            time.sleep(0.05)
        raise AssertionError("the failover did not happen")

    def stop(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
        for process in self._processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self._processes.clear()

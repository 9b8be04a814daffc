"""RabbitMQ nodes of a test's own: one spare node, or a cluster of three, on loopback ports.

Each node is a ``rabbitmq-server`` process (in a process group of its own, so the test knows its
PID and can stop or kill exactly it) with its own node name (``t<random>@localhost``), AMQP port,
distribution port, data and log directories and configuration file, all under the test's
``tmp_path``. Nothing of the shared broker (``rabbit@localhost``, AMQP 5672, distribution 25672,
``/etc/rabbitmq``) is read or touched; the shared epmd on 4369 is used, as every local node does.

The environment of a node is built from nothing: ``rabbitmq-env`` also reads unprefixed variables
(``NODENAME``, ``LOGS``, ``CONFIG_FILE``...), so a variable of the test's own environment could
change the node. Its ``RABBITMQ_CONF_ENV_FILE`` is an empty file (the system's names the shared
node), its enabled-plugins file is empty (no management listener), and its Erlang cookie is one of
the test's own, in a ``HOME`` of its own that ``rabbitmqctl -n NODE`` is run with too.

``rabbitmqctl``'s own node takes a distribution port in 35672-35682 (10000 above the default
distribution port), so ``free_port`` here never hands out one of those.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

START_TIMEOUT_S = 90.0  # a node boots in ~3 s; generous for a loaded 2-core machine
CTL_TIMEOUT_S = 60.0
CLI_DIST_PORTS = range(35672, 35693)  # what rabbitmqctl's own Erlang node may listen on


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port that no ``rabbitmqctl`` run will take for its own distribution, and
    not one this process handed out before (the nodes of a cluster bind theirs only later)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in CLI_DIST_PORTS and port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def scripts_dir() -> Path:
    """Where the real ``rabbitmq-server`` and ``rabbitmqctl`` scripts are.

    Debian's ``/usr/sbin`` entries are a wrapper that switches to the ``rabbitmq`` user (whose
    ``HOME`` and cookie are the shared node's); the scripts it wraps sit beside the wrapper.
    """
    found = shutil.which("rabbitmq-server") or shutil.which("rabbitmq-server", path="/usr/sbin")
    assert found, "rabbitmq-server is not installed"
    resolved = Path(found).resolve()
    return resolved.parent


class RabbitNode:
    """One ``rabbitmq-server`` of a test's own, under ``directory``; ``guest`` works on loopback."""

    def __init__(
        self,
        directory: Path,
        *,
        cookie: str | None = None,
        extra_config: Sequence[str] = (),
        name: str | None = None,
    ) -> None:
        self.directory = directory
        self.cookie = cookie or secrets.token_hex(16)
        self.extra_config = tuple(extra_config)
        self.name = name or f"t{uuid.uuid4().hex[:10]}@localhost"
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.home = directory / "home"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def pid(self) -> int | None:
        """The PID of the node's process group (the ``rabbitmq-server`` script, the VM's parent)."""
        return None if self.process is None else self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _prepare(self) -> dict[str, str]:
        for sub in ("home", "mnesia", "log"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)
        config = [
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}",
            "loopback_users.guest = true",
            *self.extra_config,
        ]
        (self.directory / "rabbitmq.conf").write_text("\n".join(config) + "\n")
        (self.directory / "enabled_plugins").write_text("[].\n")
        (self.directory / "rabbitmq-env.conf").write_text("")
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.directory / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.directory / "rabbitmq-env.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def launch(self) -> None:
        """Start the node's process without waiting for it (``wait_started`` does)."""
        assert not self.running(), f"{self.name} is already running"
        env = self._prepare()
        with (self.directory / "log" / "console.log").open("ab") as console:
            self.process = subprocess.Popen(
                [str(scripts_dir() / "rabbitmq-server")],
                env=env,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def ctl(
        self, *args: str, timeout_s: float = CTL_TIMEOUT_S, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n NODE ARGS`` (with this node's cookie)."""
        return self.tool("rabbitmqctl", *args, timeout_s=timeout_s, check=check)

    def tool(
        self, tool: str, *args: str, timeout_s: float = CTL_TIMEOUT_S, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """One of the CLI tools (``rabbitmqctl``, ``rabbitmq-queues``...) aimed at this node."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home)}
        done = subprocess.run(
            [str(scripts_dir() / tool), "-n", self.name, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} on {self.name}: {done.stderr.strip()}")
        return done

    def wait_started(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until the node has booted (``await_startup``) and its AMQP port accepts. A node
        that exits while booting (another process took one of its ports meanwhile) is launched
        once more on new ports."""
        deadline = time.monotonic() + timeout_s
        relaunched = False
        while time.monotonic() < deadline:
            if not self.running():
                if relaunched:
                    raise AssertionError(
                        f"{self.name} exited while starting: {self.console_tail()}"
                    )
                relaunched = True
                self.amqp_port, self.dist_port = free_port(), free_port()
                self.launch()
            left = max(1.0, deadline - time.monotonic())
            done = self.ctl(
                "await_startup", "--timeout", str(int(left)), timeout_s=left + 15, check=False
            )
            if done.returncode == 0 and self._accepts():
                return
            time.sleep(0.5)  # not registered with epmd yet: await_startup fails at once
        raise AssertionError(f"{self.name} did not start within {timeout_s:.0f} s")

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.amqp_port), timeout=1):
                return True
        except OSError:
            return False

    def start(self, timeout_s: float = START_TIMEOUT_S) -> RabbitNode:
        self.launch()
        self.wait_started(timeout_s)
        return self

    def console_tail(self, lines: int = 5) -> str:
        path = self.directory / "log" / "console.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def kill(self) -> None:
        """Kill the node at once (SIGKILL to its process group), as a crashed machine would."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """Stop the node cleanly (``rabbitmqctl stop``), then by PID if it is still there."""
        if self.process is None:
            return
        if self.running():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.ctl("stop", timeout_s=30, check=False)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=15)
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=15)
        self.kill()  # whatever is left of the group (the VM's helpers too)


class RabbitCluster:
    """Three (``size``) nodes of a test's own joined into one cluster; the first one is the seed."""

    def __init__(self, directory: Path, size: int = 3, *, extra_config: Sequence[str] = ()) -> None:
        cookie = secrets.token_hex(16)
        tag = uuid.uuid4().hex[:8]
        self.nodes = [
            RabbitNode(
                directory / f"node{i}",
                cookie=cookie,
                extra_config=extra_config,
                name=f"t{tag}n{i}@localhost",
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """Every node's address, comma-separated (the form ``RABBITMQ_URL`` takes)."""
        return ",".join(self.urls)

    def start(self, timeout_s: float = START_TIMEOUT_S) -> RabbitCluster:
        """Boot every node (in parallel), then join the others to the first one."""
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            node.wait_started(timeout_s)
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", seed.name)
            node.ctl("start_app")
            node.wait_started(timeout_s)
        self.wait_running(len(self.nodes), timeout_s)
        return self

    def running_members(self, via: RabbitNode | None = None) -> set[str]:
        """The names of the nodes the cluster sees running (asked of ``via``, or a live node)."""
        ask = via or next(node for node in self.nodes if node.running())
        listed = ask.ctl("eval", "rabbit_nodes:all_running().", check=False).stdout
        return {node.name for node in self.nodes if node.name in listed}

    def wait_running(self, count: int, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.running_members()) < count:
            assert time.monotonic() < deadline, f"the cluster has not {count} running nodes"
            time.sleep(0.5)

    def node_named(self, name: str) -> RabbitNode:
        return next(node for node in self.nodes if node.name == name)

    def leader_of(self, queue: str, timeout_s: float = 30.0) -> RabbitNode:
        """The node holding the leader of quorum queue ``queue`` (on the default virtual host)."""
        deadline = time.monotonic() + timeout_s
        while True:
            ask = next(node for node in self.nodes if node.running())
            listed = ask.ctl("list_queues", "name", "leader", "--quiet", "--no-table-headers")
            for line in listed.stdout.splitlines():
                fields = line.split("\t")
                if len(fields) == 2 and fields[0] == queue:
                    with contextlib.suppress(StopIteration):
                        return self.node_named(fields[1].strip())
            assert time.monotonic() < deadline, f"no leader found for {queue}: {listed.stdout!r}"
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop every node (the last ones first, so the seed does not wait for the others)."""
        for node in reversed(self.nodes):
            node.stop()


@contextlib.contextmanager
def spare_node(directory: Path, *, extra_config: Sequence[str] = ()) -> Iterator[RabbitNode]:
    """A started node of its own, stopped by PID on the way out whatever happened."""
    node = RabbitNode(directory, extra_config=extra_config)
    try:
        yield node.start()
    finally:
        node.stop()


@contextlib.contextmanager
def cluster(directory: Path, size: int = 3, **options: Sequence[str]) -> Iterator[RabbitCluster]:
    """A started cluster of ``size`` nodes, every node stopped by PID on the way out."""
    nodes = RabbitCluster(directory, size, **options)
    try:
        yield nodes.start()
    finally:
        nodes.stop()

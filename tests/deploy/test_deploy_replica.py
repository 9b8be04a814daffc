"""Acceptance: the image, built and started the way Docker would, works against the local brokers.

There is no Docker engine here, so the test plays the engine's part: it runs the Dockerfile's
build-stage instructions in a scratch directory that stands for the image's file system (fresh
virtual environment, the locked dependencies, the project), then starts the runtime stage's CMD
with the image's ENV plus the worker's environment from docker-compose.yml, its host names mapped
to 127.0.0.1, on unique queue, exchange and key names.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import httpx
import pytest
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractConnection
from deploy_support import (
    COMPOSE_FILE,
    REPO,
    DockerIgnore,
    Stage,
    load_yaml,
    read_dockerfile,
    service_environment,
)

from worker.redisio.keys import RedisKeys

VENV = "/opt/venv"
CONNECTED = "✅ Redis cache connected"
COMPOSE_HOSTS = frozenset({"neiromatrius-redis", "rabbitmq"})
# What a Debian-based image has on PATH before the Dockerfile adds to it.
IMAGE_BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STARTUP_S = 45.0
RESULT_S = 30.0
STOP_S = 30.0


@dataclass(slots=True)
class ImageRoot:
    """A directory standing for the image's file system, and the environment of its last stage."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path | None = None

    def path(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    def rewrite(self, text: str) -> str:
        """A Dockerfile string with the image's paths turned into this directory's."""
        return text.replace(VENV, str(self.path(VENV)))

    def expand(self, value: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: self.env.get(m.group(1), ""), value)

    def apply(self, stage: Stage, *, context: Path, ignore: DockerIgnore, run: bool) -> None:
        """Carry out a stage's ENV, WORKDIR and COPY instructions here, and its RUN ones if asked."""
        for instruction in stage.instructions:
            if instruction.keyword == "ENV":
                for key, value in instruction.env_pairs().items():
                    self.env[key] = self.rewrite(self.expand(value))
            elif instruction.keyword == "WORKDIR":
                self.workdir = self.path(instruction.arguments)
                self.workdir.mkdir(parents=True, exist_ok=True)
            elif instruction.keyword == "COPY":
                flags, words = instruction.flags_and_words()
                if "from" not in flags:  # COPY --from brings the venv, which is already here
                    self._copy(words[:-1], words[-1], context, ignore)
            elif instruction.keyword == "RUN" and run:
                self._run(self.rewrite(instruction.arguments))

    def _copy(self, sources: list[str], dest: str, context: Path, ignore: DockerIgnore) -> None:
        assert self.workdir is not None, "COPY before WORKDIR"
        target = self.workdir / dest
        for source in sources:
            origin = context / source
            if origin.is_dir():
                for file in origin.rglob("*"):
                    relative = file.relative_to(context).as_posix()
                    if file.is_file() and not ignore.excludes(relative):
                        copied = target / file.relative_to(origin)
                        copied.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(file, copied)
            else:
                assert not ignore.excludes(source), f"{source} is not in the build context"
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target / origin.name)

    def _run(self, command: str) -> None:
        result = subprocess.run(
            ["sh", "-c", command],
            cwd=self.workdir or self.root,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=540,
        )
        assert result.returncode == 0, f"RUN {command}\n{result.stdout}\n{result.stderr}"


@pytest.fixture
def image(tmp_path: Path) -> ImageRoot:
    """The image's file system and runtime environment, built by the Dockerfile's own steps."""
    _, stages = read_dockerfile()
    build, runtime = stages[0], stages[-1]
    ignore = DockerIgnore()
    # These RUN lines execute on this machine, not in a container: allow only venv and pip steps.
    for run in build.all("RUN"):
        assert re.match(r"(python -m venv|pip) ", run.arguments), f"not run here: {run.arguments}"
    # The build runs with this machine's network settings (proxies, pip configuration) and a
    # `python` that is the interpreter running the tests, as the base image's is Python 3.11.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "python").symlink_to(sys.executable)
    builder = ImageRoot(tmp_path / "image", {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"})
    builder.root.mkdir()
    builder.apply(build, context=REPO, ignore=ignore, run=True)

    home = tmp_path / "home"
    home.mkdir()
    final = ImageRoot(builder.root, {"PATH": IMAGE_BASE_PATH, "HOME": str(home), "LANG": "C.UTF-8"})
    # The runtime stage's RUN adds a system user: that would change this machine, not an image.
    final.apply(runtime, context=REPO, ignore=ignore, run=False)
    return final


def _local(url: str) -> str:
    """A Compose URL with the service's host name replaced by 127.0.0.1."""
    parts = urlsplit(url)
    assert parts.hostname in COMPOSE_HOSTS, url
    credentials, at, _ = parts.netloc.rpartition("@")
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{credentials}{at}127.0.0.1{port}"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Names:
    """Per-test broker and Redis names, so the test shares nothing with other tests."""

    token: str
    input_queue: str
    results_exchange: str
    dead_letter_queue: str
    key_prefix: str

    @property
    def keys(self) -> RedisKeys:
        return RedisKeys(self.key_prefix)


@pytest.fixture
def compose_environment() -> tuple[dict[str, str], Names]:
    """The worker's docker-compose.yml environment on 127.0.0.1 with unique names."""
    environment = service_environment(load_yaml(COMPOSE_FILE)["services"]["worker"])
    environment["REDIS_URL"] = _local(environment["REDIS_URL"])
    environment["RABBITMQ_URL"] = _local(environment["RABBITMQ_URL"])
    token = uuid.uuid4().hex[:12]
    names = Names(
        token=token,
        input_queue=f"neiromatrius.deploy-test.{token}.messages",
        results_exchange=f"neiromatrius.deploy-test.{token}.classified",
        dead_letter_queue=f"neiromatrius.deploy-test.{token}.dead",
        key_prefix=f"neiromatrius-deploy-test:{token}:",
    )
    environment.update(
        INPUT_QUEUE=names.input_queue,
        RESULTS_EXCHANGE=names.results_exchange,
        DEAD_LETTER_QUEUE=names.dead_letter_queue,
        REDIS_KEY_PREFIX=names.key_prefix,
        STATS_HOST="127.0.0.1",
        STATS_PORT=str(_free_port()),
    )
    return environment, names


@pytest.fixture
async def broker(
    compose_environment: tuple[dict[str, str], Names],
) -> AsyncIterator[AbstractConnection]:
    """A connection to the local RabbitMQ; afterwards it deletes whatever the test's names made."""
    environment, names = compose_environment
    connection = await aio_pika.connect(environment["RABBITMQ_URL"])
    try:
        yield connection
    finally:
        await _delete_broker_objects(connection, names)
        await connection.close()
        client = aioredis.from_url(environment["REDIS_URL"])
        try:
            keys = [key async for key in client.scan_iter(match=names.keys.everything, count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


async def _delete_broker_objects(connection: AbstractConnection, names: Names) -> None:
    queues = {names.input_queue, names.dead_letter_queue}
    exchanges = {names.results_exchange}
    # The worker may derive more names (retry queues, a dead-letter exchange) from these.
    ctl = shutil.which("rabbitmqctl")
    if ctl:
        for kind, found in (("list_queues", queues), ("list_exchanges", exchanges)):
            listed = await asyncio.to_thread(
                subprocess.run,
                [ctl, "-q", kind, "name"],
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )
            found.update(n for n in listed.stdout.split() if names.token in n)
    channel = await connection.channel()
    for queue in queues:
        await channel.queue_delete(queue)
    for exchange in exchanges:
        await channel.exchange_delete(exchange)
    await channel.close()


async def _when_declared(
    connection: AbstractConnection, *, queue: str = "", exchange: str = ""
) -> None:
    """Wait until the worker has declared a queue or an exchange (passive declares)."""
    deadline = asyncio.get_running_loop().time() + STARTUP_S
    while True:
        channel: AbstractChannel = await connection.channel()
        try:
            if queue:
                await channel.get_queue(queue, ensure=True)
            else:
                await channel.get_exchange(exchange, ensure=True)
            return
        except aio_pika.exceptions.ChannelClosed:
            assert asyncio.get_running_loop().time() < deadline, f"not declared: {queue}{exchange}"
            await asyncio.sleep(0.2)
        finally:
            if not channel.is_closed:
                await channel.close()


class Replica:
    """The running CMD, with everything it prints kept for assertions and failure messages."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.connected = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            self.lines.append(line)
            if CONNECTED in line:
                self.connected.set()

    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    def assert_running(self) -> None:
        assert self.process.returncode is None, (
            f"the replica exited with {self.process.returncode}:\n{self.output()}"
        )

    async def stop(self, timeout_s: float) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), timeout_s)
        await self._reader
        return code

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self._reader.cancel()


async def _get_ok(url: str, replica: Replica) -> httpx.Response:
    """Poll an HTTP endpoint of the replica until it answers 200."""
    deadline = asyncio.get_running_loop().time() + STARTUP_S
    async with httpx.AsyncClient(timeout=2.0) as http:
        while True:
            replica.assert_running()
            try:
                response = await http.get(url)
                if response.status_code == 200:
                    return response
            except httpx.TransportError:
                pass
            assert asyncio.get_running_loop().time() < deadline, (
                f"{url} never answered 200:\n{replica.output()}"
            )
            await asyncio.sleep(0.2)


@pytest.mark.integration
@pytest.mark.timeout(600)
async def test_image_cmd_serves_processes_and_stops_cleanly(
    image: ImageRoot,
    compose_environment: tuple[dict[str, str], Names],
    broker: AbstractConnection,
) -> None:
    """The image's CMD, built by the Dockerfile's steps and run with the compose environment,
    connects to Redis, is healthy, classifies a message, and exits 0 on SIGTERM."""
    environment, names = compose_environment
    _, stages = read_dockerfile()
    runtime = stages[-1]
    env = {**image.env, **environment}

    command = runtime.last("CMD").exec_form()
    assert command is not None
    executable = shutil.which(command[0], path=env["PATH"])
    assert executable is not None
    assert Path(executable).is_relative_to(image.path(VENV)), executable
    process = await asyncio.create_subprocess_exec(
        executable,
        *command[1:],
        cwd=image.workdir,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    replica = Replica(process)
    try:
        try:
            await asyncio.wait_for(replica.connected.wait(), STARTUP_S)
        except TimeoutError:
            pytest.fail(f"no {CONNECTED!r} in the log:\n{replica.output()}")

        stats = f"http://127.0.0.1:{environment['STATS_PORT']}"
        live = await _get_ok(f"{stats}/health/live", replica)
        assert isinstance(live.json(), dict)
        probe = runtime.last("HEALTHCHECK").exec_form()
        assert probe is not None
        healthcheck = await asyncio.create_subprocess_exec(
            shutil.which(probe[0], path=env["PATH"]) or probe[0], *probe[1:], env=env
        )
        assert await asyncio.wait_for(healthcheck.wait(), 10) == 0, "Docker would mark it unhealthy"
        await _get_ok(f"{stats}/health/ready", replica)

        await _when_declared(broker, exchange=names.results_exchange)
        await _when_declared(broker, queue=names.input_queue)
        channel = await broker.channel(publisher_confirms=True)
        results = await channel.declare_queue(exclusive=True, auto_delete=True)
        await results.bind(names.results_exchange, routing_key="#")

        message_id = f"deploy-test-{names.token}"
        sent = {"message_id": message_id, "text": "Server is down, help urgently", "chat_id": 7}
        await channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps(sent).encode(),
                message_id=message_id,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=names.input_queue,
            mandatory=True,
        )

        deadline = asyncio.get_running_loop().time() + RESULT_S
        while (result := await results.get(no_ack=True, fail=False)) is None:
            replica.assert_running()
            assert asyncio.get_running_loop().time() < deadline, (
                f"no result on {names.results_exchange}:\n{replica.output()}"
            )
            await asyncio.sleep(0.1)
        body = json.loads(result.body)
        assert {k: body[k] for k in sent} == sent
        assert result.message_id == message_id
        assert body["classification"]["label"] == result.routing_key
        await channel.close()

        replica.assert_running()
        code = await replica.stop(STOP_S)
        assert code == 0, f"exit code {code} after SIGTERM:\n{replica.output()}"
    finally:
        await replica.kill()

"""A Redis server of a test's own, on a free port, that the test may stop and start at will."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def launch(args: list[str], port: int, what: str) -> subprocess.Popen[bytes]:
    """Start a server process and wait (10 s at most) until it accepts connections on ``port``."""
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process
        except OSError:
            time.sleep(0.02)
    process.kill()
    raise AssertionError(f"{what} did not start on port {port}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SpareRedis:
    """``redis-server`` on 127.0.0.1:``port`` with its data in ``directory``."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        password: str = "",
        appendonly: bool = False,
        maxmemory: str = "",
        maxmemory_policy: str = "",
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.maxmemory = maxmemory  # e.g. "2mb"; empty: no limit
        self.maxmemory_policy = maxmemory_policy  # e.g. "allkeys-lru"; empty: the server's default
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> SpareRedis:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        args = [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--dir",
            str(self.directory),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory]
        if self.maxmemory_policy:
            args += ["--maxmemory-policy", self.maxmemory_policy]
        self.process = launch(args, self.port, "redis-server")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    ca_key, ca, key, request, cert = (
        directory / name for name in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )
    extensions = directory / "server.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", request],
        [
            *("x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial"),
            *("-out", cert, "-extfile", extensions),
        ],
    ):
        subject = ["-subj", "/CN=neiromatrius-test"] if args[0] == "req" else []
        subprocess.run(
            ["openssl", *map(str, args), *subject, "-days", "2"],
            check=True,
            capture_output=True,
            timeout=60,
        )
    return ca, cert, key


class TlsRedis(SpareRedis):
    """``redis-server`` answering only TLS on 127.0.0.1:``port`` (certificates from ``make_tls_files``)."""

    def __init__(self, directory: Path, *, password: str = "") -> None:
        super().__init__(directory, password=password)
        self.ca, self.cert, self.key = make_tls_files(directory)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca}"

    def start(self) -> TlsRedis:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        args = [binary, "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(self.port)]
        args += ["--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key)]
        args += ["--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = launch(args, self.port, "redis-server (TLS)")
        return self

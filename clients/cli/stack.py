"""Putting a stack together for the CLI: which server, the embedded one, local worker processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from broker.connection import url_from_env
from broker.server import EmbeddedServer, die_with_parent, running_embedded

STATE_DIR = Path(os.environ.get("FLEET_HOME", ".fleet"))


class NoServer(RuntimeError):
    pass


def client_url(explicit: str | None) -> str:
    """The server a client command talks to: --nats, $FLEET_NATS_URL, or a running ``fleet up``."""
    url = explicit or url_from_env() or running_embedded(STATE_DIR)
    if not url:
        raise NoServer(
            f"no NATS server: pass --nats URL, set FLEET_NATS_URL, or start one with 'fleet up' (looked in {STATE_DIR}/)"
        )
    return url


@contextlib.contextmanager
def server_or_embedded(explicit: str | None, store: Path, *, record: bool = False) -> Iterator[str]:
    """Yield a server URL; start an embedded nats-server under ``store`` if none is given."""
    url = explicit or url_from_env()
    if url:
        yield url
        return
    server = EmbeddedServer(store).start()
    state = server.write_state(STATE_DIR) if record else None
    try:
        yield server.url
    finally:
        if state is not None:
            with contextlib.suppress(OSError):
                state.unlink()
        server.stop()


def worker_cmd(
    url: str,
    *,
    concurrency: int,
    queue: str = "default",
    heartbeat: float | None = None,
    lease: float | None = None,
    worker_id: str | None = None,
    executor: str = "thread",
    grace: float | None = None,
    allow: list[str] | None = None,
) -> list[str]:
    """argv of a ``fleet worker`` child; options left None take the worker's defaults."""
    cmd = [
        sys.executable,
        "-m",
        "clients.cli.main",
        "worker",
        "--nats",
        url,
        "--concurrency",
        str(concurrency),
        "--queue",
        queue,
        "--executor",
        executor,
    ]
    if heartbeat is not None:
        cmd += ["--heartbeat", str(heartbeat)]
    if lease is not None:
        cmd += ["--lease", str(lease)]
    if grace is not None:
        cmd += ["--grace", str(grace)]
    if worker_id:
        cmd += ["--id", worker_id]
    for prefix in allow or []:
        cmd += ["--allow", prefix]
    return cmd


def spawn(cmd: list[str], *, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a child in its own session; its output goes to ``log`` if given, else ours."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    )
    if log is None:
        return subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)
    with log.open("ab") as fh:
        return subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


def stop_all(procs: list[subprocess.Popen[bytes]], grace: float = 15.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

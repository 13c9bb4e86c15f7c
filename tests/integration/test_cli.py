"""The ``fleet`` command line, run as a real subprocess against a real server.

Most tests run the scheduler and workers in-process (in the test's event loop) and the CLI with
``asyncio.create_subprocess_exec`` so the services keep running while a command executes. One test
runs ``fleet up`` itself and finds it through ``$FLEET_HOME/server.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Stack, subprocess_env, wait_for

from broker.server import free_port

CLI = [sys.executable, "-m", "clients.cli.main"]


class Result:
    def __init__(self, rc: int, out: str, err: str) -> None:
        self.rc, self.out, self.err = rc, out, err

    @property
    def err_text(self) -> str:
        """stderr with terminal line wrapping undone (rich wraps at 80 columns when not a tty)."""
        return self.err.replace("\n", "")

    def __repr__(self) -> str:
        return f"rc={self.rc}\n--- stdout\n{self.out[-2000:]}\n--- stderr\n{self.err[-2000:]}"


async def fleet(*args: str, home: Path, cwd: Path = REPO, timeout: float = 30.0, **env: str) -> Result:
    """Run ``fleet ARGS`` and wait for it (without blocking the event loop)."""
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        cwd=cwd,
        env=subprocess_env(**{"FLEET_HOME": str(home), "COLUMNS": "80", **env}),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"fleet {' '.join(args)} did not finish within {timeout}s") from None
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def write_job(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


SQUARES = """\
    name: squares
    handler: handlers:square
    inputs:
      range: [0, 1000]
    bundle: 50
    retries: 0
    """


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "fleet-home"
    path.mkdir()
    return path


async def test_submit_status_results(stack: Stack, tmp_path: Path, home: Path) -> None:
    await stack.up(workers=2, concurrency=4)
    jobfile = write_job(tmp_path / "job.yaml", SQUARES)

    sub = await fleet("submit", str(jobfile), "--nats", stack.url, home=home)
    assert sub.rc == 0, sub
    job = sub.out.strip()
    assert job.startswith("j-") and "\n" not in job, sub

    await stack.client.wait_job(job, timeout=15)
    st = await fleet("status", job, "--json", home=home, FLEET_NATS_URL=stack.url)
    assert st.rc == 0, st
    status = json.loads(st.out)
    assert status["job_id"] == job and status["name"] == "squares"
    # counts are per task: 1,000 items in bundles of 50 are 20 tasks
    assert status["total"] == 20 and status["submitted"] == 20
    assert status["counts"]["succeeded"] == 20
    assert sum(status["counts"].values()) == 20
    assert status["done"] == 20 and status["finished"] is True and status["cancelled"] is False

    out = tmp_path / "results.jsonl"
    res = await fleet("results", job, "--out", str(out), "--nats", stack.url, home=home)
    assert res.rc == 0, res
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1000
    assert "1000 results" in res.err_text
    items = {int(r["task_id"][1:]) * 50 + r["index"]: r["result"] for r in rows}
    assert items == {i: i * i for i in range(1000)}
    assert all(r["outcome"] == "succeeded" and r["job_id"] == job for r in rows)

    listing = await fleet("status", "--json", "--nats", stack.url, home=home)
    assert listing.rc == 0, listing
    assert [j["job_id"] for j in json.loads(listing.out)] == [job]
    table = await fleet("status", "--nats", stack.url, home=home, COLUMNS="200")
    assert table.rc == 0 and job in table.out, table


async def test_submit_with_explicit_id_and_cancel(stack: Stack, tmp_path: Path, home: Path) -> None:
    await stack.up(workers=1, concurrency=1)
    jobfile = write_job(
        tmp_path / "slow.yaml",
        """\
        name: slow
        handler: handlers:slow_item
        inputs:
          list: [1, 2, 3, 4, 5, 6, 7, 8]
        kwargs: {seconds: 5}
        """,
    )
    sub = await fleet("submit", str(jobfile), "--id", "my-job-1", "--nats", stack.url, home=home)
    assert sub.rc == 0 and sub.out.strip() == "my-job-1", sub

    can = await fleet("cancel", "my-job-1", "--nats", stack.url, home=home)
    assert can.rc == 0, can
    assert "cancel requested for my-job-1" in can.err_text
    record = await stack.client.wait_job("my-job-1", timeout=10)
    assert record.cancelled and record.counts == {"cancelled": 8}


async def test_jobfile_with_typo_key_is_rejected_in_one_line(tmp_path: Path, home: Path) -> None:
    write_job(tmp_path / "typo.yaml", SQUARES.replace("handler:", "handlr:"))
    res = await fleet("submit", "typo.yaml", "--nats", "nats://127.0.0.1:1", home=home, cwd=tmp_path)
    assert res.rc != 0, res
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, res
    assert "handlr" in lines[0] and "typo.yaml" in lines[0] and "error" in lines[0]
    assert res.out == ""


async def test_jobfile_missing_field_is_rejected_in_one_line(tmp_path: Path, home: Path) -> None:
    write_job(tmp_path / "noin.yaml", "name: x\nhandler: handlers:square\n")
    res = await fleet("submit", "noin.yaml", "--nats", "nats://127.0.0.1:1", home=home, cwd=tmp_path)
    assert res.rc != 0, res
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and "inputs" in lines[0] and "required" in lines[0].lower(), res


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "name: x\nhandler: h:f\ncommand: [echo]\ninputs: {list: [1]}\n",
            "exactly one of handler or command",
        ),
        ("name: x\nhandler: h:f\ninputs: {list: [1], range: [0, 2]}\n", "exactly one of"),
        ("name: x\nhandler: h:f\ninputs: {list: [1]}\nbundle: 0\n", "bundle"),
        ("name: x\nhandler: h:f\ninputs: {list: [1]}\npriority: high\n", "priority"),
        ("- just\n- a list\n", "mapping"),
        ("name: [unclosed\n", "YAML"),
    ],
)
async def test_invalid_jobfiles_name_the_problem(tmp_path: Path, home: Path, text: str, needle: str) -> None:
    (tmp_path / "j.yaml").write_text(text)
    res = await fleet("submit", "j.yaml", "--nats", "nats://127.0.0.1:1", home=home, cwd=tmp_path)
    assert res.rc != 0, res
    assert needle in res.err_text, res
    assert "Traceback" not in res.err


async def test_missing_jobfile(tmp_path: Path, home: Path) -> None:
    res = await fleet("submit", "nope.yaml", "--nats", "nats://127.0.0.1:1", home=home, cwd=tmp_path)
    assert res.rc != 0 and "nope.yaml" in res.err_text and "Traceback" not in res.err, res


async def test_jobfile_error_stays_one_line_with_a_long_path(tmp_path: Path, home: Path) -> None:
    """Regression: rich once hard-wrapped errors at 80 columns when stderr is not a terminal."""
    deep = tmp_path / ("a-directory-with-a-rather-long-name-" * 2)
    deep.mkdir()
    jobfile = write_job(deep / "typo.yaml", SQUARES.replace("handler:", "handlr:"))
    res = await fleet("submit", str(jobfile), "--nats", "nats://127.0.0.1:1", home=home)
    assert res.rc != 0, res
    assert "handlr" in res.err_text and str(jobfile) in res.err_text, res
    assert len(res.err.strip().splitlines()) == 1, res


async def test_status_of_unknown_job(stack: Stack, home: Path) -> None:
    await stack.up(workers=0)
    for verb in (["status"], ["status", "--json"], ["results"], ["cancel"], ["watch"]):
        res = await fleet(*verb[:1], "j-does-not-exist", *verb[1:], "--nats", stack.url, home=home)
        assert res.rc != 0, (verb, res)
        assert "no job 'j-does-not-exist'" in res.err_text, (verb, res)
        assert "Traceback" not in res.err and res.out == "", (verb, res)


async def test_invalid_job_id_is_a_clear_error(stack: Stack, home: Path) -> None:
    await stack.up(workers=0)
    res = await fleet("status", "bad.id", "--nats", stack.url, home=home)
    assert res.rc != 0 and "invalid job id" in res.err_text and "Traceback" not in res.err, res


@pytest.fixture(scope="module")
def no_server(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Result]:
    """``fleet status`` against a closed port, run once for the tests below (it takes ~10 s)."""
    url = f"nats://127.0.0.1:{free_port()}"
    home = tmp_path_factory.mktemp("no-server-home")
    env = subprocess_env(FLEET_HOME=str(home), COLUMNS="80")
    proc = subprocess.run(
        [*CLI, "status", "j-x", "--nats", url],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=40,
        check=False,
    )
    return url, Result(
        proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    )


def test_no_server_reachable(no_server: tuple[str, Result]) -> None:
    url, res = no_server
    assert res.rc != 0, res
    assert "cannot reach NATS" in res.err_text and url in res.err_text, res
    assert "Traceback" not in res.err, res


def test_no_server_reachable_is_one_clear_line(no_server: tuple[str, Result]) -> None:
    """Regression: one warning line per reconnect attempt once preceded the error."""
    _, res = no_server
    assert res.rc != 0, res
    assert res.err.count("\n") <= 2 and "nats error" not in res.err, res


async def test_no_server_configured(tmp_path: Path, home: Path) -> None:
    res = await fleet("status", home=home, cwd=tmp_path)
    assert res.rc != 0, res
    assert "no NATS server" in res.err_text and "--nats" in res.err_text, res


async def test_fleet_up_is_found_through_fleet_home(tmp_path: Path, home: Path) -> None:
    """``fleet up`` (embedded server + scheduler + workers) and client verbs that find it on their own."""
    log = (tmp_path / "up.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "up",
        "--workers",
        "1",
        "--concurrency",
        "4",
        cwd=REPO,
        env=subprocess_env(FLEET_HOME=str(home)),
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    try:
        state = home / "server.json"
        await wait_for(lambda: state.exists() or proc.returncode is not None, timeout=20, what="server.json")
        assert proc.returncode is None, (tmp_path / "up.log").read_text()
        url = json.loads(state.read_text())["url"]
        jobfile = write_job(
            tmp_path / "job.yaml", SQUARES.replace("[0, 1000]", "[0, 100]").replace("50", "10")
        )

        sub = await fleet("submit", str(jobfile), home=home)
        assert sub.rc == 0, sub
        job = sub.out.strip()

        async def finished() -> dict[str, Any] | None:
            st = await fleet("status", job, "--json", home=home)
            assert st.rc == 0, st
            doc: dict[str, Any] = json.loads(st.out)
            return doc if doc["finished"] else None

        status = await wait_for(finished, timeout=30, what="job finished", interval=0.1)
        assert status["counts"]["succeeded"] == 10
        assert url.startswith("nats://127.0.0.1:")
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        log.close()
    assert not (home / "server.json").exists(), "fleet up left its server.json behind"


async def test_retry_by_failure_class_and_the_dead_letter_queue(
    stack: Stack, tmp_path: Path, home: Path
) -> None:
    """`fleet retry --errors CLASS`, `fleet dlq list|show|replay`, and failures in `status --json`."""
    await stack.up(workers=1, concurrency=2)
    client = stack.client
    flaky = await client.submit_job("handlers:permanent", items=[1, 2], bundle=1)
    bad = await client.submit_job("no_such_module_xyz:run", items=[1], bundle=1)
    await client.wait_job(flaky, timeout=10)
    await client.wait_job(bad, timeout=10)

    st = await fleet("status", flaky, "--json", "--nats", stack.url, home=home)
    assert st.rc == 0, st
    assert json.loads(st.out)["failures"] == {"error": 2}
    res = await fleet("results", flaky, "--nats", stack.url, home=home)
    rows = [json.loads(line) for line in res.out.splitlines()]
    assert [r["failure"] for r in rows] == ["error", "error"] and all(r["outcome"] == "failed" for r in rows)

    # a class the job does not have re-runs nothing; an unknown class is a clear usage error
    none = await fleet("retry", flaky, "--errors", "network,lost", "--nats", stack.url, home=home)
    assert none.rc == 0, none
    typo = await fleet("retry", flaky, "--errors", "netwrk", "--nats", stack.url, home=home)
    assert typo.rc == 2 and "unknown failure class 'netwrk'" in typo.err_text, typo
    again = await fleet("retry", flaky, "--errors", "error", "--nats", stack.url, home=home)
    assert again.rc == 0 and "retry requested" in again.err_text, again

    async def retried() -> bool:
        rec = await client.job(flaky)
        return rec is not None and rec.finished and rec.retries == 2

    await wait_for(retried, timeout=10, what="both tasks re-run and failed again")
    assert [r.attempt async for r in client.tasks(flaky)] == [2, 2]

    listing = await fleet("dlq", "list", bad, "--json", "--nats", stack.url, home=home)
    assert listing.rc == 0, listing
    (letter,) = json.loads(listing.out)
    assert letter["failure"] == "invalid" and "no_such_module_xyz" in letter["reason"]
    show = await fleet("dlq", "show", bad, letter["task_id"], "--nats", stack.url, home=home)
    assert show.rc == 0 and json.loads(show.out)["task_id"] == letter["task_id"], show
    missing = await fleet("dlq", "show", bad, "t9999999", "--nats", stack.url, home=home)
    assert missing.rc == 1 and "no dead letter" in missing.err_text, missing
    replay = await fleet("dlq", "replay", bad, "--nats", stack.url, home=home)
    assert replay.rc == 0 and "replay requested" in replay.err_text, replay

    async def replayed() -> bool:
        state = await client.state(bad, letter["task_id"])
        return state is not None and state.attempt == 2 and state.state == "dead"

    await wait_for(replayed, timeout=10, what="the dead task replayed (and dead again)")

"""``fleet``: the command line. One function per verb; the work is in the SDK and services."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from broker.connection import url_from_env
from broker.names import InvalidName
from broker.server import ServerError, running_embedded
from clients.cli import policy as policy_cli
from clients.cli import stack, views
from clients.sdk.client import FleetClient, FleetClientError
from clients.sdk.jobfile import JobFileError
from clients.sdk.jobfile import load as load_jobfile
from fleet.core.records import RetryPolicy
from fleet.policy.config import PolicyError
from fleet.policy.config import load_file as load_policy_file

app = typer.Typer(add_completion=False, no_args_is_help=True, help="fleet: a worker fleet on NATS JetStream.")
err = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")

PolicyOpt = Annotated[
    Path | None, typer.Option("--policy", help="Scheduling policy file (YAML); stored in KV at start.")
]
NatsOpt = Annotated[
    str | None,
    typer.Option("--nats", help="NATS server URL(s), comma separated. Default: $FLEET_NATS_URL or embedded."),
]


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[red]fleet: error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return asyncio.run(coro_fn())  # type: ignore[arg-type]
    except PolicyError as exc:
        _fail(str(exc), 2)
    except (FleetClientError, JobFileError, InvalidName, stack.NoServer, ServerError, ValueError) as exc:
        _fail(str(exc))
    except (ConnectionError, OSError, TimeoutError) as exc:
        _fail(f"cannot reach NATS: {exc}")
    raise AssertionError("unreachable")


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("nats").setLevel(logging.WARNING if not verbose else logging.DEBUG)


# -- services --------------------------------------------------------------------------------------
@app.command()
def up(
    nats: NatsOpt = None,
    workers: Annotated[int, typer.Option(help="Local worker processes to start.")] = 2,
    concurrency: Annotated[int, typer.Option(help="Slots per worker.")] = 4,
    heartbeat: Annotated[float, typer.Option(help="Heartbeat interval (s).")] = 1.0,
    lease: Annotated[float, typer.Option(help="Lease (AckWait, s) when the queue is created.")] = 60.0,
    store: Annotated[Path, typer.Option(help="Embedded JetStream store.")] = stack.STATE_DIR / "data",
    policy: PolicyOpt = None,
    verbose: bool = False,
) -> None:
    """Run the embedded JetStream, the scheduler and N local workers in the foreground (Ctrl-C stops all)."""
    from fleet.scheduler.service import SchedulerSettings, serve

    settings = SchedulerSettings(policy_file=_checked_policy(policy))
    _logging(verbose)
    stack.STATE_DIR.mkdir(parents=True, exist_ok=True)
    with stack.server_or_embedded(nats, store, record=True) as url:
        procs = [
            stack.spawn(stack.worker_cmd(url, concurrency=concurrency, heartbeat=heartbeat, lease=lease))
            for _ in range(workers)
        ]
        err.print(
            f"fleet up: NATS {url}, scheduler + {workers} workers x {concurrency} slots. Ctrl-C to stop."
        )
        try:
            asyncio.run(serve(url, settings))
        except KeyboardInterrupt:
            pass
        finally:
            stack.stop_all(procs)
    err.print("fleet up: stopped")


@app.command()
def scheduler(
    nats: NatsOpt = None,
    store: Path = stack.STATE_DIR / "data",
    policy: PolicyOpt = None,
    verbose: bool = False,
) -> None:
    """Run the scheduler service (starts an embedded server if no URL is given and none is running)."""
    from fleet.scheduler.service import SchedulerSettings

    settings = SchedulerSettings()
    if policy is not None:
        settings = settings.model_copy(update={"policy_file": _checked_policy(policy)})
    _logging(verbose)
    existing = nats or url_from_env() or running_embedded(stack.STATE_DIR)
    stack.STATE_DIR.mkdir(parents=True, exist_ok=True)
    with stack.server_or_embedded(existing, store, record=existing is None) as url:
        from fleet.scheduler.service import serve

        asyncio.run(serve(url, settings))


@app.command()
def worker(
    nats: NatsOpt = None,
    queue: str = "default",
    concurrency: Annotated[int, typer.Option(min=1)] = 4,
    executor: Annotated[str, typer.Option(help="thread or process, for blocking handlers.")] = "thread",
    heartbeat: Annotated[float, typer.Option(min=0.01, help="Heartbeat interval (s).")] = 1.0,
    lease: Annotated[
        float | None,
        typer.Option(min=0.1, show_default="60", help="Lease (AckWait, s) if this worker creates the queue."),
    ] = None,
    grace: Annotated[float, typer.Option(min=0, help="Seconds to finish running tasks on SIGTERM.")] = 30.0,
    worker_id: Annotated[str | None, typer.Option("--id")] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            "--allow",
            metavar="PREFIX",
            help="Only run handlers whose module is PREFIX or under it (repeatable). "
            "Default: anything but the standard library.",
        ),
    ] = None,
    path: Annotated[list[Path] | None, typer.Option(help="Add to sys.path for handler imports.")] = None,
    cpus: Annotated[float | None, typer.Option(help="CPUs this worker offers (default: all).")] = None,
    gpus: Annotated[int, typer.Option(help="GPUs this worker offers.")] = 0,
    memory: Annotated[int | None, typer.Option(help="Memory (MB) it offers (default: all).")] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", metavar="KEY=VALUE", help="A label tasks can ask for.")
    ] = None,
    verbose: bool = False,
) -> None:
    """Run one worker: pull tasks of QUEUE and run them."""
    from broker.provision import DEFAULT_LEASE_S
    from fleet.worker.runtime import WorkerSettings, serve

    _logging(verbose)
    for p in [Path.cwd(), *(path or [])]:
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    url = _url_or_fail(nats)
    settings = WorkerSettings(
        queue=queue,
        concurrency=concurrency,
        executor=executor,
        heartbeat_s=heartbeat,
        lease_s=lease if lease is not None else DEFAULT_LEASE_S,
        grace_s=grace,
        worker_id=worker_id or "",
        allow=list(allow or []),
        gpus=gpus,
        labels=_labels(label or []),
    )
    if cpus is not None or memory is not None:  # else: what the machine has
        extra: dict[str, Any] = {"cpus": cpus} if cpus is not None else {}
        settings = settings.model_copy(update=extra | ({"memory_mb": memory} if memory is not None else {}))
    asyncio.run(serve(url, settings))


def _labels(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--label {item!r}: expected KEY=VALUE", 2)
        out[key] = value
    return out


def _checked_policy(path: Path | None) -> str | None:
    """A policy file is checked before anything starts: exit 2 naming the bad entry."""
    if path is None:
        return None
    try:
        load_policy_file(str(path))
    except PolicyError as exc:
        _fail(str(exc), 2)
    return str(path)


def _url_or_fail(nats: str | None) -> str:
    try:
        return stack.client_url(nats)
    except stack.NoServer as exc:
        _fail(str(exc))
    raise AssertionError("unreachable")


# -- client verbs ----------------------------------------------------------------------------------
@app.command()
def submit(
    jobfile: Path, nats: NatsOpt = None, job_id: Annotated[str | None, typer.Option("--id")] = None
) -> None:
    """Submit the sweep described by JOBFILE (YAML); prints the job id."""
    try:
        job, items = load_jobfile(jobfile)
    except JobFileError as exc:
        _fail(str(exc), 2)
    url = _url_or_fail(nats)

    async def go() -> str:
        async with await FleetClient.connect(url) as fleet:
            return await fleet.submit_job(
                job.handler,
                command=job.command,
                items=items,
                bundle=job.bundle,
                job_id=job_id,
                name=job.name,
                args=job.args,
                kwargs=job.kwargs,
                tenant=job.tenant,
                queue=job.queue,
                priority=job.priority,
                qos=job.qos,
                project=job.project,
                limits=job.limits,
                retry=RetryPolicy(max_attempts=job.retries + 1, backoff_s=job.backoff),
                timeout_s=job.timeout,
                resources=job.resources,
                labels=job.labels,
            )

    print(_run(go))


@app.command()
def status(
    job: Annotated[str | None, typer.Argument()] = None,
    nats: NatsOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Counts by state for JOB (or every job)."""
    url = _url_or_fail(nats)

    async def go() -> list[Any]:
        async with await FleetClient.connect(url) as fleet:
            if job is None:
                return await fleet.jobs()
            record = await fleet.job(job)
            if record is None:
                raise FleetClientError(f"no job {job!r} (unknown, or older than the history window)")
            return [record]

    records = _run(go)
    if as_json:
        out = [views.job_json(r) for r in records]
        print(json.dumps(out[0] if job else out, indent=2))
    else:
        Console().print(views.jobs_table(records))


@app.command()
def watch(job: str, nats: NatsOpt = None) -> None:
    """Live progress bars for JOB, fed by its event stream."""
    url = _url_or_fail(nats)

    async def go() -> None:
        async with await FleetClient.connect(url) as fleet:
            if await fleet.job(job) is None:
                raise FleetClientError(f"no job {job!r}")
            await views.watch(fleet, job, Console())

    _run(go)


@app.command()
def results(
    job: str, nats: NatsOpt = None, out: Annotated[Path | None, typer.Option("--out")] = None
) -> None:
    """Results of JOB as JSONL (one line per item), to stdout or --out FILE."""
    url = _url_or_fail(nats)

    async def go() -> int:
        async with await FleetClient.connect(url) as fleet:
            if await fleet.job(job) is None:
                raise FleetClientError(f"no job {job!r}")
            fh = out.open("w") if out else sys.stdout
            try:
                return await views.write_results(fleet, job, fh)
            finally:
                if out:
                    fh.close()

    n = _run(go)
    if out:
        err.print(f"{n} results written to {out}")


@app.command()
def cancel(job: str, task: Annotated[str | None, typer.Option()] = None, nats: NatsOpt = None) -> None:
    """Cancel JOB (or one --task of it): queued work is dropped, running work is stopped."""
    url = _url_or_fail(nats)

    async def go() -> None:
        async with await FleetClient.connect(url) as fleet:
            if await fleet.job(job) is None:
                raise FleetClientError(f"no job {job!r}")
            await fleet.cancel(job, task)

    _run(go)
    err.print(f"cancel requested for {job}{'/' + task if task else ''}")


FAILURE_ALIASES = {
    "network": "infra",
    "storage": "infra",
    "oom": "killed",
    "signal": "killed",
    "application": "error",
    "lease": "lost",
    "preemption": "preempted",
}


def _failure_classes(values: list[str]) -> list[str]:
    """Classes from ``--errors`` values: repeated or comma separated, with a few common aliases."""
    from fleet.core.failures import FailureClass

    known = {str(c) for c in FailureClass}
    out = []
    for value in values:
        for word in filter(None, (w.strip().lower() for w in value.split(","))):
            name = FAILURE_ALIASES.get(word, word)
            if name not in known:
                _fail(f"unknown failure class {word!r}; use one of: {', '.join(sorted(known))}", 2)
            out.append(name)
    return out


@app.command()
def retry(
    job: str,
    errors: Annotated[
        list[str] | None,
        typer.Option(
            "--errors",
            help="Only tasks whose last failure is of these classes (repeat, or comma separate; "
            "'network' and 'storage' mean infra).",
        ),
    ] = None,
    include_dead: Annotated[bool, typer.Option("--include-dead", help="Also re-run dead tasks.")] = False,
    nats: NatsOpt = None,
) -> None:
    """Re-run the failed tasks of JOB (classes: error timeout killed lost preempted infra invalid)."""
    classes = _failure_classes(errors or [])
    url = _url_or_fail(nats)

    async def go() -> str:
        async with await FleetClient.connect(url) as fleet:
            if await fleet.job(job) is None:
                raise FleetClientError(f"no job {job!r}")
            return await fleet.retry(job, failures=classes or None, include_dead=include_dead)

    request = _run(go)
    err.print(f"retry requested for {job} ({request})")


dlq_app = typer.Typer(help="Inspect and replay dead letters.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("list")
def dlq_list(
    job: Annotated[str | None, typer.Argument()] = None,
    nats: NatsOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Dead letters (of JOB's tasks, or all of them), oldest first."""
    url = _url_or_fail(nats)

    async def go() -> list[Any]:
        async with await FleetClient.connect(url) as fleet:
            return [d async for d in fleet.dead_letters(job)]

    letters = _run(go)
    if as_json:
        print(json.dumps([views.letter_json(d) for d in letters], indent=2))
    else:
        Console().print(views.letters_table(letters))


@dlq_app.command("show")
def dlq_show(job: str, task: str, nats: NatsOpt = None) -> None:
    """One task's dead letter, as JSON."""
    url = _url_or_fail(nats)

    async def go() -> Any:
        async with await FleetClient.connect(url) as fleet:
            letter = await fleet.dead_letter(job, task)
            if letter is None:
                raise FleetClientError(f"no dead letter for {job}/{task}")
            return letter

    print(json.dumps(views.letter_json(_run(go), raw=True), indent=2))


@dlq_app.command("replay")
def dlq_replay(
    job: str, tasks: Annotated[list[str] | None, typer.Argument()] = None, nats: NatsOpt = None
) -> None:
    """Run JOB's dead tasks again (all of them, or the TASKS named)."""
    url = _url_or_fail(nats)

    async def go() -> str:
        async with await FleetClient.connect(url) as fleet:
            return await fleet.retry(job, include_dead=True, task_ids=tasks or None)

    err.print(f"replay requested for {job} ({_run(go)})")


@app.command()
def demo(
    workers: int = 3,
    points: int = 2000,
    bundle: int = 20,
    kill: Annotated[bool, typer.Option(help="kill -9 one worker midway")] = True,
) -> None:
    """The main job: a Monte Carlo sweep on an embedded fleet, with retries and a killed worker."""
    from clients.cli.demo import run_demo

    raise typer.Exit(run_demo(workers=workers, points=points, bundle=bundle, kill=kill))


@app.command()
def bench(
    tasks: int = 5000,
    workers: int = 2,
    concurrency: int = 64,
    nats: NatsOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """End-to-end throughput and latency of no-op tasks, beside bare JetStream as the ceiling."""
    from clients.cli.bench import run_bench

    raise typer.Exit(
        run_bench(tasks=tasks, workers=workers, concurrency=concurrency, nats=nats, as_json=as_json)
    )


@app.command("bench-bare-worker", hidden=True)
def bench_bare_worker(nats: str, batch: int = 256) -> None:
    from clients.cli.bench import bare_worker

    asyncio.run(bare_worker(nats, batch))


@app.command()
def chaos(
    rounds: Annotated[int, typer.Option(min=1, help="Rounds of each fault.")] = 20,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            "--fault",
            help="Only this fault (repeatable): kill-worker stop-worker drain-worker kill-nats "
            "kill-scheduler publish-faults poison block.",
        ),
    ] = None,
    tasks: Annotated[int, typer.Option(min=1, help="fenced_commit tasks per round.")] = 60,
    workdir: Annotated[
        Path | None, typer.Option(help="Where every process logs (default: a new temporary directory).")
    ] = None,
) -> None:
    """Break a real fleet (kill -9, SIGSTOP, SIGTERM, server and scheduler crashes, publish faults,
    poison, blocking handlers) and check that no task is lost and none is committed twice."""
    import tempfile

    from clients.cli.chaos import Options, run_chaos

    where = workdir or Path(tempfile.mkdtemp(prefix="fleet-chaos-"))
    try:
        code = run_chaos(rounds, fault, where, options=Options(tasks=tasks))
    except ValueError as exc:
        _fail(str(exc), 2)
    raise typer.Exit(code)


policy_cli.register(app)


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so embedded servers and local workers are stopped cleanly
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    app()


if __name__ == "__main__":
    main()

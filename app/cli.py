"""The console script: ``headshot-gateway migrate|serve|simulate|dev|openapi|keys|
upstream-check``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import gc
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

import uvicorn
from pydantic import SecretStr

if TYPE_CHECKING:
    from app.settings import Settings


def _settings(**overrides: Any) -> Settings:
    from app.settings import Settings

    return Settings(**overrides)


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.migrate import upgrade

    settings = _settings()
    upgrade(settings.effective_database_url, args.revision)
    print(f"database at {args.revision}")
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


# After SIGTERM a ``serve`` process ends within its grace period and this much more,
# whatever is stuck (a thread that never returns, a close that never completes): a
# watchdog then ends it (``_watchdog``).
SHUTDOWN_MARGIN_S = 30.0
# ``serve --workers N``: a worker still running this much after its own watchdog was
# due is killed by the supervisor.
OVERDUE_AFTER_WATCHDOG_S = 10.0


def _watchdog(
    after_s: float, finished: Callable[[], bool], loop: asyncio.AbstractEventLoop | None
) -> None:
    """In ``after_s``, if the process still runs: one ``error`` record naming what is left
    (``shutdown_overrun``; the event loop's tasks, each with the awaits it is in), every
    thread's stack on stderr, and the exit: 0 if the app's shutdown had finished (leases
    given back, connections closed; only the event loop's or the interpreter's own
    teardown was left), 1 if not (its leases lapse, as after a SIGKILL). Lock-free:
    whatever holds a lock in the stuck process, the watchdog does not wait for it."""

    def fire() -> None:
        done = finished()
        record = logging.getLogger("app.cli").makeRecord(
            "app.cli",
            logging.ERROR,
            __file__,
            0,
            "shutdown still running %.0fs after SIGTERM: exiting",
            (after_s,),
            None,
            extra={
                "shutdown_overrun": True,
                "app_shutdown_finished": done,
                "tasks_left": _tasks_left(loop),
            },
        )
        handlers = logging.getLogger().handlers
        # Its filters too (the log's context, secrets scrubbed); ``tasks_left`` holds
        # task names and code locations only.
        line = handlers[0].format(record) if handlers and handlers[0].filter(record) else ""
        line = line or record.getMessage()
        with contextlib.suppress(OSError):
            os.write(sys.stderr.fileno(), line.encode() + b"\n")
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(0 if done else 1)

    timer = threading.Timer(after_s, fire)
    timer.daemon = True
    timer.start()


def _tasks_left(loop: asyncio.AbstractEventLoop | None) -> list[str]:
    """The event loop's unfinished tasks, each as ``name: outer:line > … > inner:line``,
    the awaits down to the one it waits on. Read from another thread while the loop is
    stuck: best effort."""
    if loop is None or loop.is_closed():
        return []
    left = []
    try:
        for task in asyncio.all_tasks(loop):
            left.append(f"{task.get_name()}: {_awaits(task.get_coro())}")
    except Exception:  # the loop changed them meanwhile
        left.append("?")
    return sorted(left)


def _awaits(awaited: Any) -> str:
    chain: list[str] = []
    while awaited is not None and len(chain) < 64:
        frame = next(
            (f for k in ("cr", "ag", "gi") if (f := getattr(awaited, f"{k}_frame", None))), None
        )
        if frame is None:
            break
        chain.append(f"{frame.f_code.co_qualname}:{frame.f_lineno}")
        following = next(
            (
                a
                for k in ("cr_await", "ag_await", "gi_yieldfrom")
                if (a := getattr(awaited, k, None))
            ),
            None,
        )
        if following is not None and not hasattr(following, "cr_frame"):
            # ``anext(gen)``/``gen.athrow()`` (an async context manager's exit, as the
            # lifespan's) name no generator; the manager holds it as ``gen``.
            following = getattr(frame.f_locals.get("self"), "gen", following)
        awaited = following
    return " > ".join(chain[-8:]) or "?"


class _Server(uvicorn.Server):
    """uvicorn's server, with what the process holds once it has started (the modules,
    the app, its engine and clients) moved out of the cycle collector's reach
    (``gc.freeze``). A full collection walks every object it tracks while the event
    loop waits; without this each walked the whole startup heap too (a 159 ms pause
    under load, bench.cpu_split life at 60/s: docs/benchmarks.md, "forty-fourth
    round"). Frozen objects are still freed by their reference counts."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            gc.freeze()


class _DrainingServer(_Server):
    """uvicorn's server, telling the app to stop taking work the moment SIGTERM arrives
    (uvicorn notices on its next tick, then waits for open requests before the lifespan
    shutdown; the scheduler should not claim new tasks meanwhile), and arming the
    watchdog that bounds the whole exit (``_watchdog``)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None], bound_s: float) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._bound_s = bound_s
        self.shut_down = False  # the app's lifespan shutdown ran to its end

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            loop: asyncio.AbstractEventLoop | None = None
            with contextlib.suppress(RuntimeError):  # not serving yet: nothing to drain
                loop = asyncio.get_running_loop()
            if loop is not None:
                loop.call_soon_threadsafe(self._on_exit)  # we are in a signal handler
            _watchdog(self._bound_s, lambda: self.shut_down, loop)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        self.shut_down = not self.force_exit  # forced: uvicorn skipped the app's shutdown


def cmd_serve(args: argparse.Namespace) -> int:
    from app import logs

    settings = _settings()
    logs.setup(settings)
    workers = max(1, int(getattr(args, "workers", 1) or 1))
    if workers == 1:
        return _serve_one(settings, args.host, args.port)
    if not settings.effective_database_url.startswith("postgresql"):
        # Several processes on one SQLite file would be correct (SQLite locks the file) but
        # slower, not faster (one writer at a time, met in SQLite's sleeping busy handler),
        # and `Prefer: wait` / event streams are woken by commits of their own process only.
        print(
            "serve --workers N > 1 needs PostgreSQL (GATEWAY_DATABASE_URL); with SQLite "
            "run one process",
            file=sys.stderr,
        )
        return 2
    return _supervise(settings, args.host, args.port, workers)


def _serve_one(settings: Settings, host: str, port: int, sock: socket.socket | None = None) -> int:
    """One ``serve`` process: the app (its own owner id, engine, scheduler, workers) under
    uvicorn, on ``sock`` when a supervisor shares its listening socket."""
    from app.main import begin_drain, create_app
    from app.reads import SmallReads

    # uvicorn shuts down gracefully on SIGTERM and then re-raises the signal, which under
    # the default disposition kills the process (exit -15/143) although it stopped
    # cleanly. Make SIGTERM end the process with 0, before and after uvicorn's handling.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    app = create_app(settings)
    # One grace period bounds the whole drain: open requests (uvicorn), then the jobs
    # still running (every background loop counts from the same SIGTERM), then leases
    # released.
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        # httptools fed 16 KiB reads, a connection's reads paused past 32 KiB of body
        # not yet taken: at most 48 KiB held per connection, not ~320 KB (app/reads.py).
        http=cast("type[asyncio.Protocol]", SmallReads),
        log_config=None,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
    )
    server = _DrainingServer(
        config,
        on_exit=lambda: begin_drain(app),
        bound_s=settings.shutdown_grace_s + SHUTDOWN_MARGIN_S,
    )
    server.run(sockets=[sock] if sock is not None else None)
    return 0 if server.started else 3


# A worker that exits with an error this soon after its start is failing to start
# (database unreachable, bad settings): the supervisor stops instead of restarting it in
# a loop. One killed by a signal is replaced whenever it happens.
_EARLY_EXIT_S = 10.0


def _supervise(settings: Settings, host: str, port: int, workers: int) -> int:
    """``serve --workers N``: N forked ``serve`` processes accepting on one listening
    socket. Each is a replica like any other (its own owner id, pool, scheduler and
    leases: the same rules as separate replicas on one PostgreSQL, docs/operations.md).
    SIGTERM / SIGINT is passed to every worker, which drains as one process would; a
    worker that dies is replaced (its tasks' leases lapse and any replica takes them
    over), unless it exited with an error within ``_EARLY_EXIT_S`` of its start. A worker
    that cannot be forked (EAGAIN, ENOMEM) stops them all: exit 1 once they have ended."""
    log = logging.getLogger("app.cli")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    children: dict[int, float] = {}
    stopping = False
    code = 0
    handled = {signal.SIGTERM, signal.SIGINT, signal.SIGALRM}
    overdue_s = settings.shutdown_grace_s + SHUTDOWN_MARGIN_S + OVERDUE_AFTER_WATCHDOG_S

    def start() -> bool:
        # Signals wait until each process has its own handlers: a SIGTERM landing in the
        # new worker before its first line would run the supervisor's ``stop_all`` there.
        signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        try:
            pid = os.fork()
        except OSError as e:  # EAGAIN / ENOMEM: no process to start
            signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
            log.error(
                "serve worker could not be started (fork: %s)",
                e.strerror,
                extra={"worker_fork_failed": True, "errno": e.errno},
            )
            return False
        if pid == 0:  # the worker
            status = 1
            try:
                signal.signal(signal.SIGTERM, _exit_on_sigterm)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                # The supervisor's last look at a worker that never ended: its stacks.
                faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
                status = _serve_one(settings, host, port, sock)
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else 0
            except BaseException:
                log.exception("serve worker failed")
            finally:
                with contextlib.suppress(BaseException):  # a second SIGTERM meanwhile
                    logging.shutdown()
                os._exit(status)
        children[pid] = time.monotonic()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
        return True

    def cannot_start() -> None:
        # The workers already running drain and end; the supervisor exits 1 after them,
        # not leaving them to serve on without it (its process manager starts it again).
        nonlocal code
        code = code or 1
        stop_all(signal.SIGTERM, None)

    def stop_all(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:
            # Each worker's own watchdog ends it by then (``_watchdog``); this one is for
            # a worker stuck where its own cannot act (before serving, or in C code).
            signal.setitimer(signal.ITIMER_REAL, overdue_s)
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def kill_overdue(signum: int, frame: FrameType | None) -> None:
        nonlocal code
        overdue = list(children)
        for pid in overdue:
            log.error(
                "serve worker %d still running %.0fs after SIGTERM: killed",
                pid,
                overdue_s,
                extra={"worker_overrun": True, "worker_pid": pid},
            )
        for pid in overdue:  # one at a time, so that their stacks do not mix
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)  # its stacks on stderr (faulthandler)
            time.sleep(0.5)
        for pid in overdue:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            code = code or 1

    signal.signal(signal.SIGALRM, kill_overdue)
    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    for _ in range(workers):
        if not start():
            cannot_start()
            break
    else:
        log.info("serving with %d worker processes", workers, extra={"workers": workers})
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        started = children.pop(pid, None)
        if started is None:
            continue
        exit_code = os.waitstatus_to_exitcode(status)
        if stopping:
            code = code or (exit_code if exit_code > 0 else 0)
            continue
        log.error(
            "serve worker %d ended (exit %d)",
            pid,
            exit_code,
            extra={"worker_pid": pid, "exit_code": exit_code},
        )
        if exit_code > 0 and time.monotonic() - started < _EARLY_EXIT_S:
            code = exit_code
            stop_all(signal.SIGTERM, None)
        elif not start():
            cannot_start()
    sock.close()
    return code


def cmd_simulate(args: argparse.Namespace) -> int:
    from app.simulator import SimConfig, create_sim_app

    _logging(os.environ.get("SIM_LOG_LEVEL", "INFO"))
    config = SimConfig.from_env()
    if "SIM_PUBLIC_URL" not in os.environ:
        config.public_url = f"http://{args.host}:{args.port}"
    server = _Server(
        uvicorn.Config(
            create_sim_app(config),
            host=args.host,
            port=args.port,
            log_level="warning",
            access_log=False,
        )
    )
    server.run()
    return 0 if server.started else 3


def cmd_openapi(args: argparse.Namespace) -> int:
    from app.main import create_app

    spec = json.dumps(create_app(_settings()).openapi(), indent=2, sort_keys=False) + "\n"
    if args.output == "-":
        sys.stdout.write(spec)
    else:
        Path(args.output).write_text(spec)
    return 0


def _dev_key(data_dir: Path) -> str:
    path = data_dir / "dev-client-key"
    if path.exists():
        return path.read_text().strip()
    key = "hgw_dev_" + secrets.token_urlsafe(24)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def cmd_dev(args: argparse.Namespace) -> int:
    """SQLite + simulator + gateway on loopback, in one process."""
    from app.main import create_app
    from app.migrate import upgrade
    from app.simulator import SimConfig, create_sim_app

    sim_url = f"http://{args.host}:{args.sim_port}"
    gw_url = f"http://{args.host}:{args.port}"
    base = _settings()
    base.data_dir.mkdir(parents=True, exist_ok=True)
    key = _dev_key(base.data_dir)
    sim_secret = secrets.token_urlsafe(16)
    settings = _settings(
        env="dev",
        wiro_base_url=f"{sim_url}/v1",
        wiro_api_key="dev-project-key",
        wiro_api_secret=sim_secret,
        public_url=gw_url,
        api_keys=f"dev={key}",
        allow_private_networks=True,
        poll_initial_s=float(os.environ.get("GATEWAY_POLL_INITIAL_S", 3)),
        output_hosts=f"{args.host},{base.output_hosts}",
    )
    from app import logs

    logs.setup(settings)  # env=dev: readable lines, not JSON
    upgrade(settings.effective_database_url)
    sim_config = SimConfig.from_env()
    sim_config.public_url = sim_url
    sim_config.api_key = "dev-project-key"
    sim_config.api_secret = SecretStr(sim_secret)

    curl = (
        f"curl -sS -X POST {gw_url}/v1/tasks -H 'Authorization: Bearer {key}' "
        '-H \'Content-Type: application/json\' -d \'{"input": {"inputImageUrl": '
        f'"{sim_url}/samples/portrait.jpg", "background": "office", '
        '"aspectRatio": "1:1", "outputFormat": "png"}}\''
    )
    print(f"gateway:    {gw_url}   (API docs: {gw_url}/docs)", flush=True)
    print(f"simulator:  {sim_url}  (a fake Wiro; knobs at {sim_url}/__sim/config)", flush=True)
    print(f"database:   {settings.effective_database_url}", flush=True)
    print(f"client key: {key}", flush=True)
    print("submit a task with:", flush=True)
    print(curl, flush=True)
    print(f"then: curl -sS {gw_url}/v1/tasks -H 'Authorization: Bearer {key}'", flush=True)
    # Only the submit line starts with "curl " (scripts look for it).
    print(
        f"and once it has succeeded, the stored headshot: curl -sS "
        f"{gw_url}/v1/tasks/<task id>/outputs/0 -H 'Authorization: Bearer {key}' "
        "-o headshot.png",
        flush=True,
    )

    async def both() -> None:
        sim = uvicorn.Server(
            uvicorn.Config(
                create_sim_app(sim_config),
                host=args.host,
                port=args.sim_port,
                log_level="warning",
                log_config=None,
            )
        )
        gw = uvicorn.Server(
            uvicorn.Config(
                create_app(settings),
                host=args.host,
                port=args.port,
                log_level="warning",
                log_config=None,
            )
        )
        await asyncio.gather(sim.serve(), gw.serve())

    asyncio.run(both())
    return 0


def cmd_upstream_check(args: argparse.Namespace) -> int:
    from app import upstream_check

    return upstream_check.main(args, _settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="headshot-gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("migrate", help="bring the database to the newest revision")
    p.add_argument("--revision", default="heads")
    p.set_defaults(func=cmd_migrate)
    for name, func, port in (("serve", cmd_serve, 8000), ("simulate", cmd_simulate, 8100)):
        p = sub.add_parser(name)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=port)
        p.set_defaults(func=func)
        if name == "serve":
            p.add_argument(
                "--workers",
                type=int,
                default=1,
                help="processes accepting on one socket, each a replica with its "
                "own owner id (PostgreSQL only; default 1)",
            )
    p = sub.add_parser("dev", help="SQLite + simulator + gateway on loopback")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--sim-port", type=int, default=8100)
    p.set_defaults(func=cmd_dev)
    p = sub.add_parser("openapi", help="write the OpenAPI spec")
    p.add_argument("--output", default="openapi/openapi.json")
    p.set_defaults(func=cmd_openapi)
    from app import cli_keys

    cli_keys.add_parser(sub)
    from app import upstream_check

    upstream_check.add_parser(sub)
    sub.choices["upstream-check"].set_defaults(func=cmd_upstream_check)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

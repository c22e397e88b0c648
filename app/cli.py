"""The console script: ``headshot-gateway migrate|serve|simulate|dev|openapi|keys|
upstream-check``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from pydantic import SecretStr

if TYPE_CHECKING:
    from app.settings import Settings


def _settings(**overrides: Any) -> Settings:
    from app.settings import Settings

    return Settings(**overrides)


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.migrate import upgrade

    settings = _settings()
    upgrade(settings.effective_database_url, args.revision)
    print(f"database at {args.revision}")
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app to stop taking work the moment SIGTERM arrives
    (uvicorn notices on its next tick, then waits for open requests before the lifespan
    shutdown; the scheduler should not claim new tasks meanwhile)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                pass  # not serving yet: nothing to drain
            else:
                loop.call_soon_threadsafe(self._on_exit)  # we are in a signal handler
        super().handle_exit(sig, frame)


def cmd_serve(args: argparse.Namespace) -> int:
    from app import logs
    from app.main import begin_drain, create_app

    settings = _settings()
    logs.setup(settings)
    # uvicorn shuts down gracefully on SIGTERM and then re-raises the signal, which under
    # the default disposition kills the process (exit -15/143) although it stopped
    # cleanly. Make SIGTERM end the process with 0, before and after uvicorn's handling.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    app = create_app(settings)
    # One grace period bounds the whole drain: open requests (uvicorn), then the checks
    # still running (the scheduler counts from the same SIGTERM), then leases released.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None,
                            log_level=settings.log_level.lower(), access_log=False,
                            timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)))
    server = _DrainingServer(config, on_exit=lambda: begin_drain(app))
    server.run()
    return 0 if server.started else 3


def cmd_simulate(args: argparse.Namespace) -> int:
    from app.simulator import SimConfig, create_sim_app

    _logging(os.environ.get("SIM_LOG_LEVEL", "INFO"))
    config = SimConfig.from_env()
    if "SIM_PUBLIC_URL" not in os.environ:
        config.public_url = f"http://{args.host}:{args.port}"
    uvicorn.run(create_sim_app(config), host=args.host, port=args.port,
                log_level="warning", access_log=False)
    return 0


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
        env="dev", wiro_base_url=f"{sim_url}/v1", wiro_api_key="dev-project-key",
        wiro_api_secret=sim_secret, public_url=gw_url, api_keys=f"dev={key}",
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
        "-H 'Content-Type: application/json' -d '{\"input\": {\"inputImageUrl\": "
        f"\"{sim_url}/samples/portrait.jpg\", \"background\": \"office\", "
        "\"aspectRatio\": \"1:1\", \"outputFormat\": \"png\"}}'"
    )
    print(f"gateway:    {gw_url}   (API docs: {gw_url}/docs)", flush=True)
    print(f"simulator:  {sim_url}  (a fake Wiro; knobs at {sim_url}/__sim/config)", flush=True)
    print(f"database:   {settings.effective_database_url}", flush=True)
    print(f"client key: {key}", flush=True)
    print("submit a task with:", flush=True)
    print(curl, flush=True)
    print(f"then: curl -sS {gw_url}/v1/tasks -H 'Authorization: Bearer {key}'", flush=True)
    # Only the submit line starts with "curl " (scripts look for it).
    print(f"and once it has succeeded, the stored headshot: curl -sS "
          f"{gw_url}/v1/tasks/<task id>/outputs/0 -H 'Authorization: Bearer {key}' "
          "-o headshot.png", flush=True)

    async def both() -> None:
        sim = uvicorn.Server(uvicorn.Config(create_sim_app(sim_config), host=args.host,
                                            port=args.sim_port, log_level="warning",
                                            log_config=None))
        gw = uvicorn.Server(uvicorn.Config(create_app(settings), host=args.host,
                                           port=args.port, log_level="warning",
                                           log_config=None))
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

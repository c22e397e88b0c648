"""``create_app(settings)``: the API, the upstream client and the background workers."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import Depends, FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import logs, metrics, stats
from app.api import callbacks, health
from app.api import results as result_routes
from app.api import stats as stats_routes
from app.api import tasks as task_routes
from app.clients import Keyring
from app.console import router as console_router
from app.db import make_engine, make_sessionmaker
from app.errors import install_handlers, problem, problems_in_spec
from app.hardening import RequestLimits, insecure_public_url
from app.migrate import head_revisions
from app.outbound import Outbound
from app.outbox import Services
from app.ratelimit import RateLimiter
from app.settings import Settings
from app.store import DirectoryStore
from app.tasks import Ctx
from app.wakeup import Hub, PgListener, attach_local
from app.wiro import NonceSource, WiroClient
from app.workers.jobs import result_workers
from app.workers.scheduler import Scheduler

log = logging.getLogger(__name__)
# aiosqlite logs every statement with its parameters at DEBUG: stored tokens, hashes and
# callers' metadata would reach the logs whenever the level is lowered.
logging.getLogger("aiosqlite").setLevel(logging.INFO)

DESCRIPTION = """\
A gateway in front of Wiro's `wiro/professional-headshot` model: submit headshot tasks,
read them, list and filter the history, read each task's event timeline, cancel; be
notified (signed webhooks, every attempt logged, redeliver), fetch the outputs the gateway
keeps, upload your own photo, and erase a task's images here and at Wiro.

Every `/v1` route takes `Authorization: Bearer <key>` (the upload files under `/files/`,
which Wiro fetches, are public at unguessable URLs). Errors are
`application/problem+json` (RFC 9457). Statuses only move forward:
`pending → queued → running → succeeded | failed | cancelled | timed_out`.
"""


class BodyLimit:
    """413 for bodies over the limit, by Content-Length or by counting the stream."""

    def __init__(self, app: ASGIApp, *, default: int, callbacks: int,
                 uploads: int | None = None) -> None:
        self.app, self.default, self.callbacks = app, default, callbacks
        self.uploads = uploads or default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        limit = (self.callbacks if path.startswith("/callbacks/")
                 else self.uploads if path == "/v1/uploads" else self.default)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    await _too_large(scope, receive, send, limit)
                    return
        # No usable Content-Length (chunked): buffer up to the limit, then replay.
        # Bodies here are small (64 KiB, 1 MiB for callbacks), so this costs little.
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                await _too_large(scope, receive, send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    resp = problem(413, "Payload Too Large", f"The request body is over {limit} bytes.")
    await resp(scope, receive, send)


class DrainGate:
    """While the process drains (SIGTERM), refuse new API requests with 503 so callers
    retry on another replica. Callbacks, health and metrics still answer: a callback only
    marks its task due, which whichever replica continues will act on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["path"].startswith("/v1/")
                and getattr(scope["app"].state, "draining", False)):
            resp = problem(503, "Service Unavailable", "This instance is shutting down; retry.",
                           headers={"Retry-After": "1", "Connection": "close"})
            await resp(scope, receive, send)
            return
        await self.app(scope, receive, send)


def begin_drain(app: FastAPI) -> None:
    """Stop taking work (SIGTERM, before uvicorn's own shutdown): readiness fails, new API
    requests get 503, the scheduler stops claiming and its grace period starts."""
    app.state.draining = True
    scheduler = getattr(app.state, "scheduler", None)
    if scheduler is not None:
        scheduler.drain()
    hub = getattr(app.state, "hub", None)
    if hub is not None:
        hub.drain()


async def _log_task_id(request: Request) -> None:
    """Every log line of a request about one task names it. (``async``: a plain ``def``
    dependency would cost every request a hop through the thread pool.)"""
    task_id = request.path_params.get("task_id")
    if task_id:
        logs.bind(task_id=str(task_id)[:40])


def create_app(settings: Settings | None = None, *, start_workers: bool = True,
               wiro_transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.effective_database_url)
        http = httpx.AsyncClient(transport=wiro_transport, follow_redirects=False,
                                 limits=httpx.Limits(max_connections=100,
                                                     max_keepalive_connections=20))
        wiro = WiroClient(
            base_url=settings.wiro_base_url, api_key=settings.wiro_api_key,
            api_secret=settings.wiro_api_secret, http=http,
            # A random slot per process keeps nonces unique across replicas.
            nonce_source=NonceSource(replica_slot=secrets.randbelow(1000)),
            timeout=httpx.Timeout(settings.wiro_read_timeout_s,
                                  connect=settings.wiro_connect_timeout_s))
        ctx = Ctx(settings=settings, sm=make_sessionmaker(engine), wiro=wiro)
        scheduler = Scheduler(ctx, grace_s=settings.shutdown_grace_s)
        ctx.wake = scheduler.wake
        ctx.track = scheduler.track
        app.state.db_gauges = metrics.DbGauges(read=lambda: stats.live_counts(ctx))
        app.state.ctx = ctx
        app.state.scheduler = scheduler
        services = Services(ctx=ctx, store=DirectoryStore(settings.data_dir),
                            outbound=Outbound())
        result_loops = result_workers(services)
        app.state.services = services
        # What wakes `Prefer: wait` and event streams: commits that wrote task events.
        hub = app.state.hub = Hub(max_per_client=settings.max_waiters_per_client)
        listener = None
        if engine.dialect.name == "postgresql":
            listener = PgListener(settings.effective_database_url, hub)
            listener.start()
        else:
            attach_local(engine, hub)
        app.state.listener = listener
        if settings.webhook_secret is None:
            log.warning("GATEWAY_WEBHOOK_SECRET is not set: tasks with a webhook_url are "
                        "accepted but their notifications are recorded as failed")
        if settings.env == "prod" and insecure_public_url(settings.public_url):
            log.warning("GATEWAY_PUBLIC_URL is plain http on a non-loopback host: callback "
                        "tokens and uploaded images travel unencrypted (docs/security.md)")
        if start_workers:
            scheduler.start()
            for loop in result_loops:
                loop.start()
        log.info("gateway started", extra={"owner": ctx.owner})
        try:
            yield
        finally:
            await scheduler.stop()
            if listener is not None:
                await listener.stop()
            for loop in result_loops:
                await loop.stop()
            await services.outbound.aclose()
            await http.aclose()
            await engine.dispose()

    app = FastAPI(
        title="headshot-gateway", version="1.0.0", description=DESCRIPTION,
        lifespan=lifespan, dependencies=[Depends(_log_task_id)],
    )
    app.state.draining = False
    app.state.settings = settings
    app.state.keyring = Keyring(settings)
    app.state.rate_limiter = RateLimiter()
    app.state.migration_heads = head_revisions()
    install_handlers(app)
    problems_in_spec(app)
    app.include_router(task_routes.router)
    app.include_router(callbacks.router)
    app.include_router(result_routes.router)
    app.include_router(result_routes.files)
    app.include_router(stats_routes.router)
    app.include_router(health.router)
    app.include_router(console_router)
    app.add_middleware(BodyLimit, default=settings.body_limit_bytes,
                       callbacks=settings.callback_body_limit_bytes,
                       # the file plus room for the multipart framing
                       uploads=settings.upload_max_bytes + 64 * 1024)
    app.add_middleware(RequestLimits, max_header_bytes=settings.max_header_bytes,
                       max_query_bytes=settings.max_query_bytes)
    app.add_middleware(DrainGate)
    app.add_middleware(logs.RequestContext)  # outermost: sees every answer, 413s included
    return app

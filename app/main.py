"""``create_app(settings)``: the API, the upstream client and the background workers."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.routing import APIRoute

from app import metrics, stats, tracing
from app.api import callbacks, health, submit_direct
from app.api import results as result_routes
from app.api import stats as stats_routes
from app.api import tasks as task_routes
from app.api.deps import log_task_id
from app.api.direct import DirectRoute, declared_route
from app.clients import Keyring
from app.console import router as console_router
from app.context import Ctx
from app.db import make_engine, make_sessionmaker
from app.errors import install_handlers, problems_in_spec
from app.gate import EdgeGate
from app.hardening import insecure_public_url
from app.loopload import LoopLoad
from app.migrate import head_revisions
from app.outbound import Outbound
from app.outbox import Services
from app.output_process import Limits, OutputProcess
from app.ratelimit import RateLimiter
from app.settings import Settings
from app.store import DirectoryStore
from app.wakeup import Hub, PgListener, attach_local
from app.wiro import NonceSource, WiroClient, WiroHTTP
from app.workers.jobs import reclaim_leases, result_workers
from app.workers.loop import WorkerLoop
from app.workers.scheduler import Scheduler

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

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


def _resumer(loops: tuple[WorkerLoop, ...]) -> Callable[[], None]:
    """``Ctx.resume``: the background loops held back for submits go on."""

    def resume() -> None:
        for loop in loops:
            loop.resume()

    return resume


def begin_drain(app: FastAPI) -> None:
    """Stop taking work (SIGTERM, before uvicorn's own shutdown): readiness fails, new API
    requests get 503 (``app.gate``), every background loop (the scheduler, outputs,
    notifications, erasures) stops claiming and its grace period starts, so one grace
    period from the SIGTERM bounds them all. Callbacks, health and metrics still answer:
    a callback only marks its task due, which whichever replica continues will act on."""
    app.state.draining = True
    for loop in getattr(app.state, "loops", ()):
        loop.drain()
    hub = getattr(app.state, "hub", None)
    if hub is not None:
        hub.drain()


async def _log_task_id(request: Request) -> None:
    """Every log line of a request about one task names it (``deps.log_task_id``).
    (``async``: a plain ``def`` dependency would cost every request a hop through the
    thread pool.)"""
    log_task_id(request.path_params)


def add_routes(app: FastAPI, router: APIRouter) -> None:
    """``router``'s routes as the app's own, the same routes ``app.include_router`` makes
    (the app's dependencies first; the router's prefix, tags and responses are already in
    each route). FastAPI 0.16x keeps an included router as a branch it re-resolves on
    every request, matching the path twice and walking every router again for a 404;
    the app's own routes are matched once, in order."""
    for route in router.routes:
        if not isinstance(route, APIRoute):
            raise TypeError(f"{route!r}: only path operations are copied")
        app.router.add_api_route(
            route.path,
            route.endpoint,
            response_model=route.response_model,
            status_code=route.status_code,
            tags=route.tags,
            dependencies=route.dependencies,
            summary=route.summary,
            description=route.description,
            response_description=route.response_description,
            responses=route.responses,
            deprecated=route.deprecated,
            methods=route.methods,
            operation_id=route.operation_id,
            response_model_include=route.response_model_include,
            response_model_exclude=route.response_model_exclude,
            response_model_by_alias=route.response_model_by_alias,
            response_model_exclude_unset=route.response_model_exclude_unset,
            response_model_exclude_defaults=route.response_model_exclude_defaults,
            response_model_exclude_none=route.response_model_exclude_none,
            include_in_schema=route.include_in_schema,
            response_class=route.response_class,
            name=route.name,
            route_class_override=type(route),
            callbacks=route.callbacks,
            openapi_extra=route.openapi_extra,
            generate_unique_id_function=route.generate_unique_id_function,
            strict_content_type=route.strict_content_type,
            max_body_size=route.max_body_size,
            form_limits=route.form_limits,
        )


def create_app(
    settings: Settings | None = None,
    *,
    start_workers: bool = True,
    wiro_transport: httpx.AsyncBaseTransport | None = None,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """``tracer_provider``: trace with this one (tests); by default the ``OTEL_*``
    variables decide whether there are traces at all (app/tracing.py)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        provider = tracer_provider if tracer_provider is not None else tracing.provider_from_env()
        if provider is not None:
            tracing.install(provider)
        engine = make_engine(settings.effective_database_url)
        http = WiroHTTP(wiro_transport)
        wiro = WiroClient(
            base_url=settings.wiro_base_url,
            api_key=settings.wiro_api_key,
            api_secret=settings.wiro_api_secret,
            http=http,
            # A random slot per process keeps nonces unique across replicas.
            nonce_source=NonceSource(replica_slot=secrets.randbelow(1000)),
            timeout=httpx.Timeout(
                settings.wiro_read_timeout_s, connect=settings.wiro_connect_timeout_s
            ),
        )
        ctx = Ctx(settings=settings, sm=make_sessionmaker(engine), wiro=wiro)
        scheduler = Scheduler(ctx, grace_s=settings.shutdown_grace_s)
        ctx.wake = scheduler.wake
        ctx.track = scheduler.track
        app.state.db_gauges = metrics.DbGauges(read=lambda: stats.live_counts(ctx))
        app.state.ctx = ctx
        store = DirectoryStore(settings.data_dir)
        services = Services(ctx=ctx, store=store, outbound=Outbound())
        if settings.output_process:
            services.output_process = OutputProcess(Limits.of(settings), store.root)
        result_loops = result_workers(services)
        app.state.loops = (scheduler, *result_loops)  # what ``begin_drain`` drains
        ctx.resume = _resumer(app.state.loops)
        load = app.state.loop_load = LoopLoad(on_calm=lambda: ctx.resume())
        ctx.loop_busy = load.busy
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
            log.warning(
                "GATEWAY_WEBHOOK_SECRET is not set: tasks with a webhook_url are "
                "accepted but their notifications are recorded as failed"
            )
        if settings.env == "prod" and insecure_public_url(settings.public_url):
            log.warning(
                "GATEWAY_PUBLIC_URL is plain http on a non-loopback host: callback "
                "tokens and uploaded images travel unencrypted (docs/security.md)"
            )
        if start_workers:
            # The leases of a process that ended here are given back before the loops
            # first claim, so that claim takes them; in a task of its own, so a database
            # that is down holds up the claims (which could do nothing) but not the start.
            first = None
            if settings.reclaim_local_leases:
                first = asyncio.ensure_future(reclaim_leases(ctx))
                scheduler.run_beside(first, name="reclaim-leases")  # cancelled by stop
            scheduler.start(after=first)
            for loop in result_loops:
                loop.start(after=first)
        if settings.submits_first_at:  # the probe's only reader is the hold (``Ctx.room``)
            load.start()
        log.info("gateway started", extra={"owner": ctx.owner})
        try:
            yield
        finally:
            load.stop()
            await scheduler.stop()
            if listener is not None:
                await listener.stop()
            for loop in result_loops:
                await loop.stop()
            await services.outbound.aclose()
            if services.output_process is not None:
                await services.output_process.aclose()
            await http.aclose()
            await engine.dispose()
            if provider is not None:
                tracing.uninstall(provider)
                if tracer_provider is None:
                    provider.shutdown()  # flushes the spans still queued for export

    app = FastAPI(
        title="headshot-gateway",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        dependencies=[Depends(_log_task_id)],
        # ``/v1/tasks/`` is a 404, not a redirect to a URL built from the Host header.
        redirect_slashes=False,
        telemetry=tracing.NO_NATIVE_TELEMETRY,  # the gateway traces with its own provider
    )
    app.state.draining = False
    app.state.settings = settings
    app.state.keyring = Keyring(settings)
    app.state.rate_limiter = RateLimiter()
    app.state.stats_cache = stats_routes.StatsCache()
    app.state.migration_heads = head_revisions()
    install_handlers(app)
    problems_in_spec(app)
    result_routes.limit_upload_spool()
    for router in (
        task_routes.router,
        callbacks.router,
        result_routes.router,
        result_routes.files,
        stats_routes.router,
        health.router,
        console_router,
    ):
        add_routes(app, router)
    # Wiro's callbacks, the hot route nobody waits on, in plain ASGI (app/api/direct.py).
    callback = declared_route(app.router.routes, callbacks.wiro_callback)
    app.router.routes.insert(0, DirectRoute(callback, "POST", callbacks.direct))
    # The submit too, for JSON bodies (app/api/submit_direct.py; other types: FastAPI's).
    submit = declared_route(app.router.routes, task_routes.create_task)
    app.router.routes.insert(
        1,
        DirectRoute(
            submit,
            "POST",
            submit_direct.handler(submit, [_log_task_id]),
            submit_direct.accepts,
        ),
    )
    # One layer of our own around the routes (app/gate.py): the request's log context,
    # span and metrics, and the edge checks (limits, drain, keys, rates, bodies).
    app.add_middleware(EdgeGate, settings=settings)
    return app

"""All configuration, from the environment (prefix ``GATEWAY_``) or a ``.env`` file."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The default per-client request rate when GATEWAY_ENV=prod (docs/security.md).
PROD_CLIENT_RATE_PER_S = 100.0  # as Stripe's live-mode default per account
WIRO_CDN_HOSTS = "cdn.wiro.ai,cdn1.wiro.ai,cdn2.wiro.ai,cdn3.wiro.ai,api.wiro.ai"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    env: Literal["dev", "prod", "test"] = "prod"
    database_url: str | None = None
    data_dir: Path = Path("./var")

    wiro_base_url: str = "https://api.wiro.ai/v1"
    wiro_api_key: SecretStr | None = None
    wiro_api_secret: SecretStr | None = None
    wiro_connect_timeout_s: float = 5.0
    wiro_read_timeout_s: float = 30.0

    public_url: str = "http://127.0.0.1:8000"
    api_keys: SecretStr | None = None
    admin_clients: str = ""
    webhook_secret: SecretStr | None = None

    poll_initial_s: float = 10.0
    poll_max_s: float = 60.0
    # The adaptive poll schedule (app/pollplan.py).
    poll_adaptive: bool = Field(
        default=True,
        description="adapt the first poll to how healthy callbacks are; false: always "
        "POLL_INITIAL_S then doubling",
    )
    poll_safety_factor: float = Field(
        default=2.0,
        ge=1.0,
        description="while callbacks are healthy, the first poll comes this many times "
        "the recent p95 upstream duration after Run",
    )
    poll_safety_max_s: float | None = Field(
        default=None,
        gt=0,
        description="the latest that first poll comes (and the first poll of a gateway "
        "with no finished task yet); unset = POLL_MAX_S",
    )
    poll_health_window: int = Field(
        default=20, ge=1, description="callbacks are judged on this many newest finished tasks"
    )
    poll_health_max_missing: float = Field(
        default=0.25,
        ge=0.0,
        le=1.0,
        description="callbacks are unhealthy when more than this share of those tasks "
        "finished without one",
    )
    poll_plan_refresh_s: float = Field(
        default=10.0, gt=0, description="how often each process re-reads that history"
    )
    task_timeout_s: float = 3600.0
    notify_retry_s: str = "0,5,300,1800,7200,18000,36000,36000"
    output_hosts: str = WIRO_CDN_HOSTS
    allow_private_networks: bool = False

    # Beyond the contract's table: queueing, leases and grace periods.
    max_in_flight: int = Field(default=0, ge=0, description="0 = no local cap")
    dispatch_retry_initial_s: float = 1.0
    dispatch_retry_max_s: float = 60.0
    retry_after_cap_s: float = 60.0
    run_grace_s: float = Field(
        default=8.0,
        ge=0,
        description="once a Run is known unanswered (its request timed out, or the process "
        "that sent it died), how long Task/List is searched for its upstream "
        "task before a new attempt is sent",
    )
    run_grace_unlisted_s: float = Field(
        default=300.0,
        ge=0,
        description="the same wait when Task/List cannot tell (reconciliation off, "
        "failing, listing tasks without their callbackurl, or more newer tasks than a "
        "look pages through)",
    )
    submit_wait_s: float = Field(
        default=3.0,
        ge=0,
        description="how long POST /v1/tasks waits for Wiro's answer to Run; after it the "
        "task is answered as it stands (pending) while the Run goes on",
    )
    lost_grace_s: float = Field(
        default=120.0, description="how long 'There is no task yet.' is tolerated"
    )
    verdict_rereads: int = Field(
        default=3,
        ge=0,
        description="a task that finished upstream without pexit and without outputs is "
        "read again this many times before it is failed",
    )
    verdict_reread_s: float = Field(default=2.0, gt=0, description="seconds between those reads")
    reconcile_with_task_list: bool = Field(
        default=True,
        description="look for an unanswered Run's upstream task in Task/List (undocumented)",
    )
    # Renewed every third of itself while the work goes on (the heartbeat), so a check
    # waiting on a slow upstream call keeps its task, and a crashed process's tasks are
    # taken over within one lease.
    lease_s: float = Field(default=10.0, gt=0)
    reclaim_local_leases: bool = Field(
        default=True,
        description="as serve starts, take back the leases of processes that ended on "
        "this machine (same boot, pid namespace and user: app/owners.py) instead of "
        "waiting for them to run out; off where machines are cloned from a running "
        "snapshot, whose clones share a boot id",
    )
    worker_idle_s: float = 1.0
    worker_batch: int = 20
    worker_concurrency: int = 16
    submits_first_at: int = Field(
        default=8,
        ge=0,
        description="while a replica answers more submits than this at once and its event "
        "loop is busy, its background loops (task checks, output downloads, notifications, "
        "erasures) start new jobs on only a sixteenth of GATEWAY_WORKER_CONCURRENCY's slots "
        "each (at least one), so the submits get the event loop first (0: never)",
    )
    body_limit_bytes: int = 64 * 1024
    callback_body_limit_bytes: int = Field(
        default=1024 * 1024,
        gt=0,
        le=1024 * 1024,
        description="largest Wiro callback body: the contract's 1 MiB (the token is matched "
        "before any body is read, so only the holder of a task's secret URL "
        "can make the gateway read one); lower it if you like (docs/security.md)",
    )
    log_level: str = "INFO"
    shutdown_grace_s: float = Field(
        default=8.0,
        ge=0,
        description="on SIGTERM, how long in-flight requests and background jobs (checks "
        "with their upstream calls, output downloads, notifications) may run before they "
        "are cancelled and their leases released",
    )

    # Clients: keys, fair use, hostile input (docs/security.md).
    key_cache_ttl_s: float = Field(
        default=5.0,
        ge=0,
        description="how long a key lookup is cached per process: the delay before a "
        "revoked key stops working",
    )
    client_rate_per_s: float | None = Field(
        default=None,
        ge=0,
        description="default per-client request rate, per process (0 = no limit); unset: "
        f"{PROD_CLIENT_RATE_PER_S:g}/s when GATEWAY_ENV=prod, else none; "
        "`keys create --rate` overrides it per client",
    )
    client_rate_burst_s: float = Field(
        default=2.0, gt=0, description="the rate bucket holds this many seconds of requests"
    )
    client_max_in_flight: int = Field(
        default=0,
        ge=0,
        description="default per-client cap on tasks in flight (0 = none); "
        "`keys create --max-in-flight` overrides it per client",
    )
    auth_failure_burst: float = Field(
        default=50.0,
        ge=0,
        description="wrong keys one address may send before it is answered 429 without "
        "a key lookup (0 = no penalty box)",
    )
    auth_failure_rate_per_s: float = Field(
        default=1.0, gt=0, description="how fast an address earns back wrong-key attempts"
    )
    max_concurrent_uploads: int = Field(
        default=32,
        ge=0,
        description="authenticated POST /v1/uploads bodies streaming at once, per process; "
        "more are answered 503 with Retry-After (0 = no cap)",
    )
    stats_cache_s: float = Field(
        default=5.0,
        ge=0,
        description="how long a GET /v1/stats answer is reused for the same scope and "
        "window (0 = not cached)",
    )
    max_waiters_per_client: int = Field(
        default=100,
        ge=0,
        description="per process, how many `Prefer: wait` requests and event streams one "
        "client may hold open; over it a wait answers at once (without "
        "Preference-Applied) and a stream is refused with 429",
    )
    stream_heartbeat_s: float = Field(
        default=15.0,
        gt=0,
        description="an event stream sends a comment line after this "
        "much quiet, so proxies keep it open",
    )
    stream_reread_s: float = Field(
        default=30.0,
        gt=0,
        description="an event stream re-reads after this much quiet "
        "even unwoken (a safety net; commits wake it)",
    )
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    max_query_bytes: int = Field(default=8 * 1024, ge=256)

    # Results: notifications, stored outputs, uploads, erasure (README, docs/privacy.md).
    notify_timeout_s: float = Field(
        default=10.0, gt=0, description="one notification attempt, connect to last byte"
    )
    notify_connect_timeout_s: float = Field(
        default=3.0, gt=0, description="the TCP/TLS connect of a notification attempt"
    )
    notify_host_concurrency: int = Field(
        default=4,
        ge=1,
        description="notification attempts at once to one host, per process: a receiver "
        "that never answers holds at most this many of the notifier's slots",
    )
    notify_client_concurrency: int = Field(
        default=8,
        ge=1,
        description="notification attempts at once for one client's tasks, per process; "
        "free slots go to the client with the fewest running",
    )
    notify_retry_after_cap_s: float = Field(
        default=3600.0, ge=0, description="the longest Retry-After of a 429 that is honoured"
    )
    notify_wait_for_outputs_s: float = Field(
        default=30.0,
        ge=0,
        description="how long a task.succeeded notification waits for the outputs to be "
        "stored, so that it carries the gateway's durable URLs",
    )
    webhook_hosts: str = Field(
        default="",
        description="if set, the only hosts notifications may go to "
        "(comma-separated; `*.example.com` allowed)",
    )
    output_max_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    output_timeout_s: float = Field(default=60.0, gt=0)
    output_process: bool = Field(
        default=False,
        description="download, check and write outputs in a child process of each replica "
        "(nice +10), off the event loop's thread and its GIL (false: on the replica's "
        "worker threads)",
    )
    output_copy_first_s: float = Field(
        default=10.0,
        ge=0,
        description="how long a task that Wiro reports succeeded waits for its outputs to "
        "be downloaded and stored before it is recorded as succeeded, so that it succeeds "
        "with the gateway's URLs; outputs not stored by then are downloaded afterwards "
        "(0: always afterwards)",
    )
    output_retry_s: str = Field(
        default="1,5,30,120,600,1800,3600",
        description="seconds before each further output download attempt, comma-separated",
    )
    image_max_pixels: int = Field(
        default=40_000_000,
        gt=0,
        description="the largest width x height accepted, in uploads and outputs, checked "
        "from the header before decoding (a portrait needs far less)",
    )
    image_decode_concurrency: int = Field(
        default=2,
        ge=1,
        description="images decoded at once per process (uploads and outputs); the rest "
        "wait their turn",
    )
    upload_mode: Literal["local", "wiro"] = Field(
        default="local",
        description="local: the gateway serves uploads at an unguessable "
        "URL; wiro: they are forwarded to Wiro's File/Upload",
    )
    upload_max_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    retention_days: float = Field(
        default=0.0,
        ge=0,
        description="erase a task's images (here and at Wiro) and uploads this many days "
        "after completion / upload; 0 = keep until erased on request",
    )
    retention_sweep_s: float = Field(default=60.0, gt=0)
    erase_retry_s: str = Field(
        default="5,30,120,600,1800,3600,7200,21600",
        description="seconds before each further attempt to delete Wiro's copies",
    )

    @field_validator("public_url", "wiro_base_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        return v.rstrip("/")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.poll_initial_s <= 0 or self.poll_max_s < self.poll_initial_s:
            raise ValueError("need 0 < GATEWAY_POLL_INITIAL_S <= GATEWAY_POLL_MAX_S")
        if self.poll_safety_max_s is not None and self.poll_safety_max_s < self.poll_initial_s:
            raise ValueError("need GATEWAY_POLL_INITIAL_S <= GATEWAY_POLL_SAFETY_MAX_S")
        if self.wiro_api_secret is not None and self.wiro_api_key is None:
            raise ValueError("GATEWAY_WIRO_API_SECRET is set without GATEWAY_WIRO_API_KEY")
        self.client_keys  # noqa: B018 - parse early so a malformed value fails at start-up
        for name in ("notify_retry_s", "output_retry_s", "erase_retry_s"):
            _schedule(name, getattr(self, name))
        if self.webhook_secret is not None:
            _check_webhook_secret(self.webhook_secret.get_secret_value())
        return self

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'gateway.db').resolve()}"

    @property
    def default_client_rate_per_s(self) -> float:
        """``GATEWAY_CLIENT_RATE_PER_S``, or its default for ``env``."""
        if self.client_rate_per_s is not None:
            return self.client_rate_per_s
        return PROD_CLIENT_RATE_PER_S if self.env == "prod" else 0.0

    @property
    def poll_safety_cap_s(self) -> float:
        """The latest first poll of the adaptive schedule."""
        return self.poll_max_s if self.poll_safety_max_s is None else self.poll_safety_max_s

    @property
    def is_postgres(self) -> bool:
        return self.effective_database_url.startswith("postgresql")

    @cached_property
    def client_keys(self) -> dict[str, str]:
        """``GATEWAY_API_KEYS`` as ``{key: client_name}``."""
        out: dict[str, str] = {}
        if self.api_keys is None:
            return out
        for part in self.api_keys.get_secret_value().split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, key = part.partition("=")
            if not sep or not name.strip() or not key.strip():
                raise ValueError("GATEWAY_API_KEYS must look like name=key,name2=key2")
            out[key.strip()] = name.strip()
        return out

    @property
    def admin_client_names(self) -> frozenset[str]:
        return frozenset(n.strip() for n in self.admin_clients.split(",") if n.strip())

    @property
    def notify_schedule(self) -> list[float]:
        return _schedule("notify_retry_s", self.notify_retry_s)

    @property
    def output_retry_schedule(self) -> list[float]:
        return _schedule("output_retry_s", self.output_retry_s)

    @property
    def erase_retry_schedule(self) -> list[float]:
        return _schedule("erase_retry_s", self.erase_retry_s)

    @property
    def webhook_host_set(self) -> frozenset[str] | None:
        """None: any host."""
        hosts = frozenset(h.strip().lower() for h in self.webhook_hosts.split(",") if h.strip())
        return hosts or None

    @property
    def output_host_set(self) -> frozenset[str]:
        return frozenset(h.strip().lower() for h in self.output_hosts.split(",") if h.strip())


def _schedule(name: str, value: str) -> list[float]:
    """``"0,5,300"`` → ``[0.0, 5.0, 300.0]``; at least one entry, none negative."""
    try:
        out = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"GATEWAY_{name.upper()} must be comma-separated seconds") from None
    if not out or any(x < 0 or x != x for x in out):
        raise ValueError(f"GATEWAY_{name.upper()} needs at least one delay, none negative")
    return out


def _check_webhook_secret(secret: str) -> None:
    """A Standard Webhooks secret: ``whsec_`` + base64 of at least 24 random bytes."""
    import base64
    import binascii

    body = secret.removeprefix("whsec_")
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if not secret.startswith("whsec_") or len(raw) < 24:
        raise ValueError(
            "GATEWAY_WEBHOOK_SECRET must be 'whsec_' followed by the base64 of "
            "at least 24 random bytes"
        )

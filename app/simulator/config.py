"""Knobs of the local Wiro-compatible upstream.

Read from the environment (prefix ``SIM_``) at start-up and replaceable at runtime through
``PATCH /__sim/config``. Rates are probabilities drawn per request from one
``random.Random(seed)``, so a run with the same seed and the same request order misbehaves
the same way.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Rate = Annotated[float, Field(ge=0.0, le=1.0)]
Seconds = Annotated[float, Field(ge=0.0)]


class SimConfig(BaseSettings):
    """Everything the simulator can be told; see the field comments for the meaning."""

    # validate_assignment: callers may set ``config.api_secret = "..."`` (a str) directly.
    model_config = SettingsConfigDict(env_prefix="SIM_", extra="forbid", validate_assignment=True)

    # Auth: an empty secret is Wiro's key-only project mode (only x-api-key is checked).
    api_key: str = "sim-key"
    api_secret: SecretStr = SecretStr("sim-secret")
    sign_required: bool = True  # False: requests without x-nonce/x-signature pass on the key
    nonce_reuse_rejected: bool = True  # a nonce seen before is rejected like a bad signature
    public_url: str = "http://127.0.0.1:8100"  # base of the simulator's own URLs
    seed: int = 0

    # Timings of the status walk.
    queue_s: Seconds = 0.5  # task_queue/task_accept
    run_s: Seconds = 1.5  # task_assign .. task_postprocess_end
    output_ttl_s: Seconds = 3600.0  # output URLs answer 404 this long after completion

    # Account limits.
    max_concurrency: int = Field(default=0, ge=0)  # 0 = unlimited; over it Run answers 96
    balance_exhausted: bool = False  # Run answers 97

    # Callbacks.
    callback_drop: Rate = 0.0
    callback_duplicate: int = Field(default=0, ge=0, le=100)  # extra concurrent copies
    callback_delay_s: Seconds = 0.0
    callback_reorder: bool = False  # also send a stale intermediate stage after the final
    callback_early: bool = False  # a task_queue callback before Run answers
    callback_retries: int = Field(default=3, ge=0, le=20)  # 0.5 s, 1 s, 2 s, ... apart
    # The callback's body: the task as Detail shows it (JSON), its top-level fields
    # form-encoded (objects and lists as JSON text), or nothing at all.
    callback_body: Literal["detail", "form", "empty"] = "detail"

    # Shapes Wiro does not document: what the gateway must not depend on.
    omit_pexit: bool = False  # Detail has no "pexit" key (judge a finished task by outputs)
    task_list_enabled: bool = True  # False: Task/List answers 404 "Error parsing url."
    task_list_callbackurl: bool = True  # False: Task/List items have no "callbackurl"
    task_list_ignores_order: bool = False  # True: Task/List is oldest first, whatever is asked

    # Faults.
    run_5xx_rate: Rate = 0.0
    run_429_rate: Rate = 0.0
    detail_5xx_rate: Rate = 0.0
    fail_rate: Rate = 0.0  # task ends with pexit "1"
    lost_rate: Rate = 0.0  # accepted, then "There is no task yet." forever
    task_error_s: Seconds = 0.0  # task_error shown this long after task_start, then on
    # The task stays in task_error until killed (then task_cancel); it never ends by itself.
    # The two names are one knob (the larger applies); "stuck" is the clearer one.
    task_error_fatal_rate: Rate = 0.0
    task_error_stuck_rate: Rate = 0.0
    run_hang_s: Seconds = 0.0  # Run creates the task, then sleeps before answering
    # Run answers result:false, code 0 "Internal server error, please try again." (no task
    # made) with this HTTP status: drawn per Run, or for the next N Runs (counted down).
    run_server_error_rate: Rate = 0.0
    run_server_error_count: int = Field(default=0, ge=0)
    run_server_error_status: int = Field(default=200, ge=200, le=599)
    run_drop_connection: bool = False  # Run creates the task, then breaks the response

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @classmethod
    def from_env(cls) -> SimConfig:
        return cls()

    @property
    def secret(self) -> str:
        return self.api_secret.get_secret_value()

    @property
    def stuck_rate(self) -> float:
        return max(self.task_error_fatal_rate, self.task_error_stuck_rate)

    def updated(self, patch: dict[str, Any]) -> SimConfig:
        """A validated copy with ``patch`` applied (unknown keys raise ValidationError)."""
        return type(self).model_validate({**self.model_dump(), **patch})

    def public_view(self) -> dict[str, Any]:
        """The knobs as JSON; the secret is masked ("" still means key-only mode)."""
        return self.model_dump(mode="json")

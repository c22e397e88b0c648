"""Wiro's answers as its error reference writes them: error bodies, auth, Run validation.

Error bodies are ``{"result": false, "errors": [{"code", "message"}]}``. The messages and
HTTP statuses below are the documented ones (``../shared/docs/wiro-api.md``): auth
failures are code 0 with HTTP 401, an unknown route is code 0 "Error parsing url." with
HTTP 404, validation failures are code 0 with HTTP 200.
"""

from __future__ import annotations

import hmac
import json
import re
from collections import deque
from typing import Any
from urllib.parse import urlsplit

from app.simulator.config import SimConfig
from app.wiro.signing import verify

MAX_NONCES = 200_000

AUTH_NOT_FOUND = "Project authorization is not founded."
AUTH_NOT_VALID = "Project authorization is not valid."
AUTH_SIGNATURE_REQUIRED = (
    "Project requires signature authentication. Send x-nonce and x-signature headers."
)
PARSING_URL = "Error parsing url."
SERVER_ERROR = "Internal server error, please try again."
INVALID_PARAMETERS = "Request parameters are invalid."
NO_TASK = "There is no task yet."
TASK_NOT_EXIST = "task-not-exist"
NOT_DELETABLE = "Task must be completed or cancelled before deleting files"


class WiroFail(Exception):
    """A Wiro error answer: ``{"result": false, "errors": [{"code", "message"}]}``."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        http_status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"result": False, "errors": [{"code": self.code, "message": self.message}]}


def auth_failure(message: str = AUTH_NOT_VALID) -> WiroFail:
    return WiroFail(0, message, http_status=401)


def parsing_url() -> WiroFail:
    return WiroFail(0, PARSING_URL, http_status=404)


class NonceBook:
    """Nonces seen (the newest ``MAX_NONCES``), for the replay check."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._order: deque[str] = deque()

    def __contains__(self, nonce: object) -> bool:
        return nonce in self._seen

    def add(self, nonce: str) -> None:
        if nonce in self._seen:
            return
        self._seen.add(nonce)
        self._order.append(nonce)
        if len(self._order) > MAX_NONCES:
            self._seen.discard(self._order.popleft())


def check_auth(cfg: SimConfig, headers: Any, nonces: NonceBook) -> None:
    """Raise the documented 401 answer unless the headers authorize the project.

    An empty secret is Wiro's key-only project mode (only ``x-api-key`` is checked). In
    signature mode a bare key is refused unless ``sign_required`` is off; a signature that
    is sent is always checked.
    """
    key = headers.get("x-api-key") or ""
    if not key or not hmac.compare_digest(key.encode(), cfg.api_key.encode()):
        raise auth_failure(AUTH_NOT_FOUND)
    if not cfg.secret:
        return
    nonce = headers.get("x-nonce") or ""
    signature = headers.get("x-signature") or ""
    if not nonce and not signature:
        if cfg.sign_required:
            raise auth_failure(AUTH_SIGNATURE_REQUIRED)
        return
    if not nonce or not signature or not verify(key, cfg.secret, nonce, signature):
        raise auth_failure(AUTH_NOT_VALID)
    if cfg.nonce_reuse_rejected and nonce in nonces:
        raise auth_failure(AUTH_NOT_VALID)
    nonces.add(nonce)


# -- Run's fields ------------------------------------------------------------------------

# The model's select inputs (from the seed): name -> (default, allowed values).
SELECTS: dict[str, tuple[str, frozenset[str]]] = {
    "background": ("neutral", frozenset({"white", "black", "neutral", "gray", "office"})),
    "aspectRatio": (
        "",
        frozenset(
            {"", "1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "4:5", "5:4"}
            | {"21:9", "9:21", "2:1", "1:2"}
        ),
    ),
    "outputFormat": ("jpeg", frozenset({"jpeg", "png"})),
}
SAFETY_RANGE = (0, 6)  # the seed: "Between 0 and 6"; the select offers "2" only
_INTEGER = re.compile(r"-?\d{1,19}")
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def normalize_fields(raw: dict[str, Any]) -> dict[str, str]:
    """Wiro's values are strings: turn JSON numbers/booleans into their string form."""
    out: dict[str, str] = {}
    for key, value in raw.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, float) and value.is_integer():
            out[key] = str(int(value))
        elif isinstance(value, dict | list):
            out[key] = json.dumps(value)
        else:
            out[key] = str(value)
    return out


def _required(name: str) -> WiroFail:
    return WiroFail(0, f"Request parameter [{name}] required")


def validate_run(fields: dict[str, str]) -> tuple[dict[str, str], str]:
    """The model's parameters with defaults filled in, and the callback URL ("" if none).

    Messages as Wiro's error reference has them: "[name] required", "[name] must be
    integer or float", "[name] must be between {min} and {max}", and the generic
    "Request parameters are invalid." for a value outside a select's options.
    """
    url = fields.get("inputImageUrl", "").strip()
    if not url:
        raise _required("inputImageUrl")
    params = {"inputImageUrl": url}
    for name, (default, allowed) in SELECTS.items():
        value = fields.get(name, default)
        if value not in allowed:
            raise WiroFail(0, INVALID_PARAMETERS)
        params[name] = value
    safety = fields.get("safetyTolerance", "2").strip() or "2"
    if not _NUMBER.fullmatch(safety):
        raise WiroFail(0, "Request parameter [safetyTolerance] must be integer or float")
    low, high = SAFETY_RANGE
    if not low <= float(safety) <= high:
        raise WiroFail(0, f"Request parameter [safetyTolerance] must be between {low} and {high}")
    if safety != "2":
        raise WiroFail(0, INVALID_PARAMETERS)
    params["safetyTolerance"] = safety
    seed = fields.get("seed", "").strip() or "42"
    if not _INTEGER.fullmatch(seed):
        raise WiroFail(0, "Request parameter [seed] must be integer or float")
    params["seed"] = seed
    ordered = {k: params[k] for k in ("inputImageUrl", "background", "safetyTolerance")}
    ordered |= {k: params[k] for k in ("aspectRatio", "seed", "outputFormat")}
    callback = fields.get("callbackUrl", "").strip()
    if callback:
        parts = urlsplit(callback)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WiroFail(0, INVALID_PARAMETERS)
        if parts.username is not None or parts.password is not None or parts.fragment:
            raise WiroFail(0, INVALID_PARAMETERS)
    return ordered, callback

"""Everything that knows Wiro's wire format: signing, the client, its models and errors."""

from app.wiro.client import DEFAULT_TIMEOUT, WiroClient, error_for_code, parse_retry_after
from app.wiro.errors import (
    WiroAmbiguous,
    WiroAuthError,
    WiroConcurrencyLimit,
    WiroError,
    WiroInsufficientBalance,
    WiroRateLimited,
    WiroRejected,
    WiroStateError,
    WiroUnavailable,
)
from app.wiro.models import RunAccepted, UpstreamOutput, UpstreamTask
from app.wiro.signing import NonceSource, sign, verify

__all__ = [
    "DEFAULT_TIMEOUT",
    "NonceSource",
    "RunAccepted",
    "UpstreamOutput",
    "UpstreamTask",
    "WiroAmbiguous",
    "WiroAuthError",
    "WiroClient",
    "WiroConcurrencyLimit",
    "WiroError",
    "WiroInsufficientBalance",
    "WiroRateLimited",
    "WiroRejected",
    "WiroStateError",
    "WiroUnavailable",
    "error_for_code",
    "parse_retry_after",
    "sign",
    "verify",
]

"""Everything that knows Wiro's wire format: signing, the client, its models and errors."""

from app.wiro.client import (
    DEFAULT_TIMEOUT,
    WiroClient,
    WiroHTTP,
    error_for_code,
    parse_retry_after,
)
from app.wiro.errors import (
    WiroAccessDenied,
    WiroAmbiguous,
    WiroAuthError,
    WiroConcurrencyLimit,
    WiroConfigError,
    WiroError,
    WiroInsufficientBalance,
    WiroRateLimited,
    WiroRejected,
    WiroServerError,
    WiroStateError,
    WiroUnavailable,
    WiroValidationError,
)
from app.wiro.models import RunAccepted, UpstreamOutput, UpstreamTask, ids_descending
from app.wiro.signing import NonceSource, sign, verify

__all__ = [
    "DEFAULT_TIMEOUT",
    "NonceSource",
    "RunAccepted",
    "UpstreamOutput",
    "UpstreamTask",
    "WiroAccessDenied",
    "WiroAmbiguous",
    "WiroAuthError",
    "WiroClient",
    "WiroConcurrencyLimit",
    "WiroConfigError",
    "WiroError",
    "WiroHTTP",
    "WiroInsufficientBalance",
    "WiroRateLimited",
    "WiroRejected",
    "WiroServerError",
    "WiroStateError",
    "WiroUnavailable",
    "WiroValidationError",
    "error_for_code",
    "ids_descending",
    "parse_retry_after",
    "sign",
    "verify",
]

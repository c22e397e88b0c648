"""Python client for the headshot-gateway API.

```python
from headshot_client import Client

with Client(base_url="http://127.0.0.1:8000", api_key="...") as gw:
    task = gw.submit(input={"inputImageUrl": gw.upload("me.jpg"), "background": "office"})
    task = gw.wait(task.id, timeout=120)
    print(task.status, [o.url for o in task.outputs])
```
"""

from headshot_client._base import __version__
from headshot_client._client import AsyncClient, Client, verify_webhook
from headshot_client._errors import (
    ApiError,
    AuthError,
    BadRequest,
    Conflict,
    Gone,
    HeadshotError,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    StreamError,
    TransportError,
    UnsupportedMediaType,
    ValidationError,
    WebhookVerificationError,
)
from headshot_client._models import (
    TERMINAL,
    Delivery,
    DeliveryAttempt,
    Event,
    Output,
    Page,
    Status,
    Task,
    TaskError,
    Upstream,
    WebhookEvent,
)

__all__ = [
    "TERMINAL",
    "ApiError",
    "AsyncClient",
    "AuthError",
    "BadRequest",
    "Client",
    "Conflict",
    "Delivery",
    "DeliveryAttempt",
    "Event",
    "Gone",
    "HeadshotError",
    "NotFound",
    "Output",
    "Page",
    "PayloadTooLarge",
    "RateLimited",
    "ServerError",
    "ServiceUnavailable",
    "Status",
    "StreamError",
    "Task",
    "TaskError",
    "TransportError",
    "UnsupportedMediaType",
    "Upstream",
    "ValidationError",
    "WebhookEvent",
    "WebhookVerificationError",
    "__version__",
    "verify_webhook",
]

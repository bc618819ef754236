"""The errors the runtime raises, in one place; the API maps each kind to one status.

Nothing here knows HTTP: a kind has a stable `code` that clients can branch on.
"""

from __future__ import annotations

from service.errors import Conflict, NotFound, ServiceError, Unavailable
from service.runtime.batcher import BatcherClosed, BatchFailed, QueueFull, RequestTimeout
from service.runtime.images import BadImage

__all__ = [
    "BadImage",
    "BatchFailed",
    "BatcherClosed",
    "Conflict",
    "NotFound",
    "QueueFull",
    "RequestTimeout",
    "ServiceError",
    "Unavailable",
]

"""Error kinds shared by every layer. Nothing here knows HTTP: each has a stable `code`."""


class ServiceError(Exception):
    code = "error"


class NotFound(ServiceError):
    """An unknown model, gallery or image id."""

    code = "not_found"


class Conflict(ServiceError):
    """The thing to create exists already."""

    code = "conflict"


class Unavailable(ServiceError):
    """The service is starting or draining."""

    code = "unavailable"

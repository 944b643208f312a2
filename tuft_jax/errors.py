"""Engine errors the service maps to HTTP statuses."""


class InputError(ValueError):
    """The request is malformed or invalid for this model (HTTP 400)."""


class CapacityError(RuntimeError):
    """No free adapter slot or queue room right now (HTTP 429 / retryable)."""

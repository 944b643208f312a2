"""Engine errors the service maps to HTTP statuses."""


class InputError(ValueError):
    """The request is malformed or invalid for this model (HTTP 400)."""


class CapacityError(RuntimeError):
    """No free adapter slot or queue room right now (HTTP 429 / retryable)."""


class SlotsBusy(CapacityError):
    """Every adapter slot is read by running samples: the call can run once some finish. The
    worker retries it after the next decode chunk; nothing changed before it was raised."""

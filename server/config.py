"""Tunables of the HTTP service (timeouts, retention, batching, auth)."""

from __future__ import annotations

from dataclasses import dataclass

from server.api_keys import AuthMode


@dataclass(frozen=True)
class ServerOptions:
    future_hold_s: float = 25.0
    """How long retrieve_future waits for a result before answering try_again (client gives up at 45 s)."""
    future_ttl_s: float = 3600.0
    """How long finished results stay retrievable."""
    session_timeout_s: float = 300.0
    """A session without heartbeats (sent every 10 s) for this long ends and frees its adapters."""
    sweep_interval_s: float = 30.0
    """How often expired sessions, checkpoints and results are cleaned up."""
    max_batch_datums: int = 1024
    """Most datums merged into one forward_backward engine call across models."""
    max_remembered_samples: int = 10_000
    """Sample requests per sampler remembered for answering retries with the same seq_id."""
    max_queued_sample_rows: int = 4096
    """Samples (num_samples summed) per base model that may wait for a decode row; beyond it
    asample answers 429 and the SDK resubmits the same request a second later."""
    auth: AuthMode = "auto"
    """`auto`: registered API keys are enforced once any exists, else any `tml-` key works;
    `required`: only registered keys; `open`: any key (each key still its own tenant)."""
    auth_cache_s: float = 5.0
    """How long a key check is cached (a revocation takes effect within this time)."""

"""Tunables of the HTTP service (timeouts, retention, batching, auth, request sizes)."""

from __future__ import annotations

from dataclasses import dataclass

from server.api_keys import AuthMode

MAX_FORWARD_BACKWARD_BYTES = 32 << 20
"""Largest forward_backward protobuf, as sent and after zstd decompression. The SDK (0.38)
splits a call into chunks of at most `fwdbwd_max_chunk_bytes_count` = 5,000,000 estimated
payload bytes (or 1024 datums); framing adds ~100 bytes a datum, and one datum larger than
that travels alone. 32 MiB is 6.7x the chunk target: a single datum of ~1M tokens at 32
bytes a token (token + three loss inputs) still fits."""
MAX_SAMPLE_BODY_BYTES = 16 << 20
"""Largest asample (sample / compute_logprobs) JSON body. The SDK throttles sample dispatch
at `sample_dispatch_bytes_semaphore_size` = 10 MiB estimated at 10 bytes a prompt token,
i.e. prompts up to ~1M tokens; as JSON a token id takes at most 11 bytes."""
MAX_JSON_BODY_BYTES = 1 << 20
"""Largest body of every other route (sessions, heartbeats, model creation, optimizer steps,
saves, futures, REST): a few hundred bytes from the SDK, plus whatever `user_metadata` holds."""


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
    max_checkpoint_adapters: int = 8
    """Checkpoints named as `model` by the OpenAI- and Anthropic-compatible routes that stay
    loaded between requests (per server; the least recently used are released beyond it)."""
    auth: AuthMode = "auto"
    """`auto`: registered API keys are enforced once any exists, else any `tml-` key works;
    `required`: only registered keys; `open`: any key (each key still its own tenant)."""
    auth_cache_s: float = 5.0
    """How long a key check is cached (a revocation takes effect within this time)."""
    max_forward_backward_bytes: int = MAX_FORWARD_BACKWARD_BYTES
    """Body limit of forward_backward, compressed and decompressed (413 beyond it)."""
    max_sample_body_bytes: int = MAX_SAMPLE_BODY_BYTES
    """Body limit of asample (413 beyond it)."""
    max_json_body_bytes: int = MAX_JSON_BODY_BYTES
    """Body limit of every other route (413 beyond it)."""
    download_url_s: int = 900
    """How long a signed download URL stays valid. `tinker checkpoint download` asks for new
    ones when fewer than 5 minutes are left, and a download already running is not cut off."""
    public_url: str | None = None
    """`scheme://host[:port][/prefix]` that clients reach this server at, for the download URLs
    it hands out; None: the address the request came to (its Host header)."""
    seq_gap_timeout_s: float = 120.0
    """How long requests of a model wait for a missing lower seq_id (one whose body could not
    be read, so it was never accepted nor consumed) before it is skipped with a warning. Far
    above the seconds the SDK takes to send the chunks of one call, and above its 60 s
    per-attempt timeout plus backoff, so a chunk retried once still arrives in time."""

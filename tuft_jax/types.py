"""Plain data passed between the HTTP service and the engine (no JAX arrays cross this line)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class LoraConfig:
    """Geometry of one adapter; the flags choose which projections it trains."""

    rank: int
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True


@dataclass(frozen=True)
class AdamParams:
    """One AdamW step as Tinker defines it (torch AdamW, decoupled decay; clip 0 = off)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass
class Datum:
    """One training example: input tokens and the loss inputs aligned with them."""

    tokens: np.ndarray
    loss_inputs: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class ForwardResult:
    """Per-datum outputs (e.g. `logprobs`) and metrics named `name:reduction`."""

    outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float]


@dataclass(frozen=True)
class SamplingParams:
    """Decoding controls; `stop_token_ids` already includes EOS when the request implied it."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()


@dataclass
class SampledSequence:
    """`topk_logprobs` holds, when requested, the k most likely (token, logprob) at each token."""

    tokens: list[int]
    logprobs: list[float]
    stop_reason: Literal["stop", "length"]
    topk_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class SampleResult:
    """`prompt_logprobs` has one entry per prompt token, NaN at position 0, when requested."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass(frozen=True)
class KVCacheStats:
    """The sampler's paged KV cache, as `/metrics` shows it (blocks exclude the scratch block)."""

    total: int
    used: int
    """Held by at least one sequence or request."""
    cached_idle: int
    """In the prefix cache and held by nobody (evicted first when blocks run out)."""
    free: int
    bytes_per_block: int
    prefix_hits: int
    """Blocks a prompt found in the prefix cache instead of computing."""
    prefix_lookups: int
    """Full prompt blocks looked up."""
    preemptions: int = 0
    """Sequences preempted because blocks ran out."""

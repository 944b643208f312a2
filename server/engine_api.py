"""The engine contract the service programs against (implemented by `tuft_jax.engine.Engine`).

A Protocol rather than an import keeps the HTTP layer free of JAX, so it starts and is
tested without loading a model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from tuft_jax.types import AdamParams, Datum, ForwardResult, KVCacheStats, LoraConfig, SampleResult, SamplingParams


class EngineAPI(Protocol):
    name: str
    tokenizer_path: str
    max_context_length: int
    max_lora_rank: int
    eos_token_id: int

    def check_forward_backward(
        self, data: list[Datum], loss_fn: str, loss_config: dict[str, float | str]
    ) -> dict[str, float]: ...

    def create_adapter(self, lora: LoraConfig) -> int: ...

    def release_adapter(self, slot: int) -> None: ...

    def forward_backward(
        self,
        batch: list[tuple[int, list[Datum]]],
        loss_fn: str,
        loss_config: dict[str, float],
        forward_only: bool,
    ) -> list[ForwardResult]: ...

    def optim_step(self, slot: int, params: AdamParams) -> dict[str, float]: ...

    def snapshot_adapter(self, slot: int) -> int: ...

    def save_adapter(self, slot: int, directory: Path, *, with_optimizer: bool) -> int: ...

    def load_adapter(self, directory: Path, *, with_optimizer: bool) -> int: ...

    def export_peft(self, slot: int, directory: Path) -> int:
        """Write the slot as a standard PEFT adapter (adapter_config.json + adapter_model.safetensors)."""
        ...

    def adapter_config(self, slot: int) -> LoraConfig: ...

    def check_sample(
        self,
        prompt: np.ndarray,
        num_samples: int,
        params: SamplingParams,
        *,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
    ) -> None: ...

    # Sampling is continuous batching driven by the worker thread: requests are submitted, then
    # `step_sampling` (one decode chunk over every running sequence) is called while
    # `has_sampling_work`, interleaved with the other engine calls.

    def submit_sample(
        self,
        slot: int,
        prompt: np.ndarray,
        num_samples: int,
        params: SamplingParams,
        *,
        prompt_logprobs: bool,
        topk_prompt_logprobs: int,
        on_done: Callable[[SampleResult | None, BaseException | None], None],
        topk_sample_logprobs: int = 0,
    ) -> None:
        """Queue a request; `on_done(result, error)` is called from a later `step_sampling`."""
        ...

    def step_sampling(self) -> None: ...

    def has_sampling_work(self) -> bool: ...

    def kv_cache_stats(self) -> KVCacheStats:
        """The sampler's KV blocks; read from any thread (for `/metrics`)."""
        ...

    def queued_sample_rows(self) -> int:
        """Samples submitted but not yet decoding."""
        ...

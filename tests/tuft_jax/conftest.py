"""Engine fixtures: fresh engines over the session's tiny checkpoints.

Every engine test uses the same geometry (max rank 8, 4 adapter slots) on tiny models of the
same dimensions, so the jitted steps compile once per shape for the whole session: jit caches
key on the (equal) graph definitions, not on engine instances.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from engine_testing import CONTEXT, MAX_ADAPTERS, MAX_RANK

from tuft_jax.engine import Engine
from tuft_jax.model_registry import BaseModelSpec

MakeEngine = Callable[..., Engine]


@pytest.fixture(scope="session")
def make_engine(tiny_checkpoint) -> MakeEngine:
    """`make_engine(family="qwen3", tie=False, seed=0, name=None, max_lora_rank=MAX_RANK, **config_overrides)`
    -> a fresh Engine (config overrides change the model's dimensions, so they compile anew)."""

    def make(
        family: str = "qwen3",
        tie: bool = False,
        seed: int = 0,
        name: str | None = None,
        max_lora_rank: int = MAX_RANK,
        **overrides,
    ) -> Engine:
        path = tiny_checkpoint(family, tie, seed, **overrides)
        spec = BaseModelSpec(
            name or f"tiny-{family}-{'tied' if tie else 'untied'}",
            path,
            max_context_length=CONTEXT,
            max_lora_rank=max_lora_rank,
            max_adapters=MAX_ADAPTERS,
            family="llama" if family == "llama3" else family,
        )
        return Engine(spec)

    return make


@pytest.fixture
def engine(make_engine: MakeEngine) -> Engine:
    """A fresh engine on the default tiny Qwen3 (untied), no adapters yet."""
    return make_engine()

"""A request of the size a cookbook multi-turn recipe sends (guess_number: ~40 datums x ~1.9k
tokens) trains on the tiny model on a 24 GB machine (the CI machine): before blockwise attention
and chunked logits the step asked for 76 GB; `scripts/bench/memory.py --model tiny --batch 40
--seq 2048` now reports 1.2 GB."""

from __future__ import annotations

import numpy as np

from tuft_jax.engine import Engine
from tuft_jax.model_registry import BaseModelSpec
from tuft_jax.types import AdamParams, Datum, LoraConfig

DATUMS, TOKENS = 40, 1900


def test_a_forty_datum_two_thousand_token_request_fits_and_trains(tiny_checkpoint) -> None:
    spec = BaseModelSpec("tiny-long", tiny_checkpoint("qwen3", False, seed=0), 2048, 8, 2, family="qwen3")
    engine = Engine(spec)
    adapter = engine.create_adapter(LoraConfig(rank=8, seed=0))
    rng = np.random.default_rng(0)
    data = []
    for _ in range(DATUMS):
        seq = rng.integers(0, 400, size=TOKENS + 1)
        data.append(Datum(seq[:-1].astype(np.int32), {"target_tokens": seq[1:], "weights": np.ones(TOKENS, np.float32)}))

    (result,) = engine.forward_backward([(adapter, data)], "cross_entropy", {}, False)
    assert np.isfinite(result.metrics["loss:sum"]) and len(result.outputs) == DATUMS
    assert result.outputs[0]["logprobs"].shape == (TOKENS,)
    engine.optim_step(adapter, AdamParams(learning_rate=1e-3))

"""bf16 arrays held as their uint16 bits, end to end: what the engine holds and what it computes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from engine_testing import next_token_datum, random_sequences
from flax import nnx
from safetensors import safe_open

from tuft_jax.engine import Engine
from tuft_jax.model_registry import BaseModelSpec
from tuft_jax.stored_dtype import compute_dtype, from_stored, stored_dtype, to_stored
from tuft_jax.types import LoraConfig, SamplingParams


def test_bits_round_trip() -> None:
    x = jnp.asarray([1.5, -2.25, 3e-3], jnp.bfloat16)
    held = to_stored(x, stored_dtype(x.dtype))
    assert held.dtype == jnp.uint16 and compute_dtype(held.dtype) == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(from_stored(held), np.float32), np.asarray(x, np.float32))
    assert stored_dtype(jnp.float32) == jnp.float32 and from_stored(x) is x


def test_bf16_weights_and_kv_pool_are_held_as_bits_and_compute_as_bf16(tiny_checkpoint) -> None:
    """A bf16 engine holds its base weights and its KV pool as uint16 bits: the weights are the
    checkpoint's rounded to bf16, and training and sampling read them as bf16."""
    path = tiny_checkpoint("qwen3", False, seed=0)
    engines = {
        dtype: Engine(BaseModelSpec(f"tiny-{dtype}", path, 256, 8, 2, dtype=dtype, family="qwen3"))
        for dtype in ("bfloat16", "float32")
    }
    held = {key: var[...] for key, var in nnx.to_flat_state(engines["bfloat16"].base)}
    q_proj = held[("model", "layers", "self_attn", "q_proj", "weight")]
    assert all(x.dtype == jnp.uint16 for x in held.values())
    with safe_open(path / "model.safetensors", framework="numpy") as f:
        reference = f.get_tensor("model.layers.1.self_attn.q_proj.weight").T
    np.testing.assert_array_equal(np.asarray(q_proj[1]).view(jnp.bfloat16), reference.astype(jnp.bfloat16))

    datum = next_token_datum(random_sequences([24], seed=2)[0])
    logprobs = {}
    for dtype, engine in engines.items():
        adapter = engine.create_adapter(LoraConfig(rank=4, seed=3))
        (result,) = engine.forward_backward([(adapter, [datum])], "cross_entropy", {}, False)
        logprobs[dtype] = result.outputs[0]["logprobs"]
        sample = engine.sample(adapter, datum.tokens[:5], 1, SamplingParams(max_tokens=3), prompt_logprobs=False, topk_prompt_logprobs=0)
        assert len(sample.sequences[0].tokens) == 3
        assert engine.decoder._require_pool().k.dtype == stored_dtype(jnp.dtype(dtype))
    np.testing.assert_allclose(logprobs["bfloat16"], logprobs["float32"], atol=0.1)
    assert not np.array_equal(logprobs["bfloat16"], logprobs["float32"])

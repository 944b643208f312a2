"""Jitted prefill + decode loop with a per-layer KV cache, over the same parameter pytree as training.

One call decodes a whole batch of rows (each with its own adapter slot, temperature, top-k,
top-p, PRNG key and token budget) inside a `while_loop` that ends once every row has stopped,
so the host sees the device once per request rather than once per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from tuft_jax.layers import AdapterBatch


@dataclass(frozen=True)
class DecodeRequest:
    """Per-row decoding inputs; `prompt` is right-padded, `stop_ids` is padded with -1."""

    prompt: jax.Array
    prompt_len: jax.Array
    slots: jax.Array
    scales: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    keys: jax.Array
    max_tokens: jax.Array
    stop_ids: jax.Array


jax.tree_util.register_dataclass(
    DecodeRequest,
    data_fields=["prompt", "prompt_len", "slots", "scales", "temperature", "top_k", "top_p", "keys", "max_tokens", "stop_ids"],
    meta_fields=[],
)


@dataclass(frozen=True)
class DecodeOutput:
    tokens: jax.Array
    logprobs: jax.Array
    num_tokens: jax.Array
    stopped: jax.Array
    prompt_logprobs: jax.Array | None
    topk_prompt_ids: jax.Array | None
    topk_prompt_logprobs: jax.Array | None


jax.tree_util.register_dataclass(
    DecodeOutput,
    data_fields=["tokens", "logprobs", "num_tokens", "stopped", "prompt_logprobs", "topk_prompt_ids", "topk_prompt_logprobs"],
    meta_fields=[],
)


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Temperature, then top-k (k <= 0: off), then nucleus top-p over each row of [B, V] logits."""
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    vocab = logits.shape[-1]
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    kept_in_nucleus = jnp.sum(before < top_p[:, None], axis=-1)
    pth = jnp.take_along_axis(ordered, (jnp.maximum(kept_in_nucleus, 1) - 1)[:, None], axis=-1)
    threshold = jnp.maximum(kth, pth)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def choose_tokens(logits: jax.Array, req: DecodeRequest, step: jax.Array) -> jax.Array:
    """Samples one token per row; temperature 0 is greedy."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(req.keys, step)
    filtered = filter_logits(logits, req.temperature, req.top_k, req.top_p)
    sampled = jax.vmap(jax.random.categorical)(keys, filtered)
    return jnp.where(req.temperature <= 0, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)


def _prompt_scores(logits: jax.Array, prompt: jax.Array, topk: int) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Logprob of each prompt token given its prefix (NaN at position 0) and the top-k alternatives."""
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    chosen = jnp.take_along_axis(log_probs, prompt[:, 1:, None], axis=-1)[..., 0]
    nan = jnp.full((prompt.shape[0], 1), jnp.nan, jnp.float32)
    scores = jnp.concatenate([nan, chosen], axis=1)
    if topk == 0:
        return scores, None, None
    top_lp, top_ids = jax.lax.top_k(log_probs, topk)
    return scores, top_ids, top_lp


@partial(jax.jit, static_argnames=("graphdef", "max_new", "cache_len", "score_prompt", "topk_prompt"))
def generate(
    graphdef: nnx.GraphDef,
    base: nnx.State,
    lora: nnx.State,
    req: DecodeRequest,
    max_new: int,
    cache_len: int,
    score_prompt: bool,
    topk_prompt: int,
) -> DecodeOutput:
    model = nnx.merge(graphdef, base, lora)
    adapters = AdapterBatch(req.slots, req.scales)
    batch, prompt_width = req.prompt.shape
    caches = model.init_caches(batch, cache_len, base["model"]["embed_tokens"]["weight"].dtype)
    positions = jnp.broadcast_to(jnp.arange(prompt_width, dtype=jnp.int32), (batch, prompt_width))
    hidden, caches = model(req.prompt, positions, adapters, caches)
    last_hidden = jnp.take_along_axis(hidden, (req.prompt_len - 1)[:, None, None], axis=1)
    logits = model.logits(last_hidden, adapters)[:, 0]
    prompt_scores = (None, None, None)
    if score_prompt:
        prompt_scores = _prompt_scores(model.logits(hidden, adapters), req.prompt, topk_prompt)

    def cond(state):
        step, _, _, _, _, done, _ = state
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        step, caches, logits, tokens, logprobs, done, length = state
        token = choose_tokens(logits, req, step)
        token_lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
        tokens = tokens.at[:, step].set(jnp.where(done, 0, token))
        logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, token_lp))
        length = length + (~done).astype(jnp.int32)
        is_stop = jnp.any(token[:, None] == req.stop_ids[None, :], axis=-1)
        done = done | is_stop | (length >= req.max_tokens)
        position = (req.prompt_len + step)[:, None]
        hidden, caches = model(token[:, None], position, adapters, caches)
        return step + 1, caches, model.logits(hidden, adapters)[:, 0], tokens, logprobs, done, length

    init = (
        jnp.int32(0),
        caches,
        logits,
        jnp.zeros((batch, max_new), jnp.int32),
        jnp.zeros((batch, max_new), jnp.float32),
        req.max_tokens <= 0,
        jnp.zeros((batch,), jnp.int32),
    )
    _, _, _, tokens, logprobs, _, length = jax.lax.while_loop(cond, body, init)
    last = jnp.take_along_axis(tokens, jnp.maximum(length - 1, 0)[:, None], axis=1)[:, 0]
    stopped = (length > 0) & jnp.any(last[:, None] == req.stop_ids[None, :], axis=-1)
    return DecodeOutput(tokens, logprobs, length, stopped, *prompt_scores)

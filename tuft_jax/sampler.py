"""Device side of sampling: prefill of newly admitted requests and a chunked decode loop over a
fixed set of decode rows, reading the same parameter pytree as training.

`DecodeState` holds R rows. Each row has its own slice of the per-layer KV cache, adapter slot,
sampling controls, PRNG key, token budget and stop ids, so rows of many requests and adapters
decode together and a row can be refilled as soon as its sequence ends (see
`tuft_jax.decode_scheduler`). Rows never interact: a row attends only to its own cache and draws
token g from `fold_in(row_key, g)`, so what it produces does not depend on its neighbours.

The cache length is the third axis of the [rows, layers, length, ...] cache; the scheduler resizes it in length buckets to what
the live rows need, so a step attends over roughly the longest live sequence rather than the
model's whole context. Every call donates the state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from tuft_jax.chunking import CHUNK_TOKENS, map_chunks
from tuft_jax.layers import AdapterBatch, KVCache

MAX_STOP_IDS = 32
"""Stop token ids a request may give (EOS included)."""


@dataclass(frozen=True)
class DecodeState:
    """Per-row decoding state ([R] unless noted); `token` is the last sampled token, which the
    next step feeds at `position`; `done` rows (finished or free) are carried but not advanced."""

    caches: KVCache
    """[R, L, S, kv_heads, head_dim]."""
    token: jax.Array
    position: jax.Array
    generated: jax.Array
    max_tokens: jax.Array
    slots: jax.Array
    scales: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    keys: jax.Array
    stop_ids: jax.Array
    """[R, MAX_STOP_IDS], padded with -1."""
    done: jax.Array


jax.tree_util.register_dataclass(DecodeState)


@dataclass(frozen=True)
class Admission:
    """Requests entering the decode rows: U distinct prompts ([U, W], right-padded), each with
    its adapter, and R entries (one per sample) saying which prompt they continue and which
    decode row they take; entries with row == R are padding and change nothing."""

    prompts: jax.Array
    prompt_len: jax.Array
    prompt_slots: jax.Array
    prompt_scales: jax.Array
    source: jax.Array
    rows: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seeds: jax.Array
    """[R, 2] uint32: the low and high halves of each entry's 64-bit seed."""
    sample_index: jax.Array
    max_tokens: jax.Array
    stop_ids: jax.Array


jax.tree_util.register_dataclass(Admission)


@dataclass(frozen=True)
class Prefilled:
    """What prefill computed: the prompts' caches, each entry's first token, and prompt scores."""

    caches: KVCache
    keys: jax.Array
    token: jax.Array
    logprob: jax.Array
    done: jax.Array
    prompt_logprobs: jax.Array | None
    topk_ids: jax.Array | None
    topk_logprobs: jax.Array | None


jax.tree_util.register_dataclass(Prefilled)


def init_state(num_layers: int, rows: int, length: int, kv_heads: int, head_dim: int, dtype: jnp.dtype) -> DecodeState:
    """R free rows (all done) with a zero cache of `length` positions."""
    shape = (rows, num_layers, length, kv_heads, head_dim)

    def zeros_i() -> jax.Array:  # a distinct buffer per field, as every field is donated
        return jnp.zeros((rows,), jnp.int32)

    return DecodeState(
        caches=KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)),
        token=zeros_i(),
        position=zeros_i(),
        generated=zeros_i(),
        max_tokens=zeros_i(),
        slots=zeros_i(),
        scales=jnp.zeros((rows, 3), jnp.float32),
        temperature=jnp.zeros((rows,), jnp.float32),
        top_k=zeros_i(),
        top_p=jnp.ones((rows,), jnp.float32),
        keys=jax.random.split(jax.random.key(0), rows),
        stop_ids=jnp.full((rows, MAX_STOP_IDS), -1, jnp.int32),
        done=jnp.ones((rows,), bool),
    )


def filter_logits(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-k (k <= 0: off), then nucleus top-p, over each row of temperature-scaled [B, V] logits;
    tokens tied with the last kept one are kept too."""
    vocab = scaled.shape[-1]
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    kept_in_nucleus = jnp.sum(before < top_p[:, None], axis=-1)
    pth = jnp.take_along_axis(ordered, (jnp.maximum(kept_in_nucleus, 1) - 1)[:, None], axis=-1)
    return jnp.where(scaled >= jnp.maximum(kth, pth), scaled, -jnp.inf)


def draw(
    logits: jax.Array, keys: jax.Array, index: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One token per row of [B, V] fp32 logits, drawn with `fold_in(key, index)`; temperature 0 is
    greedy. Returns the tokens and their logprobs under the unscaled distribution.

    Random draws run only when some row samples, and the sort behind top-k / top-p only when
    some row asks for it (`lax.cond`); only those rows take their result, so a row's draw never
    depends on the other rows.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(logits: jax.Array) -> jax.Array:
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        wants_filter = (temperature > 0) & ((top_k > 0) | (top_p < 1))
        filtered = jax.lax.cond(
            jnp.any(wants_filter),
            lambda x: jnp.where(wants_filter[:, None], filter_logits(x, top_k, top_p), x),
            lambda x: x,
            scaled,
        )
        step_keys = jax.vmap(jax.random.fold_in)(keys, index)
        sampled = jax.vmap(jax.random.categorical)(step_keys, filtered).astype(jnp.int32)
        return jnp.where(temperature <= 0, greedy, sampled)

    token = jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, logits)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
    return token, logprob


def _hits_stop(token: jax.Array, stop_ids: jax.Array) -> jax.Array:
    return jnp.any(token[:, None] == stop_ids, axis=-1)


def _row_keys(seeds: jax.Array, sample_index: jax.Array) -> jax.Array:
    """key(seed) for a 64-bit seed (jax.random.key takes 32 bits here), then one stream per sample."""

    def one(seed: jax.Array, index: jax.Array) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed[0]), seed[1]), index)

    return jax.vmap(one)(seeds, sample_index)


def _prompt_scores(
    model: nnx.Module,
    hidden: jax.Array,
    adapters: AdapterBatch,
    prompts: jax.Array,
    topk: int,
    chunk_tokens: int = CHUNK_TOKENS,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Logprob of each prompt token given its prefix (NaN at position 0) and the top-k
    alternatives at each position (row p - 1 scores position p), from logits computed chunk by
    chunk over the prompt (`map_chunks`) rather than [U, W, V] at once."""

    def chunk_scores(h: jax.Array, next_tokens: jax.Array) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        log_probs = jax.nn.log_softmax(model.logits(h, adapters), axis=-1)
        chosen = jnp.take_along_axis(log_probs, next_tokens[..., None], axis=-1)[..., 0]
        if topk == 0:
            return chosen, None, None
        top_lp, top_ids = jax.lax.top_k(log_probs, topk)
        return chosen, top_ids, top_lp

    chosen, top_ids, top_lp = map_chunks(chunk_scores, (hidden[:, :-1], prompts[:, 1:]), chunk_tokens)
    scores = jnp.concatenate([jnp.full((prompts.shape[0], 1), jnp.nan, jnp.float32), chosen], axis=1)
    return scores, top_ids, top_lp


PREFILL_CHUNK_TOKENS = 2048
"""Prompt tokens (over all prompts of an admission) run through the layers at once: a longer
prefill goes chunk by chunk, each chunk attending to the cache the earlier ones wrote, so one
layer's activations are those of a chunk, not of the whole prompt."""


def prefill_chunks(width: int, prompts: int, chunk_tokens: int) -> int:
    """How many equal chunks a prefill of `prompts` x `width` tokens runs in: the fewest whose
    chunks hold at most max(1, chunk_tokens // prompts) positions and divide `width` evenly
    (widths are length buckets, so a near divisor exists)."""
    most = max(1, chunk_tokens // prompts)
    n = -(-width // most)
    while width % n:
        n += 1
    return n


def _run_prompts(
    model: nnx.Module, prompts: jax.Array, adapters: AdapterBatch, caches: KVCache, chunk_tokens: int
) -> tuple[jax.Array, KVCache]:
    """Hidden states [U, W, D] of the prompts and their filled caches, in `prefill_chunks` chunks."""
    u, width = prompts.shape
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (u, width))
    n = prefill_chunks(width, u, chunk_tokens)
    if n == 1:
        return model(prompts, positions, adapters, caches)

    def chunk(caches: KVCache, xs: tuple[jax.Array, jax.Array]) -> tuple[KVCache, jax.Array]:
        hidden, caches = model(*xs, adapters, caches)
        return caches, hidden

    def split(x: jax.Array) -> jax.Array:
        return jnp.moveaxis(x.reshape(u, n, width // n), 1, 0)

    caches, hidden = jax.lax.scan(chunk, caches, (split(prompts), split(positions)))
    return jnp.moveaxis(hidden, 0, 1).reshape(u, width, -1), caches


@partial(jax.jit, static_argnames=("graphdef", "score_prompt", "topk_prompt", "chunk_tokens"))
def prefill(
    graphdef: nnx.GraphDef,
    base: nnx.State,
    lora: nnx.State,
    adm: Admission,
    score_prompt: bool,
    topk_prompt: int,
    chunk_tokens: int = PREFILL_CHUNK_TOKENS,
) -> Prefilled:
    """Runs the U prompts (in chunks of about `chunk_tokens` tokens), and draws each entry's
    first token from its prompt's last position."""
    model = nnx.merge(graphdef, base, lora)
    adapters = AdapterBatch(adm.prompt_slots, adm.prompt_scales, form="per_row")  # at most R prompts
    u, width = adm.prompts.shape
    caches = model.init_caches(u, width, base["model"]["embed_tokens"]["weight"].dtype)
    hidden, caches = _run_prompts(model, adm.prompts, adapters, caches, chunk_tokens)
    last = jnp.take_along_axis(hidden, (adm.prompt_len - 1)[:, None, None], axis=1)
    logits = model.logits(last, adapters)[:, 0][adm.source]
    keys = _row_keys(adm.seeds, adm.sample_index)
    token, logprob = draw(logits, keys, jnp.zeros_like(adm.sample_index), adm.temperature, adm.top_k, adm.top_p)
    done = _hits_stop(token, adm.stop_ids) | (adm.max_tokens <= 1)
    scores = (None, None, None)
    if score_prompt:
        scores = _prompt_scores(model, hidden, adapters, adm.prompts, topk_prompt)
    return Prefilled(caches, keys, token, logprob, done, *scores)


@partial(jax.jit, donate_argnames=("state",))
def insert(state: DecodeState, adm: Admission, pre: Prefilled) -> DecodeState:
    """Moves admitted entries into their decode rows: cache prefix, first token and controls."""
    rows, src = adm.rows, adm.source
    width = pre.caches.k.shape[2]

    def put(x: jax.Array, value: jax.Array) -> jax.Array:
        return x.at[rows].set(value, mode="drop")

    caches = KVCache(
        *(c.at[rows, :, :width].set(p[src], mode="drop") for c, p in zip(state.caches, pre.caches, strict=True))
    )
    return DecodeState(
        caches=caches,
        token=put(state.token, pre.token),
        position=put(state.position, adm.prompt_len[src]),
        generated=put(state.generated, jnp.ones_like(pre.token)),
        max_tokens=put(state.max_tokens, adm.max_tokens),
        slots=put(state.slots, adm.prompt_slots[src]),
        scales=put(state.scales, adm.prompt_scales[src]),
        temperature=put(state.temperature, adm.temperature),
        top_k=put(state.top_k, adm.top_k),
        top_p=put(state.top_p, adm.top_p),
        keys=put(state.keys, pre.keys),
        stop_ids=put(state.stop_ids, adm.stop_ids),
        done=put(state.done, pre.done),
    )


def _decode_rows(model: nnx.Module, state: DecodeState, steps: int) -> tuple[DecodeState, jax.Array, jax.Array]:
    adapters = AdapterBatch(state.slots, state.scales, form="per_row")  # one token per row: gather each row's LoRA
    rows = state.token.shape[0]

    def cond(carry):
        i, *_, done, _, _ = carry
        return (i < steps) & ~jnp.all(done)

    def body(carry):
        i, caches, token, position, generated, done, out_tokens, out_logprobs = carry
        hidden, caches = model(token[:, None], position[:, None], adapters, caches)
        logits = model.logits(hidden, adapters)[:, 0]
        new, logprob = draw(logits, state.keys, generated, state.temperature, state.top_k, state.top_p)
        live = ~done
        out_tokens = out_tokens.at[:, i].set(jnp.where(live, new, -1))
        out_logprobs = out_logprobs.at[:, i].set(jnp.where(live, logprob, 0.0))
        generated = generated + live
        done = done | (live & (_hits_stop(new, state.stop_ids) | (generated >= state.max_tokens)))
        return i + 1, caches, jnp.where(live, new, token), position + live, generated, done, out_tokens, out_logprobs

    init = (
        jnp.int32(0),
        state.caches,
        state.token,
        state.position,
        state.generated,
        state.done,
        jnp.full((rows, steps), -1, jnp.int32),
        jnp.zeros((rows, steps), jnp.float32),
    )
    _, caches, token, position, generated, done, out_tokens, out_logprobs = jax.lax.while_loop(cond, body, init)
    new_state = replace(state, caches=caches, token=token, position=position, generated=generated, done=done)
    return new_state, out_tokens, out_logprobs


@partial(jax.jit, static_argnames=("graphdef", "steps", "live_rows"), donate_argnames=("state",))
def decode(
    graphdef: nnx.GraphDef,
    base: nnx.State,
    lora: nnx.State,
    state: DecodeState,
    finish: jax.Array,
    steps: int,
    live_rows: int,
) -> tuple[DecodeState, jax.Array, jax.Array]:
    """Up to `steps` tokens for every live row (fewer once all are done), after ending the rows
    in `finish`. Only the first `live_rows` rows are computed (every later row must be done), so
    a lightly used batch costs what its live rows cost. Returns the new state and
    [live_rows, steps] tokens and logprobs, -1 / 0 where a row was done."""
    model = nnx.merge(graphdef, base, lora)
    state = replace(state, done=state.done | finish)
    if live_rows == state.token.shape[0]:
        return _decode_rows(model, state, steps)
    head = jax.tree.map(lambda x: x[:live_rows], state)
    head, out_tokens, out_logprobs = _decode_rows(model, head, steps)
    return jax.tree.map(lambda x, h: x.at[:live_rows].set(h), state, head), out_tokens, out_logprobs


@partial(jax.jit, static_argnames=("length",))
def resize(state: DecodeState, length: int) -> DecodeState:
    """The same rows with a cache of `length` positions (cut or zero-extended at the end)."""

    def fit(x: jax.Array) -> jax.Array:
        current = x.shape[2]
        if length <= current:
            return x[:, :, :length]
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - current), (0, 0), (0, 0)))

    return replace(state, caches=KVCache(fit(state.caches.k), fit(state.caches.v)))

"""Device side of sampling over the paged KV cache: prompt chunks written into the pool, rows
started from them, and a chunked decode loop over a fixed set of decode rows, reading the same
parameter pytree as training.

`DecodeState` holds R rows. Each row has its own adapter slot, sampling controls, PRNG key,
token budget and stop ids; its keys and values live in the shared block pool
(`tuft_jax.paged_attention`) under the block table the host passes with every call, so rows of
many requests and adapters decode together and a row can be refilled as soon as its sequence
ends (see `tuft_jax.decode_scheduler`). Rows never interact: a row attends only to its own
blocks (blocks it shares hold the same prompt for every sharer and are never written again),
and draws token g from `fold_in(row_key, g)`, so what it produces does not depend on its
neighbours. Every call that changes the pool or the rows donates them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from tuft_jax.chunking import CHUNK_TOKENS, map_chunks
from tuft_jax.layers import AdapterBatch, LoraForm
from tuft_jax.paged_attention import KVPool, PagedView, copy_blocks

MAX_STOP_IDS = 32
"""Stop token ids a request may give (EOS included)."""

PREFILL_CHUNK_TOKENS = 2048
"""Prompt tokens (over all prompts of a chunk) run through the layers in one call: a longer
prompt is prefilled over several scheduler steps, each attending to the blocks the earlier
ones wrote, so one layer's activations are those of a chunk and running rows decode between
chunks."""


@dataclass(frozen=True)
class DecodeState:
    """Per-row decoding state [R]; `token` is the last sampled token, which the next step feeds at
    `position`; `done` rows (finished or free) are carried but not advanced."""

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
class PromptChunk:
    """The next tokens of U prompts ([U, C], right-padded): `length` of them are real and the
    first is at position `start`; each prompt's block table [U, M], adapter slot and scales, and
    the token that follows each position (for prompt scores; anything past the prompt)."""

    tokens: jax.Array
    start: jax.Array
    length: jax.Array
    tables: jax.Array
    slots: jax.Array
    scales: jax.Array
    next_tokens: jax.Array


jax.tree_util.register_dataclass(PromptChunk)


@dataclass(frozen=True)
class ChunkScores:
    """What a prompt chunk computed: fp32 logits [U, V] after each prompt's last real token of
    the chunk, and (when asked) the logprob of each next token [U, C] and the top-k alternatives."""

    last_logits: jax.Array
    prompt_logprobs: jax.Array | None
    topk_ids: jax.Array | None
    topk_logprobs: jax.Array | None


jax.tree_util.register_dataclass(ChunkScores)


@dataclass(frozen=True)
class RowStart:
    """R entries (one per sample; `rows` == R marks padding) entering decode rows after their
    prompt was prefilled: which prompt's logits they draw from (`source`), their controls, the
    position their first token is fed at, and a block copy each (`copy_src` -> `copy_dst`, the
    copy on write of a shared partial prompt block; 0 -> 0 copies scratch). A resumed sequence
    (`resume_token` >= 0) takes that token and its `generated` count instead of drawing."""

    rows: jax.Array
    source: jax.Array
    slots: jax.Array
    scales: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seeds: jax.Array
    """[R, 2] uint32: the low and high halves of each entry's 64-bit seed."""
    sample_index: jax.Array
    max_tokens: jax.Array
    stop_ids: jax.Array
    position: jax.Array
    resume_token: jax.Array
    generated: jax.Array
    copy_src: jax.Array
    copy_dst: jax.Array


jax.tree_util.register_dataclass(RowStart)


@dataclass(frozen=True)
class TopLogprobs:
    """The k most likely tokens at each sampled position ([..., k]) and their logprobs."""

    ids: jax.Array
    logprobs: jax.Array


jax.tree_util.register_dataclass(TopLogprobs)


def init_state(rows: int) -> DecodeState:
    """R free rows (all done)."""

    def zeros_i() -> jax.Array:  # a distinct buffer per field, as every field is donated
        return jnp.zeros((rows,), jnp.int32)

    return DecodeState(
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


def top_logprobs(logits: jax.Array, k: int) -> TopLogprobs:
    """The k most likely tokens of each row of [B, V] fp32 logits, under the unscaled
    distribution `draw` reports the sampled token's logprob in."""
    values, ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), k)
    return TopLogprobs(ids, values)


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
    next_tokens: jax.Array,
    topk: int,
    chunk_tokens: int = CHUNK_TOKENS,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Logprob of the token after each position (`next_tokens` [U, C]) and the top-k
    alternatives there, from logits computed chunk by chunk (`map_chunks`) rather than
    [U, C, V] at once."""

    def chunk_scores(h: jax.Array, following: jax.Array) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        log_probs = jax.nn.log_softmax(model.logits(h, adapters), axis=-1)
        chosen = jnp.take_along_axis(log_probs, jnp.maximum(following, 0)[..., None], axis=-1)[..., 0]
        if topk == 0:
            return chosen, None, None
        top_lp, top_ids = jax.lax.top_k(log_probs, topk)
        return chosen, top_ids, top_lp

    return map_chunks(chunk_scores, (hidden, next_tokens), chunk_tokens)


def prefill_width(remaining: int, prompts: int, chunk_tokens: int = PREFILL_CHUNK_TOKENS) -> int:
    """Tokens per prompt in the next chunk: all that remain, up to chunk_tokens // prompts."""
    return max(1, min(remaining, chunk_tokens // prompts))


@partial(jax.jit, static_argnames=("graphdef", "score_prompt", "topk_prompt", "tile_blocks", "mesh"), donate_argnames=("pool",))
def prefill(
    graphdef: nnx.GraphDef,
    base: nnx.State,
    lora: nnx.State,
    pool: KVPool,
    chunk: PromptChunk,
    score_prompt: bool,
    topk_prompt: int,
    tile_blocks: int,
    mesh: Mesh | None = None,
) -> tuple[KVPool, ChunkScores]:
    """Runs a chunk of U prompts through the layers, writing their keys and values into their
    blocks (attending to what earlier chunks wrote there, `tile_blocks` at a time), and scores
    its last real tokens. `mesh` is the mesh the pool is laid over (see `paged_attention`)."""
    model = nnx.merge(graphdef, base, lora)
    adapters = AdapterBatch(chunk.slots, chunk.scales, form="per_row")  # at most R prompts
    index = jnp.arange(chunk.tokens.shape[1], dtype=jnp.int32)
    keep = index < chunk.length[:, None]
    positions = chunk.start[:, None] + jnp.where(keep, index, 0)
    hidden, view = model(chunk.tokens, positions, adapters, PagedView(pool, chunk.tables, keep, tile_blocks, mesh), mesh=mesh)
    last = jnp.take_along_axis(hidden, (jnp.maximum(chunk.length, 1) - 1)[:, None, None], axis=1)
    scores = (None, None, None)
    if score_prompt:
        scores = _prompt_scores(model, hidden, adapters, chunk.next_tokens, topk_prompt)
    return view.pool, ChunkScores(model.logits(last, adapters)[:, 0], *scores)


@partial(jax.jit, static_argnames=("topk_sample", "mesh"), donate_argnames=("pool", "state"))
def start(
    pool: KVPool, state: DecodeState, logits: jax.Array, entries: RowStart, topk_sample: int = 0, mesh: Mesh | None = None
) -> tuple[KVPool, DecodeState, jax.Array, jax.Array, jax.Array, TopLogprobs | None]:
    """Moves entries into their decode rows: copies their partial prompt blocks and draws each new
    entry's first token from its prompt's logits [U, V]. Returns the pool, the rows, and each
    entry's first token, its logprob, whether that already ended it, and (`topk_sample` > 0)
    the top alternatives there."""
    pool = copy_blocks(pool, entries.copy_src, entries.copy_dst, mesh)
    keys = _row_keys(entries.seeds, entries.sample_index)
    zeros = jnp.zeros_like(entries.sample_index)
    source = logits[entries.source]
    drawn, drawn_logprob = draw(source, keys, zeros, entries.temperature, entries.top_k, entries.top_p)
    top = top_logprobs(source, topk_sample) if topk_sample else None
    resumed = entries.resume_token >= 0
    token = jnp.where(resumed, entries.resume_token, drawn)
    logprob = jnp.where(resumed, 0.0, drawn_logprob)
    done = ~resumed & (_hits_stop(drawn, entries.stop_ids) | (entries.max_tokens <= 1))

    def put(x: jax.Array, value: jax.Array) -> jax.Array:
        return x.at[entries.rows].set(value, mode="drop")

    state = DecodeState(
        token=put(state.token, token),
        position=put(state.position, entries.position),
        generated=put(state.generated, jnp.where(resumed, entries.generated, 1)),
        max_tokens=put(state.max_tokens, entries.max_tokens),
        slots=put(state.slots, entries.slots),
        scales=put(state.scales, entries.scales),
        temperature=put(state.temperature, entries.temperature),
        top_k=put(state.top_k, entries.top_k),
        top_p=put(state.top_p, entries.top_p),
        keys=put(state.keys, keys),
        stop_ids=put(state.stop_ids, entries.stop_ids),
        done=put(state.done, done),
    )
    return pool, state, token, logprob, done, top


def decode_form(rows: int, slots: int) -> LoraForm:
    """A decode step feeds one token per row: per-row LoRA gathers while rows are fewer than the
    slots, every slot at once beyond (reading each slot once, not once per row)."""
    return "per_row" if rows < slots else "every_slot"


def _decode_rows(
    model: nnx.Module,
    pool: KVPool,
    state: DecodeState,
    tables: jax.Array,
    steps: int,
    form: LoraForm,
    tile: int,
    topk: int,
    mesh: Mesh | None,
) -> tuple[KVPool, DecodeState, jax.Array, jax.Array, TopLogprobs | None]:
    adapters = AdapterBatch(state.slots, state.scales, form=form)
    rows = state.token.shape[0]

    def cond(carry):
        i, _, _, _, _, done, _, _, _ = carry
        return (i < steps) & ~jnp.all(done)

    def body(carry):
        i, pool, token, position, generated, done, out_tokens, out_logprobs, out_top = carry
        view = PagedView(pool, tables, ~done[:, None], tile, mesh)
        hidden, view = model(token[:, None], position[:, None], adapters, view, mesh=mesh)
        logits = model.logits(hidden, adapters)[:, 0]
        new, logprob = draw(logits, state.keys, generated, state.temperature, state.top_k, state.top_p)
        live = ~done
        out_tokens = out_tokens.at[:, i].set(jnp.where(live, new, -1))
        out_logprobs = out_logprobs.at[:, i].set(jnp.where(live, logprob, 0.0))
        if out_top is not None:
            top = top_logprobs(logits, topk)
            out_top = TopLogprobs(out_top.ids.at[:, i].set(top.ids), out_top.logprobs.at[:, i].set(top.logprobs))
        generated = generated + live
        done = done | (live & (_hits_stop(new, state.stop_ids) | (generated >= state.max_tokens)))
        position = position + live
        return i + 1, view.pool, jnp.where(live, new, token), position, generated, done, out_tokens, out_logprobs, out_top

    init = (
        jnp.int32(0),
        pool,
        state.token,
        state.position,
        state.generated,
        state.done,
        jnp.full((rows, steps), -1, jnp.int32),
        jnp.zeros((rows, steps), jnp.float32),
        TopLogprobs(jnp.zeros((rows, steps, topk), jnp.int32), jnp.zeros((rows, steps, topk), jnp.float32)) if topk else None,
    )
    _, pool, token, position, generated, done, out_tokens, out_logprobs, out_top = jax.lax.while_loop(cond, body, init)
    new_state = replace(state, token=token, position=position, generated=generated, done=done)
    return pool, new_state, out_tokens, out_logprobs, out_top


@partial(
    jax.jit,
    static_argnames=("graphdef", "steps", "live_rows", "tile_blocks", "topk_sample", "mesh"),
    donate_argnames=("pool", "state"),
)
def decode(
    graphdef: nnx.GraphDef,
    base: nnx.State,
    lora: nnx.State,
    pool: KVPool,
    state: DecodeState,
    tables: jax.Array,
    finish: jax.Array,
    steps: int,
    live_rows: int,
    tile_blocks: int,
    topk_sample: int = 0,
    mesh: Mesh | None = None,
) -> tuple[KVPool, DecodeState, jax.Array, jax.Array, TopLogprobs | None]:
    """Up to `steps` tokens for every live row (fewer once all are done), after ending the rows
    in `finish`; `tables` [R, M] are the rows' blocks, which must cover every position a live
    row feeds in this call, and attention reads them `tile_blocks` at a time. Only the first
    `live_rows` rows are computed (every later row must be done), so a lightly used batch costs
    what its live rows cost. Returns the pool, the new state and [live_rows, steps] tokens and
    logprobs, -1 / 0 where a row was done, and with `topk_sample` > 0 the top alternatives at
    each of those positions ([live_rows, steps, topk_sample]; meaningless where a row was done)."""
    model = nnx.merge(graphdef, base, lora)
    state = replace(state, done=state.done | finish)
    form = decode_form(live_rows, jax.tree.leaves(lora)[0].shape[0])
    if live_rows == state.token.shape[0]:
        return _decode_rows(model, pool, state, tables, steps, form, tile_blocks, topk_sample, mesh)
    head = jax.tree.map(lambda x: x[:live_rows], state)
    pool, head, out_tokens, out_logprobs, out_top = _decode_rows(
        model, pool, head, tables[:live_rows], steps, form, tile_blocks, topk_sample, mesh
    )
    state = jax.tree.map(lambda x, h: x.at[:live_rows].set(h), state, head)
    return pool, state, out_tokens, out_logprobs, out_top

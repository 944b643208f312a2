"""Continuous batching over the paged KV cache: sample requests of many samplers and adapters
share R decode rows and one pool of KV blocks.

Each sample occupies one row from admission until its sequence ends; the row is then free for
the next queued sample at once. Admission is by free rows *and* free blocks: a request's prompt
takes the blocks its tokens need (its full blocks first looked up in the prefix cache of earlier
prompts on the same adapter weights), and its samples share those blocks, each with its own copy
of the partial last block. One `step()` admits what fits, runs one chunk of every prompt being
prefilled (at most `sampler.PREFILL_CHUNK_TOKENS` tokens, so a long prompt never stalls the
running rows for more than one chunk), starts the rows whose prompts are done (drawing their
first tokens), gives running rows the blocks their next chunk writes, decodes one chunk of up
to `chunk` tokens, and hands every finished request to its callback. When blocks run out the
most recently admitted rows are preempted: their blocks are freed and the sequence is
recomputed from its tokens later, producing the same tokens it would have.

Stop token ids and budgets end rows on the device; stop strings are checked here, on the
decoded text, and end the row at the token that completes the string.

Requests name an adapter, not a device slot: a queued request holds no slot, and `resolve`
makes its adapter resident only when rows are free to admit it (or answers None while no slot
can be had, and the request waits). Slots of admitted requests are pinned (`pins_slot`) until
their last row ends.

One request's failure is its own: sampling controls that do not fit the device arrays are
refused at `submit`, and a prompt chunk that fails without consuming the pool is retried prompt
by prompt so that only the request that fails alone fails; rows already decoding keep their
state. Only a failure that loses the shared state (a donated call that ran) fails every
request in flight.

Pure host logic over `tuft_jax.sampler`; it is driven by one thread (the engine's owner).
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, Sharding

from tuft_jax import sampler
from tuft_jax.batching import batch_bucket, bucket
from tuft_jax.errors import InputError
from tuft_jax.kv_blocks import BlockTable, blocks_for, prefix_keys
from tuft_jax.paged_attention import BLOCK_TOKENS, KVPool, block_bytes, init_pool, pool_spec, scratch_blocks, tile_blocks
from tuft_jax.models.decoder import DecoderConfig
from tuft_jax.types import KVCacheStats, SampledSequence, SampleResult, SamplingParams

logger = logging.getLogger(__name__)

OnDone = Callable[[SampleResult | None, BaseException | None], None]

HostTop = tuple[np.ndarray, np.ndarray]
"""A row's top alternatives on the host: token ids and logprobs, [positions, k] each."""


Resolve = Callable[[int, set[int]], tuple[int, np.ndarray] | None]
"""(adapter, adapters to keep resident) -> (device slot, its LoRA scales [3]), or None while no
slot can be had."""


@dataclass
class SampleJob:
    """One sample request as the engine accepted it."""

    adapter: int
    prompt: np.ndarray
    num_samples: int
    params: SamplingParams
    seed: int
    """Any integer; reduced to 64 bits."""
    prompt_logprobs: bool
    topk_prompt_logprobs: int
    on_done: OnDone
    """Called once, with the result or the error that ended the request."""
    topk_sample_logprobs: int = 0
    """The most likely tokens to report at every sampled position (0: none)."""


@dataclass
class _Sequence:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk: list[list[tuple[int, float]]] = field(default_factory=list)
    stop_reason: str | None = None
    clean: int = 0
    """Length of the prefix known to contain no stop string."""


@dataclass(frozen=True)
class _Controls:
    """A request's sampling controls as the device arrays hold them."""

    temperature: np.float32
    top_k: np.int32
    top_p: np.float32
    seed: np.ndarray
    """[2] uint32: the low and high halves of the 64-bit seed."""
    max_tokens: np.int32
    stop_ids: np.ndarray
    """[MAX_STOP_IDS] int32, padded with -1."""


def _controls(params: SamplingParams, seed: int) -> _Controls:
    """Raises InputError for a value the device arrays cannot hold, so a bad request fails at
    submission and never reaches the shared rows."""
    try:
        if len(params.stop_token_ids) > sampler.MAX_STOP_IDS:
            raise ValueError(f"more than {sampler.MAX_STOP_IDS} stop token ids")
        stop_ids = np.full(sampler.MAX_STOP_IDS, -1, np.int32)
        stop_ids[: len(params.stop_token_ids)] = np.array(params.stop_token_ids, np.int32)
        floats = np.array([params.temperature, params.top_p], np.float64)
        if not np.isfinite(floats.astype(np.float32)).all():
            raise ValueError("temperature and top_p must be finite 32-bit floats")
        seed %= 1 << 64
        return _Controls(
            temperature=np.float32(params.temperature),
            top_k=np.array(params.top_k, np.int32)[()],
            top_p=np.float32(params.top_p),
            seed=np.array([seed & 0xFFFFFFFF, seed >> 32], np.uint32),
            max_tokens=np.array(params.max_tokens, np.int32)[()],
            stop_ids=stop_ids,
        )
    except (OverflowError, ValueError, TypeError) as exc:
        raise InputError(f"sampling parameters out of range: {exc}") from exc


@dataclass(eq=False)
class _Request:
    job: SampleJob
    controls: _Controls
    slot: int | None = None
    """The device slot, once the adapter was made resident for admission."""
    scales: np.ndarray | None = None
    admitted: int = 0
    open: int = 0
    sequences: list[_Sequence] = field(default_factory=list)
    prefilling: bool = False
    prompt_blocks: list[int] | None = None
    """The prompt's blocks, held from the end of its prefill until its last sample has a row."""
    logits: jax.Array | None = None
    """[V] after the prompt's last token, kept as long as `prompt_blocks`."""
    weights_version: int | None = None
    """The adapter's weights version when the prompt was admitted: blocks computed under it."""
    prompt_logprobs: list[float] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def scores_prompt(self) -> bool:
        return self.job.prompt_logprobs or self.job.topk_prompt_logprobs > 0


class DecodeScheduler:
    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: Callable[[], tuple[nnx.State, nnx.State]],
        config: DecoderConfig,
        dtype: jnp.dtype,
        decode_text: Callable[[list[int]], str],
        resolve: Resolve,
        *,
        rows: int,
        chunk: int,
        max_length: int,
        kv_blocks: int,
        weights_version: Callable[[int], int] = lambda adapter: 0,
        placement: Sharding | None = None,
        mesh: Mesh | None = None,
    ) -> None:
        """`params()` returns the current (base, lora) states: read at every call, so training
        between chunks is seen by the next chunk (samplers use frozen snapshot slots);
        `weights_version(adapter)` changes whenever that adapter's weights do, so no prompt
        reuses blocks computed with older weights. The pool holds `kv_blocks` blocks: block 0 is
        scratch, and the rest must hold one `max_length` sequence and the copy of its prompt's
        partial block, so a request always fits once the others are done. With a `mesh` the pool
        is laid over it (`paged_attention.pool_spec`) and the rows are replicated."""
        self._graphdef = graphdef
        self._resolve = resolve
        self._params = params
        self._config = config
        self._dtype = dtype
        self._decode_text = decode_text
        self._weights_version = weights_version
        self.rows = rows
        self.chunk = chunk
        self.max_length = max_length
        self._width = blocks_for(max_length)
        self._mesh = mesh
        self._scratch = scratch_blocks(mesh, kv_blocks)
        if kv_blocks - len(self._scratch) < self._width + 1:
            raise ValueError(f"a KV pool of {kv_blocks} blocks cannot hold one {max_length}-token sequence")
        self._bytes_per_block = block_bytes(config.num_layers, config.num_kv_heads, config.head_dim, dtype)
        self._kv_blocks = kv_blocks
        self.blocks = BlockTable(kv_blocks, self._bytes_per_block, self._scratch)
        self._placement = placement
        self._pool: KVPool | None = None
        self._state: sampler.DecodeState | None = None
        self._queue: deque[_Request] = deque()
        """Requests with samples not yet given a row, in arrival order."""
        self._resume: deque[_Resume] = deque()
        """Preempted sequences waiting for a row, oldest preemption first; admitted before the queue."""
        self._prefilling: list[_Prefill] = []
        self._owner: list[tuple[_Request, int] | None] = [None] * rows
        """The sample each row holds, from admission (rows of prompts still prefilling included)."""
        self._decoding = np.zeros(rows, bool)
        """Rows started on the device."""
        self._row_blocks: list[list[int]] = [[] for _ in range(rows)]
        self._tables = np.zeros((rows, self._width), np.int32)
        self._admitted_at = np.zeros(rows, np.int64)
        self._clock = itertools.count(1)
        self._position = np.zeros(rows, np.int64)
        """Host mirror of each row's `position` (where its last token is fed next)."""
        self._limit = np.zeros(rows, np.int64)
        """prompt + max_tokens - 1: one past the last position a row ever feeds."""
        self._finish = np.zeros(rows, bool)
        """Rows the host ended (stop strings, preemption) that the device still decodes."""
        self.preemptions = 0

    # ---- queries --------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self._queue or self._resume) or any(owner is not None for owner in self._owner)

    @property
    def queued_rows(self) -> int:
        """Samples accepted but not yet given a decode row."""
        return sum(r.job.num_samples - r.admitted for r in self._queue) + len(self._resume)

    def kv_stats(self) -> KVCacheStats:
        return replace(self.blocks.stats(), preemptions=self.preemptions)

    def _requests(self) -> list[_Request]:
        live = [owner[0] for owner in self._owner if owner is not None]
        return [*live, *self._queue, *(r.request for r in self._resume)]

    def pins_slot(self, slot: int) -> bool:
        """Whether an admitted request (decoding, prefilling or partly admitted) reads `slot`,
        which must then not be parked or reused."""
        return any(r.slot == slot for r in self._requests())

    def uses_adapter(self, adapter: int) -> bool:
        """Whether a queued or running request reads `adapter` (it must not be released)."""
        return any(r.job.adapter == adapter for r in self._requests())

    # ---- driving --------------------------------------------------------------------------

    def submit(self, job: SampleJob) -> None:
        """Queue a request; raises InputError (and queues nothing) if its controls do not fit."""
        controls = _controls(job.params, job.seed)
        self._queue.append(_Request(job, controls, sequences=[_Sequence() for _ in range(job.num_samples)]))

    def step(self) -> None:
        """Admit what fits, run one prompt chunk, start the rows whose prompts are done, decode
        one chunk, complete finished requests. A request that fails alone fails alone; on an
        error that loses the shared state every request in flight fails with it (the state is
        rebuilt) and the error is re-raised."""
        try:
            self._admit()
            if self._prefilling:
                self._prefill_chunk()
            if self._decoding.any():
                self._decode_chunk()
        except BaseException as exc:
            self._fail_all(exc)
            raise

    # ---- admission ------------------------------------------------------------------------

    def _admit(self) -> None:
        """Preempted sequences first, then queued samples in queue order, into free rows while
        blocks last; a request whose adapter cannot be made resident now waits (later requests
        may go first). Blocks for a prompt and its samples' partial-block copies are taken at
        admission, and one block per running row is kept back for their growth."""
        free = [r for r, owner in enumerate(self._owner) if owner is None]
        while self._resume and free:
            item = self._resume[0]
            prompt = self._reserve_prompt(item.request.job.adapter, item.tokens, 0, reuse=True)
            if prompt is None:
                return
            self._resume.popleft()
            row = free.pop(0)
            self._take_row(row, item.request, item.index)
            self._prefilling.append(_Prefill(item.request, item.tokens, *prompt, rows=[row], resume=item))
        keep = {r.job.adapter for r in self._requests() if r.slot is not None}
        for request in list(self._queue):
            if not free:
                break
            if request.slot is None:
                resolved = self._resolve(request.job.adapter, keep)
                if resolved is None:
                    continue
                request.slot, request.scales = resolved
            keep.add(request.job.adapter)
            if not self._admit_samples(request, free):
                break
        while self._queue and self._queue[0].admitted == self._queue[0].job.num_samples:
            self._queue.popleft()

    def _admit_samples(self, request: _Request, free: list[int]) -> bool:
        """Gives the request's next samples rows from `free` (and its prompt blocks, on its first
        admission), as many as rows and blocks allow; False when not even one fits."""
        first = request.prompt_blocks is None and not request.prefilling
        if first:
            request.weights_version = self._weights_version(request.job.adapter)
        prompt = None
        for take in range(min(request.job.num_samples - request.admitted, len(free)), 0, -1):
            copies = self._copies(request, take)
            if first:
                prompt = self._reserve_prompt(request.job.adapter, request.job.prompt, copies, reuse=not request.scores_prompt)
                if prompt is not None:
                    break
            elif self.blocks.available - copies >= self._reserve():
                break
        else:
            return False
        copy_blocks = self.blocks.allocate(copies) or []
        rows = [free.pop(0) for _ in range(take)]
        for i, row in enumerate(rows):
            self._take_row(row, request, request.admitted + i)
        request.admitted += take
        request.open += take
        entries = list(zip(rows, range(request.admitted - take, request.admitted), strict=True))
        if first:
            request.prefilling = True
            self._prefilling.append(_Prefill(request, request.job.prompt, *prompt, rows=rows, copies=copy_blocks))
        elif request.prefilling:
            self._prefilling_of(request).pending.append((entries, copy_blocks))
        else:
            self._start_rows([_StartGroup(request, entries, copy_blocks)])
        return True

    def _copies(self, request: _Request, take: int) -> int:
        """Partial-block copies `take` more samples need: one each, but the request's last sample
        takes the prompt's own partial block (nothing else reads it after)."""
        if request.job.prompt.size % BLOCK_TOKENS == 0:
            return 0
        return take - (request.admitted + take == request.job.num_samples)

    def _prefilling_of(self, request: _Request) -> _Prefill:
        return next(p for p in self._prefilling if p.request is request and p.resume is None)

    def _reserve(self) -> int:
        return int(self._decoding.sum())

    def _reserve_prompt(
        self, adapter: int, tokens: np.ndarray, extra: int, reuse: bool
    ) -> tuple[list[int], int, list[bytes]] | None:
        """The blocks `tokens` need: with `reuse`, the longest cached prefix of full blocks (never
        the block with the last token, whose logits are needed) and fresh ones for the rest, if
        they and `extra` more fit beside the growth reserve. Returns the blocks, how many tokens
        they already hold, and the prompt's prefix keys."""
        keys = prefix_keys((adapter, self._weights_version(adapter)), tokens)
        usable = keys[: (tokens.size - 1) // BLOCK_TOKENS] if reuse else []
        cached = self.blocks.lookup(usable)
        fresh = blocks_for(tokens.size) - len(cached)
        if self.blocks.available - fresh - extra < self._reserve():
            self.blocks.release(cached)
            return None
        blocks = self.blocks.allocate(fresh)
        assert blocks is not None
        self.blocks.record_lookup(len(usable), len(cached))
        return cached + blocks, len(cached) * BLOCK_TOKENS, keys

    def _take_row(self, row: int, request: _Request, index: int) -> None:
        self._owner[row] = (request, index)
        self._admitted_at[row] = next(self._clock)

    # ---- prefill --------------------------------------------------------------------------

    def _prefill_chunk(self) -> None:
        """Runs the next chunk of every prompt being prefilled (all together; if that fails, one by
        one, failing only the prompts whose own chunk fails), then starts the rows of the prompts
        that are done."""
        items = list(self._prefilling)
        try:
            self._run_chunk(items)
        except _StateLost:
            raise
        except Exception as exc:
            if len(items) == 1:
                self._fail_request(items[0].request, exc)
            else:
                logger.warning("a joint prefill failed; running its %d prompts one by one", len(items), exc_info=True)
                for item in items:
                    try:
                        self._run_chunk([item])
                    except _StateLost:
                        raise
                    except Exception as exc:
                        self._fail_request(item.request, exc)
        finished = [item for item in self._prefilling if item.computed == item.tokens.size]
        self._prefilling = [item for item in self._prefilling if item.computed < item.tokens.size]
        if finished:
            self._finish_prefill(finished)

    def _run_chunk(self, items: list[_Prefill]) -> None:
        u = batch_bucket(len(items))
        remaining = max(i.tokens.size - i.computed for i in items)
        width = bucket(sampler.prefill_width(remaining, len(items), sampler.PREFILL_CHUNK_TOKENS), minimum=8)
        tokens = np.zeros((u, width), np.int32)
        next_tokens = np.zeros((u, width), np.int32)
        start = np.zeros(u, np.int32)
        length = np.zeros(u, np.int32)
        tables = np.zeros((u, self._width), np.int32)
        slots = np.zeros(u, np.int32)
        scales = np.zeros((u, 3), np.float32)
        for i, item in enumerate(items):
            n = min(width, item.tokens.size - item.computed)
            tokens[i, :n] = item.tokens[item.computed : item.computed + n]
            following = item.tokens[item.computed + 1 : item.computed + n + 1]
            next_tokens[i, : following.size] = following
            start[i], length[i] = item.computed, n
            tables[i, : len(item.blocks)] = item.blocks
            slots[i], scales[i] = item.request.slot, item.request.scales
        scored = [item for item in items if item.scores]
        topk = max((item.request.job.topk_prompt_logprobs for item in scored), default=0)
        chunk = sampler.PromptChunk(tokens, start, length, tables, slots, scales, next_tokens)
        base, lora = self._params()
        pool = self._require_pool()
        try:
            self._pool, out = sampler.prefill(
                self._graphdef, base, lora, pool, chunk,
                score_prompt=bool(scored),
                topk_prompt=self._topk_width(topk),
                tile_blocks=self._tile(int((start + length).max()), u), mesh=self._mesh,
            )  # fmt: skip
        except Exception as exc:
            if any(x.is_deleted() for x in pool):
                raise _StateLost(str(exc)) from exc
            raise
        lp, ids, top_lp = jax.device_get((out.prompt_logprobs, out.topk_ids, out.topk_logprobs))
        for i, item in enumerate(items):
            n = int(length[i])
            if item.scores:
                item.prompt_scores.extend(lp[i, :n].tolist())
                if ids is not None:
                    item.topk.extend(
                        [(int(t), float(v)) for t, v in zip(ids[i, p], top_lp[i, p], strict=True)] for p in range(n)
                    )
            item.computed += n
            if item.computed == item.tokens.size:
                item.logits = out.last_logits[i]

    def _finish_prefill(self, items: list[_Prefill]) -> None:
        """Registers the prompts' full blocks in the prefix cache and starts their rows."""
        groups = []
        for item in items:
            request = item.request
            for key, block in zip(item.keys, item.blocks, strict=False):
                self.blocks.register(key, block)
            if item.resume is not None:
                groups.append(_StartGroup(request, [(item.rows[0], item.resume.index)], [], item))
                continue
            request.prefilling = False
            request.prompt_blocks, request.logits = item.blocks, item.logits
            if item.scores:
                self._keep_prompt_scores(request, item)
            groups.append(_StartGroup(request, list(zip(item.rows, range(len(item.rows)), strict=True)), item.copies))
            groups.extend(_StartGroup(request, entries, copies) for entries, copies in item.pending)
        self._start_rows(groups)

    def _keep_prompt_scores(self, request: _Request, item: _Prefill) -> None:
        n, k = request.job.prompt.size, request.job.topk_prompt_logprobs
        if request.job.prompt_logprobs:
            request.prompt_logprobs = [float("nan")] + item.prompt_scores[: n - 1]
        if k > 0:
            request.topk_prompt_logprobs = [[]] + [alternatives[:k] for alternatives in item.topk[: n - 1]]

    # ---- starting rows --------------------------------------------------------------------

    def _start_rows(self, groups: list[_StartGroup]) -> None:
        """Moves samples whose prompt is prefilled into their rows: each takes the prompt's full
        blocks (shared) and a copy of its partial last block, or, resumed, its own blocks."""
        r = self.rows
        logits = [g.prefill.logits if g.prefill is not None else g.request.logits for g in groups]
        rows = np.full(r, r, np.int32)
        fields = {
            "source": np.zeros(r, np.int32), "slots": np.zeros(r, np.int32), "scales": np.zeros((r, 3), np.float32),
            "temperature": np.zeros(r, np.float32), "top_k": np.zeros(r, np.int32), "top_p": np.ones(r, np.float32),
            "seeds": np.zeros((r, 2), np.uint32), "sample_index": np.zeros(r, np.int32),
            "max_tokens": np.zeros(r, np.int32), "stop_ids": np.full((r, sampler.MAX_STOP_IDS), -1, np.int32),
            "position": np.zeros(r, np.int32), "resume_token": np.full(r, -1, np.int32),
            "generated": np.zeros(r, np.int32), "copy_src": np.zeros(r, np.int32), "copy_dst": np.zeros(r, np.int32),
        }  # fmt: skip
        e = 0
        for g_index, group in enumerate(groups):
            request, c = group.request, group.request.controls
            for k, (row, index) in enumerate(group.entries):
                rows[e] = row
                fields["source"][e], fields["slots"][e], fields["scales"][e] = g_index, request.slot, request.scales
                fields["temperature"][e], fields["top_k"][e], fields["top_p"][e] = c.temperature, c.top_k, c.top_p
                fields["seeds"][e], fields["sample_index"][e] = c.seed, index
                fields["max_tokens"][e], fields["stop_ids"][e] = c.max_tokens, c.stop_ids
                blocks, position = self._row_layout(group, k, fields, e)
                fields["position"][e] = position
                self._row_blocks[row] = blocks
                self._tables[row] = 0
                self._tables[row, : len(blocks)] = blocks
                self._position[row] = position
                self._limit[row] = request.job.prompt.size + request.job.params.max_tokens - 1
                e += 1
        u = batch_bucket(len(logits))
        stacked = jnp.stack([*logits, *[logits[0]] * (u - len(logits))])
        entries = sampler.RowStart(rows=rows, **fields)
        topk = self._topk_width(max(g.request.job.topk_sample_logprobs for g in groups))
        try:
            self._ensure_state()
            self._pool, self._state, tokens, logprobs, done, top = sampler.start(
                self._require_pool(), self._state, stacked, entries, topk_sample=topk, mesh=self._mesh
            )
            tokens, logprobs, done, top = jax.device_get((tokens, logprobs, done, top))
        except Exception as exc:
            raise _StateLost(str(exc)) from exc
        for group in groups:
            self._release_prompt_if_admitted(group.request)
        e = 0
        for group in groups:
            for row, _ in group.entries:
                self._decoding[row] = True
                self._finish[row] = False
                if group.prefill is None or group.prefill.resume is None:
                    first = None if top is None else (top.ids[e : e + 1], top.logprobs[e : e + 1])
                    self._extend(row, [int(tokens[e])], [float(logprobs[e])], first, bool(done[e]))
                e += 1

    def _row_layout(self, group: _StartGroup, k: int, fields: dict[str, np.ndarray], e: int) -> tuple[list[int], int]:
        """Entry e's blocks and the position of its first fed token; fills its copy and resume fields."""
        if group.prefill is not None and group.prefill.resume is not None:
            item = group.prefill
            fields["resume_token"][e], fields["generated"][e] = item.resume.token, item.resume.generated
            return item.blocks, item.tokens.size
        blocks = list(group.request.prompt_blocks)
        if k >= len(group.copies):  # a full last block, or the request's last sample
            self.blocks.hold(blocks)
            return blocks, group.request.job.prompt.size
        fields["copy_src"][e], fields["copy_dst"][e] = blocks.pop(), group.copies[k]
        self.blocks.hold(blocks)
        return [*blocks, group.copies[k]], group.request.job.prompt.size

    def _release_prompt_if_admitted(self, request: _Request) -> None:
        """A request holds its prompt's blocks (and logits) until its last sample has a row."""
        if request.admitted == request.job.num_samples and request.prompt_blocks is not None:
            self.blocks.release(request.prompt_blocks)
            request.prompt_blocks, request.logits = [], None

    # ---- decoding -------------------------------------------------------------------------

    def _live(self) -> list[int]:
        return [int(r) for r in np.flatnonzero(self._decoding)]

    def _decode_chunk(self) -> None:
        self._grow()
        live = self._live()
        if not live:
            return
        base, lora = self._params()
        rows = self._live_rows(live[-1])
        asked = [owner[0].job.topk_sample_logprobs for r in live if (owner := self._owner[r]) is not None]
        topk = self._topk_width(max(asked, default=0))
        try:
            self._pool, self._state, tokens, logprobs, top = sampler.decode(
                self._graphdef, base, lora, self._require_pool(), self._require_state(), self._tables, self._finish,
                steps=self.chunk, live_rows=rows,
                tile_blocks=self._tile(max(min(self._position[r] + self.chunk, self._limit[r]) for r in live), rows),
                topk_sample=topk, mesh=self._mesh,
            )  # fmt: skip
            tokens, logprobs, top, done = jax.device_get((tokens, logprobs, top, self._state.done))
        except Exception as exc:
            raise _StateLost(str(exc)) from exc
        self._finish[:] = False
        for row in live:
            n = int((tokens[row] >= 0).sum())
            self._position[row] += n
            alternatives = None if top is None else (top.ids[row, :n], top.logprobs[row, :n])
            self._extend(row, tokens[row, :n].tolist(), logprobs[row, :n].tolist(), alternatives, bool(done[row]))

    def _grow(self) -> None:
        """Gives every running row the blocks its next chunk writes, oldest rows first; when the
        pool runs out, the most recently admitted rows are preempted (to be recomputed later)."""
        for row in sorted(self._live(), key=lambda r: self._admitted_at[r]):
            if not self._decoding[row]:
                continue
            need = blocks_for(min(self._position[row] + self.chunk, self._limit[row])) - len(self._row_blocks[row])
            while need > self.blocks.available:
                victim = max(self._live(), key=lambda r: self._admitted_at[r])
                self._preempt(victim)
                if victim == row:
                    break
            if self._decoding[row] and need > 0:
                fresh = self.blocks.allocate(need)
                assert fresh is not None
                self._tables[row, len(self._row_blocks[row]) : len(self._row_blocks[row]) + need] = fresh
                self._row_blocks[row].extend(fresh)

    def _preempt(self, row: int) -> None:
        """Frees a running row and queues its sequence to be recomputed from its tokens: the
        tokens it produced are kept, and it goes on from the next one as if never stopped."""
        request, index = self._owner[row]
        seq = request.sequences[index]
        logger.info("KV blocks ran out: preempting a sequence of %d tokens", request.job.prompt.size + len(seq.tokens))
        tokens = self._cached_tokens(request, seq)
        self._resume.append(_Resume(request, index, tokens, seq.tokens[-1], len(seq.tokens)))
        self._cache_row(row, request, tokens)
        self._free_row(row)
        self.preemptions += 1

    @staticmethod
    def _cached_tokens(request: _Request, seq: _Sequence) -> np.ndarray:
        """The tokens whose keys and values a row's blocks hold: its last token is never fed."""
        return np.concatenate([request.job.prompt, np.asarray(seq.tokens[:-1], np.int32)])

    def _cache_row(self, row: int, request: _Request, tokens: np.ndarray) -> None:
        """Enters the row's full blocks in the prefix cache before it lets them go, so a resumed
        sequence or a follow-up prompt that extends this one (a next chat turn) reuses them."""
        version = self._weights_version(request.job.adapter)
        if version != request.weights_version:
            return
        keys = prefix_keys((request.job.adapter, version), tokens)
        for key, block in zip(keys, self._row_blocks[row], strict=False):
            self.blocks.register(key, block)

    def _free_row(self, row: int) -> None:
        self.blocks.release(self._row_blocks[row])
        self._row_blocks[row] = []
        self._tables[row] = 0
        self._owner[row] = None
        self._decoding[row] = False
        self._finish[row] = True

    def _extend(self, row: int, tokens: list[int], logprobs: list[float], top: HostTop | None, done: bool) -> None:
        """`_append`, failing the row's request alone if its host-side handling fails."""
        owner = self._owner[row]
        if owner is None:  # its request failed earlier in this pass
            return
        try:
            self._append(row, owner, tokens, logprobs, top, done)
        except Exception as exc:
            self._fail_request(owner[0], exc)

    def _append(
        self, row: int, owner: tuple[_Request, int], tokens: list[int], logprobs: list[float], top: HostTop | None, done: bool
    ) -> None:
        """Appends a row's new tokens (and the top alternatives its request asked for); ends the
        row if the device finished it or a stop string appeared, and completes its request once
        all of that request's rows have ended."""
        request, index = owner
        seq = request.sequences[index]
        seq.tokens.extend(tokens)
        seq.logprobs.extend(logprobs)
        k = request.job.topk_sample_logprobs
        if k and top is not None:
            ids, values = top
            seq.topk.extend(list(zip(i[:k].tolist(), v[:k].tolist(), strict=True)) for i, v in zip(ids, values, strict=True))
        params = request.job.params
        end = self._stop_string_end(seq, params.stop_strings) if params.stop_strings else None
        if end is not None:
            del seq.tokens[end:], seq.logprobs[end:], seq.topk[end:]
            seq.stop_reason = "stop"
        elif done:
            seq.stop_reason = "stop" if seq.tokens[-1] in params.stop_token_ids else "length"
        else:
            return
        self._cache_row(row, request, self._cached_tokens(request, seq))
        self._free_row(row)
        request.open -= 1
        if request.open == 0 and request.admitted == request.job.num_samples:
            self._complete(request)

    def _stop_string_end(self, seq: _Sequence, stops: tuple[str, ...]) -> int | None:
        """The shortest prefix whose text contains a stop string, if any."""
        if not any(stop in self._decode_text(seq.tokens) for stop in stops):
            seq.clean = len(seq.tokens)
            return None
        for end in range(seq.clean + 1, len(seq.tokens) + 1):
            if any(stop in self._decode_text(seq.tokens[:end]) for stop in stops):
                return end
        return len(seq.tokens)

    def _topk_width(self, k: int) -> int:
        """The static top-k a compiled call computes for requests asking up to k: a power of two
        (so few programs), at most the vocabulary; 0 when none asks."""
        return min(batch_bucket(k), self._config.vocab_size) if k else 0

    def _tile(self, span: int, rows: int) -> int:
        return tile_blocks(span, rows, self._config.num_kv_heads, self._config.head_dim)

    def _live_rows(self, last: int) -> int:
        """How many leading rows a chunk computes: a power of 4 (or all rows) covering row `last`.
        Free rows are refilled lowest first, so live rows gather at the front."""
        n = 1
        while n <= last:
            n *= 4
        return min(n, self.rows)

    # ---- device state ---------------------------------------------------------------------

    def _ensure_state(self) -> None:
        if self._state is None:
            build = functools.partial(sampler.init_state, self.rows)
            # Built in place (never moved), so it also works when the devices span several processes.
            self._state = build() if self._placement is None else jax.jit(build, out_shardings=self._placement)()

    def _require_pool(self) -> KVPool:
        if self._pool is None:
            cfg = self._config
            build = functools.partial(
                init_pool, cfg.num_layers, self._kv_blocks, cfg.num_kv_heads, cfg.head_dim, self._dtype
            )
            if self._mesh is None:
                self._pool = build()
            else:
                placement = NamedSharding(self._mesh, pool_spec(self._mesh, cfg.num_kv_heads, self._kv_blocks))
                self._pool = jax.jit(build, out_shardings=KVPool(placement, placement))()
        return self._pool

    def _require_state(self) -> sampler.DecodeState:
        assert self._state is not None
        return self._state

    # ---- completion -----------------------------------------------------------------------

    def _complete(self, request: _Request) -> None:
        result = SampleResult(
            sequences=[
                SampledSequence(
                    tokens=s.tokens,
                    logprobs=s.logprobs,
                    stop_reason=s.stop_reason,  # type: ignore[arg-type]
                    topk_logprobs=s.topk if request.job.topk_sample_logprobs else None,
                )
                for s in request.sequences
            ],
            prompt_logprobs=request.prompt_logprobs,
            topk_prompt_logprobs=request.topk_prompt_logprobs,
        )
        _notify(request.job, result, None)

    def _fail_request(self, request: _Request, exc: BaseException) -> None:
        """End one request with `exc`: out of the queue, its rows and blocks freed; the others go on."""
        logger.warning("a sample request failed on its own: %s", exc)
        if request in self._queue:
            self._queue.remove(request)
        self._resume = deque(r for r in self._resume if r.request is not request)
        for item in [p for p in self._prefilling if p.request is request]:
            self.blocks.release(item.blocks + item.copies + [b for _, copies in item.pending for b in copies])
            self._prefilling.remove(item)
        for row, owner in enumerate(self._owner):
            if owner is not None and owner[0] is request:
                self._free_row(row)
        if request.prompt_blocks:
            self.blocks.release(request.prompt_blocks)
        request.prompt_blocks, request.logits = [], None
        _notify(request.job, None, exc)

    def _fail_all(self, exc: BaseException) -> None:
        failed = list(dict.fromkeys(self._requests()))
        self._queue.clear()
        self._resume.clear()
        self._prefilling = []
        self._owner = [None] * self.rows
        self._decoding[:] = False
        self._row_blocks = [[] for _ in range(self.rows)]
        self._tables[:] = 0
        self._finish[:] = False
        self.blocks = BlockTable(self._kv_blocks, self._bytes_per_block, self._scratch)
        self._state = None
        self._pool = None
        for request in failed:
            _notify(request.job, None, exc)


class _StateLost(RuntimeError):
    """The shared decode state may be gone (a donated call failed): every request fails."""


@dataclass(eq=False)
class _Resume:
    """A preempted sequence: its prompt and produced tokens but the last (`tokens`), which are
    prefilled again, then it decodes on from `token` with `generated` tokens produced."""

    request: _Request
    index: int
    tokens: np.ndarray
    token: int
    generated: int


@dataclass(eq=False)
class _Prefill:
    """Tokens being written into their blocks chunk by chunk: a request's prompt (for the samples
    in `rows`, with their partial-block `copies`, and samples admitted meanwhile in `pending`) or
    a preempted sequence's tokens (`resume`)."""

    request: _Request
    tokens: np.ndarray
    blocks: list[int]
    computed: int
    """Leading tokens already in the blocks (a prefix-cache hit, then each chunk run)."""
    keys: list[bytes]
    rows: list[int]
    copies: list[int] = field(default_factory=list)
    resume: _Resume | None = None
    pending: list[tuple[list[tuple[int, int]], list[int]]] = field(default_factory=list)
    logits: jax.Array | None = None
    prompt_scores: list[float] = field(default_factory=list)
    topk: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def scores(self) -> bool:
        return self.resume is None and self.request.scores_prompt


@dataclass(eq=False)
class _StartGroup:
    """Samples of one request entering rows: (row, sample index) entries, their partial-block
    copies, and the prefill they come from (None for samples admitted after it finished)."""

    request: _Request
    entries: list[tuple[int, int]]
    copies: list[int]
    prefill: _Prefill | None = None


def _notify(job: SampleJob, result: SampleResult | None, exc: BaseException | None) -> None:
    try:
        job.on_done(result, exc)
    except Exception:
        logger.exception("a sample completion callback failed")

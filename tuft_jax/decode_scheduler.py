"""Continuous batching: sample requests of many samplers and adapters share R decode rows.

Each sample of a request occupies one row from admission until its sequence ends; the row is
then free for the next queued sample at once. One `step()` admits queued samples into the
free rows (a jitted prefill that draws their first tokens), then runs one jitted decode chunk
of up to `chunk` tokens over all rows, and hands every finished request to its callback.
Stop token ids and budgets end rows on the device; stop strings are checked here, on the
decoded text, and end the row at the token that completes the string.

Requests name an adapter, not a device slot: a queued request holds no slot, and `resolve`
makes its adapter resident only when rows are free to admit it (or answers None while no slot
can be had, and the request waits). Slots of admitted requests are pinned (`pins_slot`) until
their last row ends.

One request's failure is its own: sampling controls that do not fit the device arrays are
refused at `submit`, and a prefill that fails is retried request by request so that only the
request that fails alone fails; rows already decoding keep their state. Only a failure that
loses the shared state (insert, resize, a decode chunk) fails every request in flight.

Pure host logic over `tuft_jax.sampler`; it is driven by one thread (the engine's owner).
"""

from __future__ import annotations

import functools

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Sharding

from tuft_jax import sampler
from tuft_jax.batching import batch_bucket, bucket
from tuft_jax.errors import InputError
from tuft_jax.models.decoder import DecoderConfig
from tuft_jax.types import SampledSequence, SampleResult, SamplingParams

logger = logging.getLogger(__name__)

MIN_CACHE_LENGTH = 128
"""The decode cache never shrinks below this many positions (fewer resizes and compiles)."""

OnDone = Callable[[SampleResult | None, BaseException | None], None]


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


@dataclass
class _Sequence:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
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
        placement: Sharding | None = None,
    ) -> None:
        """`params()` returns the current (base, lora) states: read at every call, so training
        between chunks is seen by the next chunk (samplers use frozen snapshot slots)."""
        self._graphdef = graphdef
        self._resolve = resolve
        self._params = params
        self._config = config
        self._dtype = dtype
        self._decode_text = decode_text
        self.rows = rows
        self.chunk = chunk
        self.max_length = bucket(max_length, minimum=MIN_CACHE_LENGTH)
        self._placement = placement
        self._state: sampler.DecodeState | None = None
        self._queue: deque[_Request] = deque()
        self._owner: list[tuple[_Request, int] | None] = [None] * rows
        self._position = np.zeros(rows, np.int64)
        """Host mirror of each row's `position` (where its last token is fed next)."""
        self._limit = np.zeros(rows, np.int64)
        """prompt + max_tokens - 1: one past the last position a row ever feeds."""
        self._finish = np.zeros(rows, bool)
        """Rows the host ended (stop strings) that the device still decodes."""

    # ---- queries --------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self._queue) or any(owner is not None for owner in self._owner)

    @property
    def queued_rows(self) -> int:
        """Samples accepted but not yet in a decode row."""
        return sum(r.job.num_samples - r.admitted for r in self._queue)

    @property
    def cache_length(self) -> int:
        return 0 if self._state is None else self._state.caches.k.shape[2]

    def _live_requests(self) -> list[_Request]:
        return [owner[0] for owner in self._owner if owner is not None]

    def pins_slot(self, slot: int) -> bool:
        """Whether an admitted request (decoding, or partly admitted) reads `slot`, which must
        then not be parked or reused."""
        return any(r.slot == slot for r in (*self._live_requests(), *self._queue))

    def uses_adapter(self, adapter: int) -> bool:
        """Whether a queued or running request reads `adapter` (it must not be released)."""
        return any(r.job.adapter == adapter for r in (*self._live_requests(), *self._queue))

    # ---- driving --------------------------------------------------------------------------

    def submit(self, job: SampleJob) -> None:
        """Queue a request; raises InputError (and queues nothing) if its controls do not fit."""
        controls = _controls(job.params, job.seed)
        self._queue.append(_Request(job, controls, sequences=[_Sequence() for _ in range(job.num_samples)]))

    def step(self) -> None:
        """Admit what fits, decode one chunk, complete finished requests. A request that fails
        alone fails alone; on an error that loses the shared state every request in flight
        fails with it (the state is rebuilt) and the error is re-raised."""
        try:
            self._admit()
            if any(owner is not None for owner in self._owner):
                self._decode_chunk()
        except BaseException as exc:
            self._fail_all(exc)
            raise

    # ---- admission ------------------------------------------------------------------------

    def _admit(self) -> None:
        """Admit queued samples into the free rows; if their joint prefill fails, admit request
        by request, failing only the requests whose own prefill fails."""
        plan = self._plan()
        if not plan:
            return
        try:
            self._start(plan)
        except _StateLost:
            raise
        except Exception as exc:
            if len(plan) == 1:
                self._fail_request(plan[0].request, exc)
                return
            logger.warning("a joint prefill failed; admitting its %d requests one by one", len(plan), exc_info=True)
            for part in plan:
                try:
                    self._start([part])
                except _StateLost:
                    raise
                except Exception as exc:
                    self._fail_request(part.request, exc)

    def _plan(self) -> list[_Admit]:
        """Which queued samples take which free rows, in queue order; a request whose adapter
        cannot be made resident now waits (later requests may go first)."""
        free = [r for r, owner in enumerate(self._owner) if owner is None]
        plan: list[_Admit] = []
        keep = {r.job.adapter for r in (*self._live_requests(), *self._queue) if r.slot is not None}
        for request in self._queue:
            if not free:
                break
            if request.slot is None:
                resolved = self._resolve(request.job.adapter, keep)
                if resolved is None:
                    continue
                request.slot, request.scales = resolved
            keep.add(request.job.adapter)
            take = min(request.job.num_samples - request.admitted, len(free))
            plan.append(_Admit(request, request.admitted, free[:take]))
            free = free[take:]
        return plan

    def _start(self, plan: list[_Admit]) -> None:
        """Prefill the planned samples and move them into their rows. Nothing changes if the
        prefill fails; a failure after it raises `_StateLost`."""
        requests = [part.request for part in plan]
        scored = [r for r in requests if r.admitted == 0 and r.scores_prompt]
        adm = self._admission(plan)
        topk = max((r.job.topk_prompt_logprobs for r in scored), default=0)
        base, lora = self._params()
        pre = sampler.prefill(
            self._graphdef,
            base,
            lora,
            adm,
            score_prompt=bool(scored),
            topk_prompt=min(batch_bucket(topk), self._config.vocab_size) if topk else 0,
        )
        tokens, logprobs, done, scores = jax.device_get(
            (pre.token, pre.logprob, pre.done, (pre.prompt_logprobs, pre.topk_ids, pre.topk_logprobs))
        )
        entries = [(part.request, part.first + i, row) for part in plan for i, row in enumerate(part.rows)]
        for request, _, row in entries:
            self._position[row] = request.job.prompt.size
            self._limit[row] = request.job.prompt.size + request.job.params.max_tokens - 1
        try:
            self._ensure_length(max(adm.prompts.shape[1], self._needed_length(row for _, _, row in entries)))
            self._state = sampler.insert(self._require_state(), adm, pre)
        except Exception as exc:
            raise _StateLost(str(exc)) from exc
        for part in plan:
            part.request.admitted += len(part.rows)
            part.request.open += len(part.rows)
        while self._queue and self._queue[0].admitted == self._queue[0].job.num_samples:
            self._queue.popleft()
        for request, index, row in entries:
            self._owner[row] = (request, index)
            self._finish[row] = False
        for request in scored:
            self._keep_prompt_scores(request, requests.index(request), scores)
        for e, (_, _, row) in enumerate(entries):
            self._extend(row, [int(tokens[e])], [float(logprobs[e])], bool(done[e]))

    def _admission(self, plan: list[_Admit]) -> sampler.Admission:
        requests = [part.request for part in plan]
        u = batch_bucket(len(requests))
        width = bucket(max(r.job.prompt.size for r in requests))
        prompts = np.zeros((u, width), np.int32)
        prompt_len = np.ones(u, np.int32)
        prompt_slots = np.zeros(u, np.int32)
        prompt_scales = np.zeros((u, 3), np.float32)
        for i, request in enumerate(requests):
            n = request.job.prompt.size
            prompts[i, :n] = request.job.prompt
            prompt_len[i] = n
            prompt_slots[i] = request.slot
            prompt_scales[i] = request.scales
        r = self.rows
        source = np.zeros(r, np.int32)
        rows = np.full(r, r, np.int32)
        temperature = np.zeros(r, np.float32)
        top_k = np.zeros(r, np.int32)
        top_p = np.ones(r, np.float32)
        seeds = np.zeros((r, 2), np.uint32)
        sample_index = np.zeros(r, np.int32)
        max_tokens = np.zeros(r, np.int32)
        stop_ids = np.full((r, sampler.MAX_STOP_IDS), -1, np.int32)
        e = 0
        for u_index, part in enumerate(plan):
            c = part.request.controls
            for i, row in enumerate(part.rows):
                source[e], rows[e], sample_index[e] = u_index, row, part.first + i
                temperature[e], top_k[e], top_p[e] = c.temperature, c.top_k, c.top_p
                seeds[e], max_tokens[e], stop_ids[e] = c.seed, c.max_tokens, c.stop_ids
                e += 1
        return sampler.Admission(
            prompts, prompt_len, prompt_slots, prompt_scales, source, rows, temperature, top_k, top_p, seeds,
            sample_index, max_tokens, stop_ids,
        )  # fmt: skip

    def _keep_prompt_scores(self, request: _Request, u: int, scores: tuple) -> None:
        lp, ids, top_lp = scores
        n, k = request.job.prompt.size, request.job.topk_prompt_logprobs
        if request.job.prompt_logprobs:
            request.prompt_logprobs = [float(x) for x in lp[u, :n]]
        if k > 0:
            request.topk_prompt_logprobs = [[]] + [
                [(int(t), float(v)) for t, v in zip(ids[u, p - 1, :k], top_lp[u, p - 1, :k], strict=True)]
                for p in range(1, n)
            ]

    # ---- decoding -------------------------------------------------------------------------

    def _live(self) -> list[int]:
        return [r for r, owner in enumerate(self._owner) if owner is not None]

    def _decode_chunk(self) -> None:
        live = self._live()
        self._ensure_length(self._needed_length())
        base, lora = self._params()
        self._state, tokens, logprobs = sampler.decode(
            self._graphdef,
            base,
            lora,
            self._require_state(),
            self._finish,
            steps=self.chunk,
            live_rows=self._live_rows(live[-1]),
        )
        tokens, logprobs, done = jax.device_get((tokens, logprobs, self._state.done))
        self._finish[:] = False
        for row in live:
            n = int((tokens[row] >= 0).sum())
            self._position[row] += n
            self._extend(row, tokens[row, :n].tolist(), logprobs[row, :n].tolist(), bool(done[row]))

    def _extend(self, row: int, tokens: list[int], logprobs: list[float], done: bool) -> None:
        """`_append`, failing the row's request alone if its host-side handling fails."""
        owner = self._owner[row]
        if owner is None:  # its request failed earlier in this pass
            return
        try:
            self._append(row, owner, tokens, logprobs, done)
        except Exception as exc:
            self._fail_request(owner[0], exc)

    def _append(self, row: int, owner: tuple[_Request, int], tokens: list[int], logprobs: list[float], done: bool) -> None:
        """Appends a row's new tokens; ends the row if the device finished it or a stop string
        appeared, and completes its request once all of that request's rows have ended."""
        request, index = owner
        seq = request.sequences[index]
        seq.tokens.extend(tokens)
        seq.logprobs.extend(logprobs)
        params = request.job.params
        end = self._stop_string_end(seq, params.stop_strings) if params.stop_strings else None
        if end is not None:
            del seq.tokens[end:], seq.logprobs[end:]
            seq.stop_reason = "stop"
        elif done:
            seq.stop_reason = "stop" if seq.tokens[-1] in params.stop_token_ids else "length"
        else:
            return
        self._owner[row] = None
        self._finish[row] = True
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

    def _live_rows(self, last: int) -> int:
        """How many leading rows a chunk computes: a power of 4 (or all rows) covering row `last`.
        Free rows are refilled lowest first, so live rows gather at the front."""
        n = 1
        while n <= last:
            n *= 4
        return min(n, self.rows)

    # ---- the cache length -----------------------------------------------------------------

    def _needed_length(self, extra: Iterable[int] = ()) -> int:
        """Cache positions the live rows (and rows about to be admitted) need for the next chunk."""
        return int(max(min(self._position[r] + self.chunk, self._limit[r]) for r in [*self._live(), *extra]))

    def _ensure_length(self, needed: int) -> None:
        """Grows the cache to hold `needed` positions, or shrinks it when at most half is needed."""
        target = min(bucket(needed, minimum=MIN_CACHE_LENGTH), self.max_length)
        current = self.cache_length
        if current == 0:
            self._state = self._new_state(target)
        elif target > current or 2 * target <= current:
            self._state = sampler.resize(self._require_state(), target)

    def _new_state(self, length: int) -> sampler.DecodeState:
        cfg = self._config
        build = functools.partial(
            sampler.init_state, cfg.num_layers, self.rows, length, cfg.num_kv_heads, cfg.head_dim, self._dtype
        )
        # Built in place (never moved), so it also works when the devices span several processes.
        return build() if self._placement is None else jax.jit(build, out_shardings=self._placement)()

    def _require_state(self) -> sampler.DecodeState:
        assert self._state is not None
        return self._state

    # ---- completion -----------------------------------------------------------------------

    def _complete(self, request: _Request) -> None:
        result = SampleResult(
            sequences=[
                SampledSequence(tokens=s.tokens, logprobs=s.logprobs, stop_reason=s.stop_reason)  # type: ignore[arg-type]
                for s in request.sequences
            ],
            prompt_logprobs=request.prompt_logprobs,
            topk_prompt_logprobs=request.topk_prompt_logprobs,
        )
        _notify(request.job, result, None)

    def _fail_request(self, request: _Request, exc: BaseException) -> None:
        """End one request with `exc`: out of the queue, its rows freed; the others go on."""
        logger.warning("a sample request failed on its own: %s", exc)
        if request in self._queue:
            self._queue.remove(request)
        for row, owner in enumerate(self._owner):
            if owner is not None and owner[0] is request:
                self._owner[row] = None
                self._finish[row] = True
        _notify(request.job, None, exc)

    def _fail_all(self, exc: BaseException) -> None:
        failed = list(self._queue)
        for owner in self._owner:
            if owner is not None and owner[0] not in failed:
                failed.append(owner[0])
        self._queue.clear()
        self._owner = [None] * self.rows
        self._finish[:] = False
        self._state = None
        for request in failed:
            _notify(request.job, None, exc)


class _StateLost(RuntimeError):
    """The shared decode state may be gone (a donated call failed): every request fails."""


@dataclass
class _Admit:
    """Samples `first`, `first + 1`, ... of `request` entering `rows`."""

    request: _Request
    first: int
    rows: list[int]


def _notify(job: SampleJob, result: SampleResult | None, exc: BaseException | None) -> None:
    try:
        job.on_done(result, exc)
    except Exception:
        logger.exception("a sample completion callback failed")

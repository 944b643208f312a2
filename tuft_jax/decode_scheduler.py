"""Continuous batching: sample requests of many samplers and adapters share R decode rows.

Each sample of a request occupies one row from admission until its sequence ends; the row is
then free for the next queued sample at once. One `step()` admits queued samples into the
free rows (a jitted prefill that draws their first tokens), then runs one jitted decode chunk
of up to `chunk` tokens over all rows, and hands every finished request to its callback.
Stop token ids and budgets end rows on the device; stop strings are checked here, on the
decoded text, and end the row at the token that completes the string.

Pure host logic over `tuft_jax.sampler`; it is driven by one thread (the engine's owner).
"""

from __future__ import annotations

import functools

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Sharding

from tuft_jax import sampler
from tuft_jax.batching import batch_bucket, bucket
from tuft_jax.models.decoder import DecoderConfig
from tuft_jax.types import SampledSequence, SampleResult, SamplingParams

logger = logging.getLogger(__name__)

MIN_CACHE_LENGTH = 128
"""The decode cache never shrinks below this many positions (fewer resizes and compiles)."""

OnDone = Callable[[SampleResult | None, BaseException | None], None]


@dataclass
class SampleJob:
    """One sample request as the engine accepted it."""

    slot: int
    scales: np.ndarray
    """The slot's LoRA scale per target group ([3])."""
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


@dataclass(eq=False)
class _Request:
    job: SampleJob
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
        *,
        rows: int,
        chunk: int,
        max_length: int,
        placement: Sharding | None = None,
    ) -> None:
        """`params()` returns the current (base, lora) states: read at every call, so training
        between chunks is seen by the next chunk (samplers use frozen snapshot slots)."""
        self._graphdef = graphdef
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
        return 0 if self._state is None else self._state.caches[0].k.shape[1]

    def uses_slot(self, slot: int) -> bool:
        return any(r.job.slot == slot for r in self._queue) or any(
            owner is not None and owner[0].job.slot == slot for owner in self._owner
        )

    # ---- driving --------------------------------------------------------------------------

    def submit(self, job: SampleJob) -> None:
        self._queue.append(_Request(job, sequences=[_Sequence() for _ in range(job.num_samples)]))

    def step(self) -> None:
        """Admit what fits, decode one chunk, complete finished requests. On a device error every
        request in flight fails with it (the state is rebuilt) and the error is re-raised."""
        try:
            self._admit()
            if any(owner is not None for owner in self._owner):
                self._decode_chunk()
        except BaseException as exc:
            self._fail_all(exc)
            raise

    # ---- admission ------------------------------------------------------------------------

    def _admit(self) -> None:
        free = [r for r, owner in enumerate(self._owner) if owner is None]
        if not free or not self._queue:
            return
        entries: list[tuple[_Request, int, int]] = []  # (request, sample index, row)
        requests: list[_Request] = []
        scored: list[_Request] = []
        for request in self._queue:
            take = min(request.job.num_samples - request.admitted, len(free) - len(entries))
            if take <= 0:
                break
            if request.admitted == 0 and request.scores_prompt:
                scored.append(request)
            requests.append(request)
            for i in range(request.admitted, request.admitted + take):
                entries.append((request, i, free[len(entries)]))
            request.admitted += take
            request.open += take
        while self._queue and self._queue[0].admitted == self._queue[0].job.num_samples:
            self._queue.popleft()
        for request, index, row in entries:
            self._owner[row] = (request, index)
            self._finish[row] = False
            self._position[row] = request.job.prompt.size
            self._limit[row] = request.job.prompt.size + request.job.params.max_tokens - 1

        adm = self._admission(requests, entries)
        self._ensure_length(max(adm.prompts.shape[1], self._needed_length()))
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
        self._state = sampler.insert(self._require_state(), adm, pre)
        tokens, logprobs, done, scores = jax.device_get(
            (pre.token, pre.logprob, pre.done, (pre.prompt_logprobs, pre.topk_ids, pre.topk_logprobs))
        )
        for request in scored:
            self._keep_prompt_scores(request, requests.index(request), scores)
        for e, (_, _, row) in enumerate(entries):
            self._extend(row, [int(tokens[e])], [float(logprobs[e])], bool(done[e]))

    def _admission(self, requests: list[_Request], entries: list[tuple[_Request, int, int]]) -> sampler.Admission:
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
            prompt_slots[i] = request.job.slot
            prompt_scales[i] = request.job.scales
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
        for e, (request, index, row) in enumerate(entries):
            params = request.job.params
            seed = request.job.seed % (1 << 64)
            source[e] = requests.index(request)
            rows[e] = row
            temperature[e] = params.temperature
            top_k[e] = params.top_k
            top_p[e] = params.top_p
            seeds[e] = (seed & 0xFFFFFFFF, seed >> 32)
            sample_index[e] = index
            max_tokens[e] = params.max_tokens
            stop_ids[e, : len(params.stop_token_ids)] = params.stop_token_ids
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
        """Appends a row's new tokens; ends the row if the device finished it or a stop string
        appeared, and completes its request once all of that request's rows have ended."""
        owner = self._owner[row]
        assert owner is not None
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

    def _needed_length(self) -> int:
        """Cache positions the live rows need for the next chunk."""
        return int(max(min(self._position[r] + self.chunk, self._limit[r]) for r in self._live()))

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


def _notify(job: SampleJob, result: SampleResult | None, exc: BaseException | None) -> None:
    try:
        job.on_done(result, exc)
    except Exception:
        logger.exception("a sample completion callback failed")

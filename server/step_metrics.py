"""Per-step training metrics, recorded for the dashboard's curves.

A step is one optim_step of a run; each forward_backward counts towards the step it precedes.
The wrappers here time the engine call and number the step on the engine's worker thread,
where a model's calls run one at a time in order, and write the store on the event loop once
the call has succeeded. `curves` turns a run's records into one series per metric.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from server.engine_api import EngineAPI
from server.runtime import LiveModel
from server.service import Service, then
from server.sessions import utc_now
from server.store import StepMetricsRecord
from server.wire.types import OptimStepResponse
from server.worker import ForwardBackwardItem
from tuft_jax.types import AdamParams, Datum, ForwardResult

logger = logging.getLogger(__name__)

T = TypeVar("T")

FORWARD_BACKWARD = "forward_backward"
OPTIM_STEP = "optim_step"

TOKENS = "tokens"
"""Input tokens of the step's forward_backward calls."""
WEIGHTED_TOKENS = "weighted_tokens"
"""Target tokens with a nonzero loss weight: what `loss:sum` is a sum over."""
SECONDS = "seconds"
LEARNING_RATE = "learning_rate"
LOSS_PER_TOKEN = "loss_per_token"
STEP_SECONDS = "step_seconds"


@dataclass
class _Measured:
    """Filled on the worker thread; read on the event loop after the call's future resolves."""

    step: int = 0
    started: float = 0.0
    seconds: float = 0.0
    metrics: dict[str, float] | None = None


def forward_backward(
    service: Service, model: LiveModel, item: ForwardBackwardItem[T]
) -> Callable[[], asyncio.Future[Any]]:
    """Queue `item` on the model's worker, recording its metrics once it succeeds (forward-only
    calls train nothing and are not recorded). The engine call is timed from the slot lookup,
    which the worker does just before calling the engine, to the result."""
    worker = service.workers[model.base_model]
    if item.forward_only:
        return lambda: worker.forward_backward(item)
    measured = _Measured()
    counts = {TOKENS: float(sum(len(d.tokens) for d in item.data)), WEIGHTED_TOKENS: float(_weighted_tokens(item.data))}

    def slot() -> int:
        measured.started = time.perf_counter()
        return item.slot()

    def finish(result: ForwardResult) -> T:
        measured.seconds = time.perf_counter() - measured.started
        measured.step, measured.metrics = model.optim_steps + 1, result.metrics
        return item.finish(result)

    def record(reply: T) -> T:
        metrics = {**(measured.metrics or {}), **counts, SECONDS: measured.seconds}
        _store(service, model.model_id, measured.step, FORWARD_BACKWARD, metrics)
        return reply

    timed = replace(item, slot=slot, finish=finish)
    return lambda: then(worker.forward_backward(timed), record)


def optim_step(
    service: Service, model: LiveModel, params: AdamParams, run: Callable[[EngineAPI], OptimStepResponse]
) -> Callable[[], asyncio.Future[Any]]:
    """Queue `run` (the optimizer step) on the model's worker, counting and recording the step
    once it succeeds."""
    measured = _Measured()

    def timed(engine: EngineAPI) -> OptimStepResponse:
        started = time.perf_counter()
        reply = run(engine)
        measured.seconds = time.perf_counter() - started
        model.optim_steps += 1
        measured.step = model.optim_steps
        return reply

    def record(reply: OptimStepResponse) -> OptimStepResponse:
        metrics = {**(reply.metrics or {}), LEARNING_RATE: params.learning_rate, SECONDS: measured.seconds}
        _store(service, model.model_id, measured.step, OPTIM_STEP, metrics)
        return reply

    return lambda: then(service.workers[model.base_model].call(timed), record)


def _weighted_tokens(data: list[Datum]) -> int:
    """Targets with a nonzero weight; without weights every target counts."""
    total = 0
    for datum in data:
        weights = datum.loss_inputs.get("weights")
        total += len(datum.tokens) if weights is None else int(np.count_nonzero(weights))
    return total


def _store(service: Service, model_id: str, step: int, kind: str, metrics: dict[str, float]) -> None:
    """Metrics are for display: a failed write is logged, never turned into a failed call."""
    try:
        service.store.add_step_metrics(model_id, step, kind, metrics, utc_now())
    except Exception:
        logger.exception("recording the %s metrics of %s failed", kind, model_id)


def curves(records: list[StepMetricsRecord]) -> dict[str, Any]:
    """`{"steps": [...], "series": {name: [value or None per step]}}` over the steps whose
    optim_step has run. Per step the forward_backward figures are combined (`:sum` metrics,
    token counts and seconds add up; other metrics are averaged), `loss_per_token` is
    `loss:sum` over the weighted tokens and `step_seconds` the time of all the step's engine calls."""
    passes: dict[int, list[dict[str, float]]] = defaultdict(list)
    optimizer: dict[int, dict[str, float]] = {}
    for record in records:
        if record.kind == OPTIM_STEP:
            optimizer[record.step] = record.metrics
        elif record.kind == FORWARD_BACKWARD:
            passes[record.step].append(record.metrics)
    steps = sorted(optimizer)
    rows = [_step_row(passes.get(step, []), optimizer[step]) for step in steps]
    names = sorted({name for row in rows for name in row})
    return {"steps": steps, "series": {name: [row.get(name) for row in rows] for name in names}}


def _step_row(passes: list[dict[str, float]], optimizer: dict[str, float]) -> dict[str, float]:
    row: dict[str, float] = {}
    for name in sorted({name for metrics in passes for name in metrics}):
        values = [m[name] for m in passes if name in m]
        additive = name.endswith(":sum") or name in (TOKENS, WEIGHTED_TOKENS, SECONDS)
        row[name] = float(sum(values)) if additive else float(np.mean(values))
    if row.get(WEIGHTED_TOKENS) and "loss:sum" in row:
        row[LOSS_PER_TOKEN] = row["loss:sum"] / row[WEIGHTED_TOKENS]
    row[STEP_SECONDS] = row.pop(SECONDS, 0.0) + optimizer.get(SECONDS, 0.0)
    row.update({name: value for name, value in optimizer.items() if name != SECONDS})
    return row

"""Prometheus metrics: queue depth, engine step time, tokens/s, XLA compile count and the
sampler's KV cache (blocks used / idle in the prefix cache / free, bytes per block, prefix-cache
hits, preemptions).

Engine workers report each finished call; queue depths and KV figures are read when scraped. The text format
is Prometheus' exposition format 0.0.4, served unauthenticated at `/metrics` like `/healthz`.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from tuft_jax.types import KVCacheStats

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._step_seconds: dict[tuple[str, str], float] = defaultdict(float)
        self._steps: dict[tuple[str, str], int] = defaultdict(int)
        self._tokens: dict[tuple[str, str], int] = defaultdict(int)
        self._tokens_per_s: dict[tuple[str, str], float] = {}
        self._compiles = 0
        self._compile_seconds = 0.0
        self._queue_depths: dict[str, Callable[[], int]] = {}
        self._kv_stats: dict[str, Callable[[], KVCacheStats]] = {}
        jax.monitoring.register_event_duration_secs_listener(self._on_jax_event)

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_jax_event)

    def _on_jax_event(self, event: str, duration: float, **_: object) -> None:
        if event == _COMPILE_EVENT:
            with self._lock:
                self._compiles += 1
                self._compile_seconds += duration

    def watch_queue(self, base_model: str, depth: Callable[[], int]) -> None:
        self._queue_depths[base_model] = depth

    def watch_kv_cache(self, base_model: str, stats: Callable[[], KVCacheStats]) -> None:
        self._kv_stats[base_model] = stats

    def record_call(self, base_model: str, kind: str, seconds: float, tokens: int) -> None:
        """One finished engine call of `kind` (forward_backward, optim_step, sample, ...)."""
        key = (base_model, kind)
        with self._lock:
            self._step_seconds[key] += seconds
            self._steps[key] += 1
            self._tokens[key] += tokens
            if tokens and seconds > 0:
                self._tokens_per_s[key] = tokens / seconds

    def snapshot(self) -> dict[str, Any]:
        """The figures `render` exposes, as JSON-ready values (for the dashboard's health panel)."""
        with self._lock:
            models = {
                name: {
                    "queue_depth": depth(),
                    "tokens_per_second": {k: v for (m, k), v in sorted(self._tokens_per_s.items()) if m == name},
                    "calls": {k: v for (m, k), v in sorted(self._steps.items()) if m == name},
                    "kv": dataclasses.asdict(self._kv_stats[name]()) if name in self._kv_stats else None,
                }
                for name, depth in sorted(self._queue_depths.items())
            }
            return {"xla_compiles": self._compiles, "xla_compile_seconds": self._compile_seconds, "models": models}

    def render(self) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value}" for labels, value in samples)

        def labelled(values: dict[tuple[str, str], float]) -> list[tuple[str, float]]:
            return [(f'{{base_model="{m}",call="{k}"}}', v) for (m, k), v in sorted(values.items())]

        with self._lock:
            queue = [(f'{{base_model="{m}"}}', float(depth())) for m, depth in sorted(self._queue_depths.items())]
            family("tuft_queue_depth", "gauge", "Engine calls waiting for the engine worker.", queue)
            family("tuft_engine_call_seconds_total", "counter", "Time spent in engine calls.", labelled(self._step_seconds))
            family("tuft_engine_calls_total", "counter", "Finished engine calls.", labelled(self._steps))
            family("tuft_tokens_total", "counter", "Tokens processed (trained or sampled).", labelled(self._tokens))
            family("tuft_tokens_per_second", "gauge", "Throughput of the latest engine call.", labelled(self._tokens_per_s))
            family("tuft_xla_compiles_total", "counter", "XLA compilations in this process.", [("", float(self._compiles))])
            family(
                "tuft_xla_compile_seconds_total", "counter", "Time spent compiling.", [("", self._compile_seconds)]
            )
            kv = {m: stats() for m, stats in sorted(self._kv_stats.items())}
            blocks = [
                (f'{{base_model="{m}",state="{state}"}}', float(getattr(k, state)))
                for m, k in kv.items()
                for state in ("used", "cached_idle", "free")
            ]
            family("tuft_kv_blocks", "gauge", "KV cache blocks by state (scratch excluded).", blocks)

            def per_model(field: str) -> list[tuple[str, float]]:
                return [(f'{{base_model="{m}"}}', float(getattr(k, field))) for m, k in kv.items()]

            family("tuft_kv_block_bytes", "gauge", "Device bytes of one KV block (all layers).", per_model("bytes_per_block"))
            family("tuft_kv_prefix_hit_blocks_total", "counter", "Prompt blocks reused from the prefix cache.", per_model("prefix_hits"))
            family("tuft_kv_prefix_lookup_blocks_total", "counter", "Full prompt blocks looked up.", per_model("prefix_lookups"))
            family("tuft_kv_preemptions_total", "counter", "Sequences preempted when KV blocks ran out.", per_model("preemptions"))
        return "\n".join(lines) + "\n"


async def metrics_endpoint(request: Request) -> Response:
    metrics: Metrics = request.app.state.service.metrics
    return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")


routes = [Route("/metrics", metrics_endpoint, methods=["GET"])]

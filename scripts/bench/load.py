"""Concurrent-tenant load: N Tinker SDK clients, each its own API key and session, run a short
training-and-sampling flow at once against a server on this machine, and the script reports
what completed, what failed, and each call's latency.

Each client: create a LoRA run, `--steps` x (forward_backward + optim_step),
save_weights_for_sampler, then a greedy sample from the saved weights. Clients i and
i + N/2 train on the same datum from the same seed, so their losses and sampled tokens must
agree: a result lost, duplicated or delivered to the wrong run shows up as a disagreement.

Bounded: loopback servers only, at most 256 clients, and the whole run stops itself after
`--timeout` seconds. Usage (start the server first, e.g. `scripts/serve.sh --port 8080`):
    python scripts/bench/load.py --url http://127.0.0.1:8080 --clients 50
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlparse

import numpy as np

T = TypeVar("T")
MAX_CLIENTS = 256


@dataclass
class ClientRun:
    """What one client saw: per-call latencies, its losses and sampled tokens, or its error."""

    index: int
    latencies: dict[str, list[float]] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    error: str | None = None
    failed_call: str | None = None


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"refusing to load {url}: only servers on this machine (loopback) may be targeted")


def datum_tokens(pair: int) -> list[int]:
    return np.random.default_rng(pair).integers(1, 400, size=12 + pair % 7).tolist()


def run_client(url: str, model: str, index: int, pairs: int, steps: int) -> ClientRun:
    import tinker
    from tinker import types

    run = ClientRun(index)
    pair = index % pairs

    def timed(call: str, fn: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            value = fn()
        except Exception:
            run.failed_call = call
            raise
        run.latencies.setdefault(call, []).append(time.perf_counter() - started)
        return value

    service = tinker.ServiceClient(base_url=url, api_key=f"tml-load-{index}")
    try:
        training = timed("create_model", lambda: service.create_lora_training_client(base_model=model, rank=4, seed=pair))
        tokens = datum_tokens(pair)
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
        )
        for _ in range(steps):
            result = timed("forward_backward", lambda: training.forward_backward([datum], "cross_entropy").result())
            if len(result.loss_fn_outputs) != 1 or len(result.loss_fn_outputs[0]["logprobs"].tolist()) != len(tokens) - 1:
                raise RuntimeError("forward_backward returned outputs of another request")
            run.losses.append(result.metrics["loss:sum"])
            timed("optim_step", lambda: training.optim_step(types.AdamParams(learning_rate=1e-2)).result())
        path = timed("save_weights_for_sampler", lambda: training.save_weights_for_sampler(f"load-{index}").result().path)
        sampler = timed("create_sampling_client", lambda: service.create_sampling_client(model_path=path).result())
        params = types.SamplingParams(max_tokens=8, temperature=0.0)
        prompt = types.ModelInput.from_ints(tokens[:4])
        sample = timed("sample", lambda: sampler.sample(prompt=prompt, num_samples=1, sampling_params=params).result())
        run.tokens = list(sample.sequences[0].tokens)
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        service.close("success")
    return run


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(runs: list[ClientRun], pairs: int, wall_s: float) -> dict[str, Any]:
    calls: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        for call, latencies in run.latencies.items():
            calls[call].extend(latencies)
    by_index = {run.index: run for run in runs}
    disagreements = []
    for run in runs:
        twin = by_index.get(run.index + pairs)
        if twin is None or run.error or twin.error:
            continue
        close = np.allclose(run.losses, twin.losses, rtol=1e-3, atol=1e-4)
        if not close or run.tokens != twin.tokens:
            disagreements.append([run.index, twin.index])
    return {
        "clients": len(runs),
        "clients_completed": sum(run.error is None for run in runs),
        "clients_failed": sum(run.error is not None for run in runs),
        "calls_completed": sum(len(v) for v in calls.values()),
        "calls_failed": sum(run.failed_call is not None for run in runs),
        "errors": sorted({run.error for run in runs if run.error})[:10],
        "twin_disagreements": disagreements,
        "wall_s": round(wall_s, 2),
        "latency_s": {
            call: {"n": len(v), "p50": round(percentile(v, 50), 3), "p99": round(percentile(v, 99), 3)}
            for call, v in sorted(calls.items())
        },
        "loadavg": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="a loopback server, e.g. http://127.0.0.1:8080")
    parser.add_argument("--model", default="tuft/tiny-qwen3")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900.0, help="the run stops itself after this many seconds")
    parser.add_argument("--details", action="store_true", help="include every client's losses and tokens")
    args = parser.parse_args(argv)
    require_loopback(args.url)
    if not 2 <= args.clients <= MAX_CLIENTS or args.clients % 2:
        raise SystemExit(f"--clients must be an even number between 2 and {MAX_CLIENTS}")
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    pairs = args.clients // 2
    started = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=args.clients)
    futures = [pool.submit(run_client, args.url, args.model, i, pairs, args.steps) for i in range(args.clients)]
    done, pending = wait(futures, timeout=args.timeout)
    runs = [f.result() for f in futures if f in done]
    runs += [ClientRun(i, error="TimeoutError: still running when the run's time was up") for i, f in enumerate(futures) if f in pending]
    report = summarize(sorted(runs, key=lambda r: r.index), pairs, time.perf_counter() - started)
    if args.details:
        report["runs"] = [asdict(run) for run in runs]
    print(json.dumps(report, indent=2), flush=True)
    if pending:  # stop the stuck clients' threads with the process
        os._exit(1)
    pool.shutdown()
    sys.exit(0 if report["clients_failed"] == 0 and not report["twin_disagreements"] else 1)


if __name__ == "__main__":
    main()

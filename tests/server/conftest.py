"""Shared fixtures for the HTTP service tests: a numpy fake of the engine contract and clients."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from server.app import build_app
from server.config import ServerOptions
from tuft_jax.errors import CapacityError, InputError
from tuft_jax.types import (
    AdamParams,
    Datum,
    ForwardResult,
    KVCacheStats,
    LoraConfig,
    SampledSequence,
    SampleResult,
    SamplingParams,
)

BASE_MODEL = "fake/tiny"
VOCAB = 32
API_KEY = "tml-test-key"


class FakeEngine:
    """The engine contract in numpy: one scalar "weight" per adapter, a loss that depends on it.

    `logprobs` of every target is `-(1 + weight)`; cross_entropy's loss is `-(lp * weights).sum()`
    and its gradient w.r.t. the weight is `weights.sum()`. `gate`, when set, blocks every call
    until it is released, so tests can queue work behind a busy engine.
    """

    def __init__(self, name: str = BASE_MODEL, max_adapters: int = 4, max_rank: int = 16) -> None:
        self.name = name
        self.tokenizer_path = f"/tokenizers/{name}"
        self.vocab_size = VOCAB
        self.max_context_length = 64
        self.eos_token_id = 2
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.max_lora_rank = max_rank
        self.adapters: dict[int, dict[str, Any]] = {}
        self.forward_batches: list[list[int]] = []
        self.gate: threading.Event | None = None
        self.sample_queue: deque[tuple[Callable[[], SampleResult], int, Callable[..., None]]] = deque()

    def _wait(self) -> None:
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never released"

    def _allocate(self, lora: LoraConfig, weight: float = 0.0) -> int:
        free = [s for s in range(1, self.max_adapters + 1) if s not in self.adapters]
        if not free:
            raise CapacityError("no free adapter slot")
        self.adapters[free[0]] = {"lora": lora, "weight": weight, "grad": 0.0}
        return free[0]

    def _adapter(self, slot: int) -> dict[str, Any]:
        if slot not in self.adapters:
            raise InputError(f"no adapter in slot {slot}")
        return self.adapters[slot]

    def check_forward_backward(
        self, data: list[Datum], loss_fn: str, loss_config: dict[str, float | str]
    ) -> dict[str, float]:
        if loss_fn != "cross_entropy":
            raise InputError(f"unknown loss_fn {loss_fn!r}")
        for i, datum in enumerate(data):
            if "target_tokens" not in datum.loss_inputs:
                raise InputError(f"datum {i}: missing target_tokens")
            if datum.tokens.max() >= self.vocab_size:
                raise InputError(f"datum {i}: token id out of range")
        return {key: float(value) for key, value in loss_config.items()}

    def create_adapter(self, lora: LoraConfig) -> int:
        self._wait()
        if lora.rank > self.max_rank:
            raise InputError(f"rank {lora.rank} exceeds {self.max_rank}")
        return self._allocate(lora)

    def release_adapter(self, slot: int) -> None:
        self.adapters.pop(slot, None)

    def forward_backward(
        self, batch: list[tuple[int, list[Datum]]], loss_fn: str, loss_config: dict[str, float], forward_only: bool
    ) -> list[ForwardResult]:
        self._wait()
        self.forward_batches.append([slot for slot, _ in batch])
        results = []
        for slot, data in batch:
            adapter = self._adapter(slot)
            outputs, loss = [], 0.0
            for datum in data:
                weights = datum.loss_inputs.get("weights", np.ones(len(datum.tokens), np.float32))
                logprobs = np.full(len(datum.tokens), -(1.0 + adapter["weight"]), np.float32)
                loss += float(-(logprobs * weights).sum())
                if not forward_only:
                    adapter["grad"] += float(weights.sum())
                outputs.append({"logprobs": logprobs})
            results.append(ForwardResult(outputs=outputs, metrics={"loss:sum": loss}))
        return results

    def optim_step(self, slot: int, params: AdamParams) -> dict[str, float]:
        self._wait()
        adapter = self._adapter(slot)
        grad, adapter["grad"] = adapter["grad"], 0.0
        adapter["weight"] -= params.learning_rate * grad
        return {"grad_norm:mean": abs(grad)}

    def snapshot_adapter(self, slot: int) -> int:
        adapter = self._adapter(slot)
        return self._allocate(adapter["lora"], adapter["weight"])

    def save_adapter(self, slot: int, directory: Path, *, with_optimizer: bool) -> int:
        self._wait()
        adapter = self._adapter(slot)
        if directory.exists():
            raise InputError(f"checkpoint {directory.name!r} already exists")
        directory.mkdir(parents=True)
        meta = {
            "base_model": self.name,
            "rank": adapter["lora"].rank,
            "weight": adapter["weight"],
            "has_optimizer": with_optimizer,
        }
        (directory / "adapter.json").write_text(json.dumps(meta))
        return (directory / "adapter.json").stat().st_size

    def load_adapter(self, directory: Path, *, with_optimizer: bool) -> int:
        self._wait()
        meta_file = directory / "adapter.json"
        if not meta_file.is_file():
            raise InputError(f"{directory.name!r} is not a checkpoint")
        meta = json.loads(meta_file.read_text())
        if meta["base_model"] != self.name:
            raise InputError(f"checkpoint was trained on {meta['base_model']!r}")
        if with_optimizer and not meta["has_optimizer"]:
            raise InputError("checkpoint has no optimizer state")
        return self._allocate(LoraConfig(rank=meta["rank"]), meta["weight"])

    def export_peft(self, slot: int, directory: Path) -> int:
        adapter = self._adapter(slot)
        directory.mkdir(parents=True)
        config = {"peft_type": "LORA", "r": adapter["lora"].rank, "base_model_name_or_path": self.name}
        (directory / "adapter_config.json").write_text(json.dumps(config))
        (directory / "adapter_model.safetensors").write_bytes(np.float32(adapter["weight"]).tobytes())
        return sum(f.stat().st_size for f in directory.iterdir())

    def adapter_config(self, slot: int) -> LoraConfig:
        return self._adapter(slot)["lora"]

    def check_sample(
        self,
        prompt: np.ndarray,
        num_samples: int,
        params: SamplingParams,
        *,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
    ) -> None:
        if prompt.max() >= self.vocab_size:
            raise InputError("prompt token id out of range")
        if prompt.size + params.max_tokens > self.max_context_length:
            raise InputError("prompt + max_tokens exceeds the context")
        if num_samples < 1:
            raise InputError("num_samples must be at least 1")

    def sample(
        self,
        slot: int,
        prompt: np.ndarray,
        num_samples: int,
        params: SamplingParams,
        *,
        prompt_logprobs: bool,
        topk_prompt_logprobs: int,
        topk_sample_logprobs: int = 0,
    ) -> SampleResult:
        """Counts up from the last prompt token (mod the vocabulary), stopping at a stop token;
        each token's top alternatives are itself and the tokens after it."""
        self._wait()
        if slot != 0:
            self._adapter(slot)
        sequences = []
        for _ in range(num_samples):
            tokens: list[int] = []
            token = int(prompt[-1])
            stop_reason = "length"
            while len(tokens) < params.max_tokens:
                token = (token + 1) % self.vocab_size
                tokens.append(token)
                if token in params.stop_token_ids:
                    stop_reason = "stop"
                    break
            top = [[((t + i) % self.vocab_size, -0.5 - i) for i in range(topk_sample_logprobs)] for t in tokens]
            sequences.append(
                SampledSequence(
                    tokens=tokens,
                    logprobs=[-0.5] * len(tokens),
                    stop_reason=stop_reason,
                    topk_logprobs=top if topk_sample_logprobs else None,
                )
            )
        result = SampleResult(sequences=sequences)
        if prompt_logprobs:
            result.prompt_logprobs = [float("nan")] + [-1.0] * (prompt.size - 1)
        if topk_prompt_logprobs:
            result.topk_prompt_logprobs = [[]] + [[(1, -0.1)] * topk_prompt_logprobs] * (prompt.size - 1)
        return result

    def submit_sample(
        self,
        slot: int,
        prompt: np.ndarray,
        num_samples: int,
        params: SamplingParams,
        *,
        prompt_logprobs: bool,
        topk_prompt_logprobs: int,
        on_done: Callable[[SampleResult | None, BaseException | None], None],
        topk_sample_logprobs: int = 0,
    ) -> None:
        """Queued; each `step_sampling` completes the oldest request with `sample`."""
        run = lambda: self.sample(  # noqa: E731
            slot, prompt, num_samples, params, prompt_logprobs=prompt_logprobs, topk_prompt_logprobs=topk_prompt_logprobs,
            topk_sample_logprobs=topk_sample_logprobs,
        )  # fmt: skip
        self.sample_queue.append((run, num_samples, on_done))

    def step_sampling(self) -> None:
        run, _, on_done = self.sample_queue.popleft()
        try:
            result = run()
        except Exception as exc:
            on_done(None, exc)
            return
        on_done(result, None)

    def has_sampling_work(self) -> bool:
        return bool(self.sample_queue)

    def queued_sample_rows(self) -> int:
        return sum(n for _, n, _ in self.sample_queue)

    def kv_cache_stats(self) -> KVCacheStats:
        held = self.queued_sample_rows()
        return KVCacheStats(total=64, used=held, cached_idle=0, free=64 - held, bytes_per_block=1024, prefix_hits=0, prefix_lookups=0)


FAST_OPTIONS = ServerOptions(future_hold_s=2.0, session_timeout_s=60.0, sweep_interval_s=3600.0)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in model's tokenizer (with its chat template), saved as a tokenizer directory."""
    from tuft_jax.tiny_tokenizer import build_tiny_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture
def text_engine(tiny_tokenizer_dir: Path) -> FakeEngine:
    """The fake engine over the tiny tokenizer's vocabulary, for the routes that take text."""
    from transformers import AutoTokenizer

    engine = FakeEngine()
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    engine.tokenizer_path = str(tiny_tokenizer_dir)
    engine.vocab_size = len(tokenizer)
    engine.eos_token_id = tokenizer.eos_token_id
    engine.max_context_length = 256
    return engine


@pytest.fixture
def client(engine: FakeEngine, tmp_path: Path) -> Iterator[TestClient]:
    app = build_app({engine.name: engine}, tmp_path / "checkpoints", options=FAST_OPTIONS)
    with TestClient(app, headers={"X-API-Key": API_KEY}, raise_server_exceptions=False) as test_client:
        yield test_client


class Api:
    """Thin helpers over the test client for multi-step flows."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    def post(self, path: str, body: dict[str, Any]) -> Any:
        response = self.client.post(f"/api/v1/{path}", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def result(self, request_id: str) -> Any:
        """Poll a future until it is done: decoded JSON, or raw bytes for protobuf results."""
        for _ in range(20):
            response = self.client.post("/api/v1/retrieve_future", json={"request_id": request_id})
            assert response.status_code == 200, response.text
            if response.headers["content-type"] == "application/x-protobuf":
                return response.content
            body = response.json()
            if body.get("type") != "try_again":
                return body
        raise AssertionError(f"future {request_id} never completed")

    def session(self) -> str:
        return self.post("create_session", {"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"})["session_id"]

    def model(self, session_id: str, model_seq_id: int = 0, rank: int = 8) -> str:
        future = self.post(
            "create_model",
            {
                "session_id": session_id,
                "model_seq_id": model_seq_id,
                "base_model": BASE_MODEL,
                "lora_config": {"rank": rank},
                "type": "create_model",
            },
        )
        return self.result(future["request_id"])["model_id"]


@pytest.fixture
def api(client: TestClient) -> Api:
    return Api(client)


@pytest.fixture
def make_client(tmp_path: Path) -> Callable[..., TestClient]:
    """`make_client(engine, root=None, api_key=API_KEY, **option_overrides)`: a client for a new
    app on `root` (default `tmp_path/checkpoints`, shared with `client`), to enter with `with`.
    Two apps on one root are a server and the same server restarted."""

    def make(engine: FakeEngine, root: Path | None = None, *, api_key: str | None = API_KEY, **options: Any) -> TestClient:
        app = build_app(
            {engine.name: engine}, root or tmp_path / "checkpoints", options=dataclasses.replace(FAST_OPTIONS, **options)
        )
        headers = {"X-API-Key": api_key} if api_key else {}
        return TestClient(app, headers=headers, raise_server_exceptions=False)

    return make


@pytest.fixture
def make_api() -> type[Api]:
    return Api

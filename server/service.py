"""The service's shared state and the operations several route modules need."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from starlette.requests import Request

from server.auth import current_owner, visible_to_caller
from server.compat.checkpoint_adapters import CheckpointAdapters
from server.config import ServerOptions
from server.engine_api import EngineAPI
from server.errors import NotFound
from server.futures import FutureRegistry
from server.metrics import Metrics
from server.paths import CheckpointRef
from server.runtime import BASE_MODEL_SLOT, LiveModel, LiveSampler
from server.quotas import Quotas
from server.sequencer import Sequencer
from server.session_trace import SessionTraces
from server.sessions import Sessions, utc_now
from server.store import AuditEvent, CheckpointRecord, Store
from server.usage import UsageMeter
from server.url_signing import UrlSigner
from server.worker import EngineWorker
from tuft_jax.errors import InputError
from tuft_jax.types import LoraConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def then(
    outcome: asyncio.Future[T],
    finish: Callable[[T], R],
    on_error: Callable[[BaseException], None] | None = None,
) -> asyncio.Future[R]:
    """A future of `finish(result)`, run on the event loop once `outcome` succeeds."""
    chained: asyncio.Future[R] = asyncio.get_running_loop().create_future()

    def done(fut: asyncio.Future[T]) -> None:
        exc = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        if exc is not None:
            if on_error is not None:
                on_error(exc)
            chained.set_exception(exc)
            return
        try:
            chained.set_result(finish(fut.result()))
        except Exception as finish_exc:
            chained.set_exception(finish_exc)

    outcome.add_done_callback(done)
    return chained


@dataclass
class Service:
    engines: dict[str, EngineAPI]
    checkpoint_dir: Path
    options: ServerOptions
    store: Store
    futures: FutureRegistry
    sessions: Sessions
    metrics: Metrics
    url_signer: UrlSigner
    sequencer: Sequencer = field(default_factory=Sequencer)
    traces: SessionTraces = field(default_factory=SessionTraces)
    """What the sessions' requests did; the same object `futures` records into."""
    workers: dict[str, EngineWorker] = field(init=False)
    checkpoint_adapters: CheckpointAdapters = field(init=False)
    """Checkpoints loaded for the OpenAI- and Anthropic-compatible routes."""
    usage: UsageMeter = field(init=False)
    quotas: Quotas = field(init=False)
    models: dict[str, LiveModel] = field(default_factory=dict)
    samplers: dict[str, LiveSampler] = field(default_factory=dict)
    _session_owners: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workers = {
            name: EngineWorker(
                engine,
                max_batch_datums=self.options.max_batch_datums,
                max_queued_sample_rows=self.options.max_queued_sample_rows,
                metrics=self.metrics,
            )
            for name, engine in self.engines.items()
        }
        self.checkpoint_adapters = CheckpointAdapters(self.options.max_checkpoint_adapters, self.release_slot)
        self.usage = UsageMeter(self.store)
        self.quotas = Quotas(self.store, self.usage, cache_s=self.options.auth_cache_s)
        for name, worker in self.workers.items():
            self.metrics.watch_queue(name, worker.queue_depth)
            self.metrics.watch_kv_cache(name, worker.engine.kv_cache_stats)

    @staticmethod
    def of(request: Request) -> Service:
        return request.app.state.service

    # ---- lookups ---------------------------------------------------------------------------

    def engine(self, base_model: str) -> EngineAPI:
        engine = self.engines.get(base_model)
        if engine is None:
            raise InputError(f"unknown base model {base_model!r}; this server serves {', '.join(self.engines)}")
        return engine

    def session_owner(self, session_id: str) -> str | None:
        """Owner of a session (cached: it never changes), None if unknown."""
        owner = self._session_owners.get(session_id)
        if owner is None:
            record = self.store.get_session(session_id)
            if record is None:
                return None
            owner = self._session_owners[session_id] = record.owner
        return owner

    def _visible_session(self, session_id: str) -> bool:
        owner = self.session_owner(session_id)
        return owner is not None and visible_to_caller(owner)

    def model(self, model_id: str) -> LiveModel:
        """A loaded training model of the caller; another tenant's is a 404, like a missing one."""
        model = self.models.get(model_id)
        if model is None or not self._visible_session(model.session_id):
            raise NotFound(f"unknown model_id {model_id!r} (or its session has ended)")
        return model

    def sampler(self, sampler_id: str) -> LiveSampler:
        sampler = self.samplers.get(sampler_id)
        if sampler is None or not self._visible_session(sampler.session_id):
            raise NotFound(f"unknown sampling session {sampler_id!r} (or its session has ended)")
        return sampler

    def readable_checkpoint(self, ref: CheckpointRef) -> CheckpointRecord:
        """A checkpoint the caller may read: its own or a public one, and not expired."""
        record = self.store.get_checkpoint(ref)
        if record is None or record.expired(utc_now()) or not (record.public or visible_to_caller(record.owner)):
            raise NotFound(f"checkpoint {ref.tinker_path} does not exist")
        return record

    def owned_checkpoint(self, ref: CheckpointRef) -> CheckpointRecord:
        """A checkpoint the caller owns (to delete, publish, set its TTL): public ones included."""
        record = self.store.get_checkpoint(ref)
        if record is None or record.expired(utc_now()) or not visible_to_caller(record.owner):
            raise NotFound(f"checkpoint {ref.tinker_path} does not exist")
        return record

    def checkpoint_lora(self, record: CheckpointRecord) -> LoraConfig:
        """The adapter geometry a checkpoint was saved with (for records older than that field,
        its training run's)."""
        if record.lora is not None:
            return record.lora
        run = self.store.get_training_run(record.ref.model_id)
        if run is None:
            raise NotFound(f"checkpoint {record.ref.tinker_path} does not exist")
        return run.lora

    def url_expiry(self) -> int:
        """When a signed URL handed out now expires (epoch s)."""
        return int(time.time()) + self.options.download_url_s

    def signed_url(self, request: Request, path: str, expires: int) -> str:
        """A URL of `path` that a plain HTTP client may GET without a key until `expires`. It
        names `public_url`, or else the address `request` came to; the signature covers the
        canonical `path` alone, so the host or a proxy's prefix does not change it."""
        base = (self.options.public_url or str(request.base_url)).rstrip("/")
        return f"{base}{path}?{self.url_signer.query(path, expires)}"

    def checkpoint_directory(self, ref: CheckpointRef, purpose: str) -> Path:
        """The directory of a checkpoint the caller may read (404 otherwise); the read is
        audited in the checkpoint owner's log as `checkpoint_read` with `purpose`."""
        record = self.readable_checkpoint(ref)
        directory = ref.directory(self.checkpoint_dir)
        if not directory.is_dir():
            raise NotFound(f"checkpoint {ref.tinker_path} does not exist")
        self.audit_read(record, purpose)
        return directory

    def audit_read(self, record: CheckpointRecord, purpose: str) -> None:
        """`checkpoint_read` in the owner's log; `reader` is the caller's key id (None for a
        signed URL, which carries no key)."""
        details = {
            "tinker_path": record.ref.tinker_path,
            "model_id": record.ref.model_id,
            "purpose": purpose,
            "reader": current_owner(),
        }
        self.store.add_audit_event(AuditEvent(utc_now(), record.owner, "checkpoint_read", details))

    def running_runs(self, owner: str) -> int:
        """Training runs of `owner` alive on this server now (the concurrent-runs quota)."""
        return sum(1 for model in self.models.values() if self.session_owner(model.session_id) == owner)

    def engine_for_checkpoint(self, ref: CheckpointRef, requested: str | None) -> EngineAPI:
        """The engine a readable checkpoint loads on, after checking its recorded geometry (base
        model, LoRA rank) against what this server serves: a mismatch is a 400, not a failed load."""
        record = self.readable_checkpoint(ref)
        if ref.kind == "external_weights":
            raise InputError(
                f"{ref.tinker_path} is an external_weights export (a PEFT adapter for other tools) and cannot "
                "be loaded; load a weights or sampler_weights checkpoint"
            )
        trained_on = record.base_model
        if trained_on and trained_on not in self.engines:
            raise InputError(
                f"checkpoint {ref.tinker_path} was trained on {trained_on!r}, which this server does not serve "
                f"(it serves {', '.join(self.engines)})"
            )
        if requested is not None and trained_on and requested != trained_on:
            raise InputError(
                f"checkpoint {ref.tinker_path} was trained on {trained_on!r}; it cannot be loaded on {requested!r}"
            )
        name = requested or trained_on
        if not name:
            if len(self.engines) != 1:
                raise InputError(f"cannot tell which base model {ref.tinker_path} belongs to; pass base_model")
            name = next(iter(self.engines))
        engine = self.engine(name)
        if record.lora is not None and record.lora.rank > engine.max_lora_rank:
            raise InputError(
                f"checkpoint {ref.tinker_path} has LoRA rank {record.lora.rank}; {name!r} on this server "
                f"allows at most {engine.max_lora_rank}"
            )
        return engine

    # ---- lifecycle -------------------------------------------------------------------------

    def add_model(self, model: LiveModel) -> None:
        self.models[model.model_id] = model
        self.sequencer.add_model(model.model_id)

    def forget_model(self, model_id: str, reason: str) -> None:
        """Drop a model from routing; requests still waiting on its order fail with `reason`."""
        self.models.pop(model_id, None)
        for request_id in self.sequencer.remove_model(model_id):
            self.futures.fail(request_id, InputError(reason))

    def end_session(self, session_id: str, reason: str) -> None:
        """Finish a session and free the adapter slots of its models and samplers."""
        if not self.sessions.finish(session_id, reason):
            return
        for model in [m for m in self.models.values() if m.session_id == session_id]:
            self.forget_model(model.model_id, f"model {model.model_id!r} was released: its session ended")
            self.release_slot(model.base_model, lambda m=model: m.slot)
        for sampler in [s for s in self.samplers.values() if s.session_id == session_id]:
            del self.samplers[sampler.sampler_id]
            self.release_slot(sampler.base_model, lambda s=sampler: s.slot)

    def release_slot(self, base_model: str, slot: Callable[[], int | None]) -> None:
        """Free a slot after the jobs already queued for it; `slot` is read on the worker thread."""

        def release(engine: EngineAPI) -> None:
            current = slot()
            if current is not None and current != BASE_MODEL_SLOT:
                engine.release_adapter(current)

        self.workers[base_model].call(release).add_done_callback(_log_failure)

    def recover(self) -> None:
        """At startup: what a previous process left running is over. Its sessions are ended
        (their adapters are gone; heartbeats now get 410) and its pending futures fail."""
        ended = self.store.end_active_sessions("server_restarted")
        failed = self.futures.recover()
        if ended or failed:
            logger.info("after restart: ended %d stale sessions, failed %d unfinished requests", ended, failed)

    def sweep(self) -> None:
        """End sessions that stopped heartbeating and drop old results."""
        for session_id in self.sessions.expired():
            logger.info("session %s expired (no heartbeat)", session_id)
            self.end_session(session_id, "expired")
        self.futures.collect_garbage()
        self.usage.flush()

    def start(self) -> None:
        for worker in self.workers.values():
            worker.start()

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        self.usage.flush()


def _log_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        logger.error("releasing an adapter failed", exc_info=fut.exception())

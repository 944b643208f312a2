"""The `model` of an OpenAI- or Anthropic-style request, and the adapter slot it samples with.

`model` is a base model name, a checkpoint path (`tinker://{run}/sampler_weights/{name}`), or
`{base model};{checkpoint path}`. Checkpoints are looked up as `create_sampling_session`
looks up `model_path`: the caller's own or a public one, another tenant's being a 404.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.engine_api import EngineAPI
from server.paths import TINKER_SCHEME, parse_tinker_path
from server.runtime import BASE_MODEL_SLOT
from server.service import Service
from server.store import CheckpointRecord


@dataclass(frozen=True)
class ModelChoice:
    engine: EngineAPI
    checkpoint: CheckpointRecord | None
    """None: the bare base model."""


def resolve_model(service: Service, model: str) -> ModelChoice:
    base, separator, path = model.partition(";")
    if not separator:
        if not model.startswith(TINKER_SCHEME):
            return ModelChoice(service.engine(model), None)
        base, path = "", model
    ref = parse_tinker_path(path)
    record = service.readable_checkpoint(ref)
    return ModelChoice(service.engine_for_checkpoint(ref, base or None), record)


@contextlib.asynccontextmanager
async def adapter_slot(service: Service, choice: ModelChoice) -> AsyncIterator[int]:
    """The slot to sample `choice` with, its checkpoint loaded (once, then shared) while held.
    Only a load reads the checkpoint's files, so only a load is audited as a read."""
    record = choice.checkpoint
    if record is None:
        yield BASE_MODEL_SLOT
        return
    worker = service.workers[choice.engine.name]
    key = (record.ref.tinker_path, record.created_at)

    def load() -> asyncio.Future[int]:
        directory = service.checkpoint_directory(record.ref, "sampling")
        return worker.call(lambda engine: engine.load_adapter(directory, with_optimizer=False))

    async with service.checkpoint_adapters.lease(key, choice.engine.name, load) as slot:
        yield slot

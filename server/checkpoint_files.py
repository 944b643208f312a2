"""Checkpoint directories on disk: overwriting saves and deletion.

The engine writes a checkpoint atomically but refuses an existing directory; an overwrite
moves the old one aside first and puts it back if the new save fails.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from server.engine_api import EngineAPI


def save(engine: EngineAPI, slot: int, directory: Path, *, with_optimizer: bool, overwrite: bool) -> int:
    """Save `slot` to `directory`; returns the checkpoint's size in bytes."""
    if not (overwrite and directory.exists()):
        return engine.save_adapter(slot, directory, with_optimizer=with_optimizer)
    previous = directory.with_name(f".replaced-{directory.name}-{uuid.uuid4().hex}")
    directory.rename(previous)
    try:
        size = engine.save_adapter(slot, directory, with_optimizer=with_optimizer)
    except BaseException:
        previous.rename(directory)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    return size


def delete(directory: Path) -> None:
    """Remove a checkpoint: renamed away first so it disappears at once, then deleted."""
    doomed = directory.with_name(f".deleted-{directory.name}-{uuid.uuid4().hex}")
    directory.rename(doomed)
    shutil.rmtree(doomed)

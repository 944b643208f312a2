"""Checkpoint directories on disk: atomic saves (Orbax + PEFT) and copies, deletion, expiry,
crash recovery, and streaming a checkpoint as a tar.gz.

A save is written into a hidden `.pending-*` directory next to its final place and renamed
into place only when complete, so a crash mid-save never leaves a visible half checkpoint. An
overwrite moves the old directory aside (`.replaced-*`) first and puts it back if the rename fails.
Names starting with `.` are never valid checkpoint names (server.paths), so these temporary
directories cannot collide with checkpoints. `recover` cleans up after a crash at startup
and reconciles the directories with the store.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import uuid
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from server.engine_api import EngineAPI
from server.paths import CheckpointKind, CheckpointRef
from server.store import CheckpointRecord, Store
from tuft_jax.errors import InputError

logger = logging.getLogger(__name__)

PEFT_DIR = "peft"
"""Subdirectory of a sampler checkpoint holding the standard PEFT adapter."""
COMPLETE_MARKER = "checkpoint_complete"
"""Empty last file of an external_weights checkpoint, as in Tinker's exports (`tinker checkpoint
push-hf` skips it): downloaded files come in name order, so it arrives last."""

_PENDING, _REPLACED, _DELETED = ".pending-", ".replaced-", ".deleted-"
_TEMPORARY = (_PENDING, _DELETED, ".staging-")
_CHUNK = 1 << 20


def tree_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


class CheckpointWriteError(OSError):
    """The server could not write a checkpoint (permissions, a full disk, ...): a server-side
    failure, reported with what failed and where instead of the bare OSError's text."""


def save(engine: EngineAPI, slot: int, directory: Path, kind: CheckpointKind, *, replace: bool) -> int:
    """Save `slot` to `directory` as a checkpoint of `kind`; returns the size in bytes. An
    existing directory is replaced only if `replace`. A filesystem failure raises
    CheckpointWriteError and leaves no trace: the pending directory is removed, an overwritten
    checkpoint is kept."""
    if directory.exists() and not replace:
        raise InputError(f"checkpoint {directory.name!r} already exists")
    return _build(directory, lambda pending: _write(engine, slot, pending, kind))


def _build(directory: Path, write: Callable[[Path], object]) -> int:
    """Fill a new pending directory with `write` and install it at `directory`; returns its
    size. A filesystem failure raises CheckpointWriteError, the pending directory removed."""
    pending = directory.with_name(f"{_PENDING}{directory.name}-{uuid.uuid4().hex}")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        write(pending)
        _install(pending, directory)
    except OSError as exc:
        raise CheckpointWriteError(_write_failure(directory, exc)) from exc
    finally:
        shutil.rmtree(pending, ignore_errors=True)
    return tree_size(directory)


def _write(engine: EngineAPI, slot: int, directory: Path, kind: CheckpointKind) -> None:
    """Training checkpoints hold the engine's Orbax checkpoint with the optimizer state, sampler
    checkpoints the Orbax weights plus a PEFT export under `peft/` (for other tools), external
    weights only the PEFT export and the completion marker: exactly the files a download gets."""
    if kind == "external_weights":
        engine.export_peft(slot, directory)
        (directory / COMPLETE_MARKER).touch()
        return
    engine.save_adapter(slot, directory, with_optimizer=kind == "weights")
    if kind == "sampler_weights":
        engine.export_peft(slot, directory / PEFT_DIR)


def link_copy(source: Path, directory: Path) -> int:
    """Install a copy of the checkpoint `source` at `directory`, atomically like `save`; returns
    its size. Its files are hard links to the source's (plain copies where the filesystem cannot
    link), so no bytes are duplicated, and deleting either checkpoint keeps the other whole:
    saves replace directories, never a file's contents."""
    return _build(directory, lambda pending: shutil.copytree(source, pending, copy_function=_link_or_copy))


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _write_failure(directory: Path, exc: OSError) -> str:
    reason = exc.strerror.lower() if exc.strerror else str(exc)
    if exc.filename is not None:
        reason += f" ({exc.filename})"
    return f"cannot write checkpoint {directory.name!r} under {directory.parent}: {reason}"


def _install(pending: Path, directory: Path) -> None:
    if not directory.exists():
        os.rename(pending, directory)
        return
    previous = directory.with_name(f"{_REPLACED}{directory.name}-{uuid.uuid4().hex}")
    os.rename(directory, previous)
    try:
        os.rename(pending, directory)
    except BaseException:
        os.rename(previous, directory)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def delete(directory: Path) -> None:
    """Remove a checkpoint: renamed away first so it disappears at once, then deleted."""
    if not directory.exists():
        return
    doomed = directory.with_name(f"{_DELETED}{directory.name}-{uuid.uuid4().hex}")
    os.rename(directory, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def delete_expired(store: Store, root: Path, now: datetime) -> int:
    """Delete every checkpoint whose TTL has passed (files, then record); returns how many."""
    count = 0
    for record in store.expired_checkpoints(now):
        try:
            delete(record.ref.directory(root))
        except OSError:
            logger.exception("deleting expired checkpoint %s failed", record.ref.tinker_path)
            continue
        store.delete_checkpoint(record.ref, reason="expired")
        logger.info("deleted expired checkpoint %s", record.ref.tinker_path)
        count += 1
    return count


# ---- crash recovery -------------------------------------------------------------------------


def _kind_dirs(root: Path) -> Iterator[tuple[str, str, Path]]:
    """(model_id, kind, path) of every `{root}/{model_id}/{kind}` directory."""
    if not root.is_dir():
        return
    for model_dir in root.iterdir():
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        for kind_dir in model_dir.iterdir():
            if kind_dir.is_dir():
                yield model_dir.name, kind_dir.name, kind_dir


def recover(store: Store, root: Path) -> None:
    """After a crash: drop half-written directories, finish interrupted overwrites, forget
    records whose files are gone, and adopt complete checkpoints whose record was never
    written (the process died between the rename and the database write)."""
    on_disk: set[CheckpointRef] = set()
    for model_id, kind, kind_dir in _kind_dirs(root):
        for entry in sorted(kind_dir.iterdir()):
            name = entry.name
            if name.startswith(_TEMPORARY):
                shutil.rmtree(entry, ignore_errors=True)
            elif name.startswith(_REPLACED):
                original = kind_dir / name[len(_REPLACED) :].rsplit("-", 1)[0]
                if original.exists():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    os.rename(entry, original)
                    logger.warning("restored %s after an interrupted overwrite", original)
                    _add_ref(on_disk, model_id, kind, original.name)
            elif entry.is_dir():
                _add_ref(on_disk, model_id, kind, name)
    recorded = {record.ref for record in store.list_checkpoints().items}
    for ref in recorded - on_disk:
        logger.warning("checkpoint %s has no files any more; forgetting it", ref.tinker_path)
        store.delete_checkpoint(ref, reason="files_missing")
    for ref in on_disk - recorded:
        run = store.get_training_run(ref.model_id)
        directory = ref.directory(root)
        if run is None:
            logger.warning("%s belongs to no known training run; leaving it alone", directory)
            continue
        created = datetime.fromtimestamp(directory.stat().st_mtime, UTC)
        store.put_checkpoint(
            CheckpointRecord(ref, run.owner, created, tree_size(directory), base_model=run.base_model, lora=run.lora)
        )
        logger.warning("adopted checkpoint %s, saved just before a crash", ref.tinker_path)


def _add_ref(refs: set[CheckpointRef], model_id: str, kind: str, name: str) -> None:
    try:
        refs.add(CheckpointRef.of(model_id, kind, name))
    except InputError:
        pass  # not a checkpoint directory (e.g. the database file's directory)


# ---- archives -------------------------------------------------------------------------------


def archive_chunks(directory: Path, top: str) -> Iterator[bytes]:
    """A tar.gz of `directory` (entries under `top/`), produced file by file and chunk by chunk,
    so memory use stays bounded whatever the checkpoint's size."""
    return (chunk for chunk in _tar_gz(directory, top) if chunk)


def _tar_gz(directory: Path, top: str) -> Iterator[bytes]:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip container
    written = 0

    def emit(data: bytes) -> bytes:
        nonlocal written
        written += len(data)
        return compressor.compress(data)

    entries = [directory, *sorted(directory.rglob("*"))]
    for path in entries:
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            continue
        relative = path.relative_to(directory).as_posix()
        info = tarfile.TarInfo(top if relative == "." else f"{top}/{relative}")
        stat = path.stat()
        info.mtime = int(stat.st_mtime)
        if path.is_dir():
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            yield emit(info.tobuf(tarfile.PAX_FORMAT))
            continue
        info.size, info.mode = stat.st_size, 0o644
        yield emit(info.tobuf(tarfile.PAX_FORMAT))
        remaining = info.size
        with path.open("rb") as f:
            while remaining > 0:
                chunk = f.read(min(_CHUNK, remaining)) or b"\0" * min(_CHUNK, remaining)  # file shrank: pad
                remaining -= len(chunk)
                yield emit(chunk)
        yield emit(b"\0" * (-info.size % tarfile.BLOCKSIZE))
    end = b"\0" * (2 * tarfile.BLOCKSIZE)
    yield emit(end + b"\0" * (-(written + len(end)) % tarfile.RECORDSIZE))
    yield compressor.flush()

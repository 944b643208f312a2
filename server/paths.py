"""Checkpoint names and `tinker://{model_id}/{kind}/{name}` paths, validated before touching disk.

Names and paths come from clients and end up as directory names, so only a strict character
set is accepted and nothing may start with `.` (which also refuses `.` and `..`): nothing a
client sends can leave the checkpoint root, and dot-names stay reserved for the server's
temporary directories. Checkpoints live at `{root}/{model_id}/{kind}/{name}`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from tuft_jax.errors import InputError

CheckpointKind = Literal["weights", "sampler_weights", "external_weights"]
CheckpointType = Literal["training", "sampler", "external"]

TINKER_SCHEME = "tinker://"
MAX_NAME_LENGTH = 200

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_MODEL_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._:-]*")
_TYPES: dict[CheckpointKind, CheckpointType] = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}


def _check_segment(value: str, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME_LENGTH or not pattern.fullmatch(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        allowed = "letters, digits, '_', '-', '.'" + (", ':'" if ":" in pattern.pattern else "")
        raise InputError(
            f"invalid {what} {shown}: use 1 to {MAX_NAME_LENGTH} of {allowed}, not starting with '.'"
        )
    return value


def validate_name(name: str) -> str:
    """A checkpoint name as given to save_state / save_weights_for_sampler."""
    return _check_segment(name, _NAME, "checkpoint name")


def validate_model_id(model_id: str) -> str:
    return _check_segment(model_id, _MODEL_ID, "training run id")


def _check_kind(kind: str) -> CheckpointKind:
    if kind not in _TYPES:
        raise InputError(f"invalid checkpoint kind {kind!r}: expected one of {', '.join(get_args(CheckpointKind))}")
    return kind  # type: ignore[return-value]


@dataclass(frozen=True)
class CheckpointRef:
    model_id: str
    kind: CheckpointKind
    name: str

    @classmethod
    def of(cls, model_id: str, kind: str, name: str) -> CheckpointRef:
        return cls(validate_model_id(model_id), _check_kind(kind), validate_name(name))

    @property
    def tinker_path(self) -> str:
        return f"{TINKER_SCHEME}{self.model_id}/{self.kind}/{self.name}"

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind}/{self.name}"

    @property
    def checkpoint_type(self) -> CheckpointType:
        return _TYPES[self.kind]

    def directory(self, root: Path) -> Path:
        return root / self.model_id / self.kind / self.name


def parse_tinker_path(path: str) -> CheckpointRef:
    """`tinker://{model_id}/{kind}/{name}` with exactly three non-traversing parts."""
    if not path.startswith(TINKER_SCHEME):
        raise InputError(f"invalid tinker path {path!r}: expected tinker://<model_id>/<kind>/<name>")
    parts = path[len(TINKER_SCHEME) :].split("/")
    if len(parts) != 3:
        raise InputError(f"invalid tinker path {path!r}: expected tinker://<model_id>/<kind>/<name>")
    return CheckpointRef.of(*parts)


def parse_checkpoint_id(model_id: str, checkpoint_id: str) -> CheckpointRef:
    """A REST `checkpoint_id` (`{kind}/{name}`) of training run `model_id`."""
    kind, sep, name = checkpoint_id.partition("/")
    if not sep:
        raise InputError(f"invalid checkpoint id {checkpoint_id!r}: expected <kind>/<name>")
    return CheckpointRef.of(model_id, kind, name)

"""Checkpoint names and tinker:// paths: strict validation, no way out of the checkpoint root."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.paths import CheckpointRef, parse_checkpoint_id, parse_tinker_path, validate_name
from tuft_jax.errors import InputError

MODEL = "0b0e-11:train:0"


def test_round_trip() -> None:
    ref = parse_tinker_path(f"tinker://{MODEL}/sampler_weights/step-1.final")
    assert ref == CheckpointRef(MODEL, "sampler_weights", "step-1.final")
    assert ref.tinker_path == f"tinker://{MODEL}/sampler_weights/step-1.final"
    assert ref.checkpoint_id == "sampler_weights/step-1.final"
    assert ref.checkpoint_type == "sampler"
    assert ref.directory(Path("/root")) == Path(f"/root/{MODEL}/sampler_weights/step-1.final")
    assert parse_checkpoint_id(MODEL, "weights/ckpt-1") == CheckpointRef(MODEL, "weights", "ckpt-1")
    assert parse_tinker_path(f"tinker://{MODEL}/external_weights/final").checkpoint_type == "external"


@pytest.mark.parametrize(
    "path",
    [
        "tinker://a/../b",
        "tinker://x/weights/..",
        "tinker://x/weights/.",
        "tinker://../weights/x",
        "tinker://x/weights/a/b",
        "tinker://x/weights",
        "tinker://x/weights/",
        "tinker:///weights/x",
        "tinker://x/weights/..%2F..%2Fetc",
        "tinker://x%2F..%2F../weights/y",
        "tinker://x/weights/a\\b",
        "tinker://x/other/y",
        "tinker://x/weights/ name",
        "file:///etc/passwd",
        "x/weights/y",
        f"tinker://x/weights/{'a' * 201}",
        f"tinker://{'a' * 201}/weights/x",
        "tinker://x/weights/%2e%2e",
        "tinker://x/weights/a\x00b",
        "tinker://x\x00/weights/y",
        "tinker://x/weights/.hidden",
        "tinker://.x/weights/y",
        "tinker:///etc/weights/passwd",
        "tinker://x/weights//etc/passwd",
        "/etc/passwd",
        "",
    ],
)
def test_rejects_bad_tinker_paths(path: str) -> None:
    with pytest.raises(InputError):
        parse_tinker_path(path)


@pytest.mark.parametrize(
    "name",
    [
        "", ".", "..", "../x", "..\\x", "a/b", "a\\b", "x\x00", "\x00", "~", "a b", "%2e%2e", "%2e%2e%2fx",
        "/etc/passwd", "/abs", "C:\\x", ".hidden", "..a", ".staging-x", "a" * 201, "a" * 10_000, "é", "a\nb",
    ],
)
def test_rejects_bad_names(name: str) -> None:
    with pytest.raises(InputError):
        validate_name(name)


@pytest.mark.parametrize("checkpoint_id", ["weights", "weights/../x", "weights/a/b", "../weights/x", "weights/.."])
def test_rejects_bad_checkpoint_ids(checkpoint_id: str) -> None:
    with pytest.raises(InputError):
        parse_checkpoint_id(MODEL, checkpoint_id)


@pytest.mark.parametrize("name", ["ckpt-1", "step_000100", "final.v2", "a..b", "a.", "-x", "a" * 200])
def test_accepts_good_names(name: str) -> None:
    assert validate_name(name) == name

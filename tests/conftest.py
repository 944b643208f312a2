"""Fixtures shared by every test package: tiny random HF checkpoints, built once per session."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Tests never reach the Hugging Face hub: every model and tokenizer is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tuft_jax.builtin_model import build_tiny_hf_checkpoint  # noqa: E402

TinyCheckpoint = Callable[..., Path]


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Drops every compiled program after each test module.

    XLA:CPU maps each compiled program's code into the process. Over the whole suite in one
    process the mappings passed `vm.max_map_count` (65530), and a later compile crashed in LLVM
    (SIGSEGV or SIGABRT) at whichever test came next. Clearing per module keeps the count bounded.
    """
    yield
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    """`tiny_checkpoint(family="qwen3", tie=False, seed=0, **config_overrides)` -> a local HF model dir.

    Each distinct request is written once per session (float32 safetensors + config + tokenizer,
    in well under a second) and shared by every test that asks for it.
    """
    built: dict[tuple, Path] = {}

    def build(family: str = "qwen3", tie: bool = False, seed: int = 0, **overrides: Any) -> Path:
        key = (family, tie, seed, repr(sorted(overrides.items())))
        if key not in built:
            name = f"{family}-{'tied' if tie else 'untied'}-seed{seed}"
            out = tmp_path_factory.mktemp(name)
            built[key] = build_tiny_hf_checkpoint(out, family, seed=seed, tie_word_embeddings=tie, **overrides)  # type: ignore[arg-type]
        return built[key]

    return build

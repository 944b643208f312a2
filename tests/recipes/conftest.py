"""A server and an offline Hugging Face cache for running tinker-cookbook recipes unmodified.

The recipes run in their own venv (`.venv-cookbook`, built by `scripts/setup_extra_venvs.sh`,
which `scripts/test.sh` calls) because tinker-cookbook pins a different transformers and
needs torch, datasets and friends that the server does not. The server runs from the main
venv and serves a tiny random Qwen3 checkpoint under the recipes' default model name; the same
checkpoint's tokenizer is put in the offline HF cache under that name, so client and server
agree on the vocabulary.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from recipe_testing import (
    COOKBOOK_PYTHON,
    FEW_SLOTS,
    FEW_SLOTS_MODEL,
    OFFLINE_CACHE_SCRIPT,
    RECIPE_MODEL,
    RecipeServer,
    require_extra_venv,
)

from live_server import ServerProcess

from tuft_jax.builtin_model import build_tiny_hf_checkpoint


@pytest.fixture(scope="session")
def cookbook_python() -> Path:
    require_extra_venv(COOKBOOK_PYTHON, "tinker-cookbook 0.6.1 for the recipe tests")
    return COOKBOOK_PYTHON


@pytest.fixture(scope="session")
def recipe_server(cookbook_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecipeServer]:
    root = tmp_path_factory.mktemp("recipes")
    model_dir = build_tiny_hf_checkpoint(root / "tiny-qwen3", "qwen3", seed=0)
    (root / "models.yaml").write_text(
        "models:\n"
        f"  - {{name: {RECIPE_MODEL}, path: {model_dir}, max_context_length: 2048,"
        " max_lora_rank: 32, max_adapters: 16}\n"
        f"  - {{name: {FEW_SLOTS_MODEL}, path: {model_dir}, max_context_length: 2048,"
        f" max_lora_rank: 32, max_adapters: {FEW_SLOTS}}}\n"
    )
    hf_home = root / "hf"
    subprocess.run(
        [
            str(cookbook_python), str(OFFLINE_CACHE_SCRIPT), str(hf_home),
            "--model", f"{RECIPE_MODEL}={model_dir}",
            "--model", f"{FEW_SLOTS_MODEL}={model_dir}",
            "--no-robots",
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )

    server = ServerProcess(root, args=["--model-config", str(root / "models.yaml")])
    try:
        server.start()
        yield RecipeServer(url=server.url, root=root, hf_home=hf_home, log=root / "server-1.log")
    finally:
        server.stop()

"""Shared by the recipe tests and their fixtures: paths, model names, the server handle."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COOKBOOK_PYTHON = REPO / ".venv-cookbook" / "bin" / "python"
OFFLINE_CACHE_SCRIPT = Path(__file__).with_name("offline_cache.py")

# The cookbook's default model (sl_loop, chat_sl, DPO, ...); its registry maps it to the
# tokenizer-agnostic `role_colon` renderer, which works with any byte-level tokenizer.
RECIPE_MODEL = "Qwen/Qwen3.5-9B-Base"
# A second name for the same checkpoint with only a few adapter slots, for slot-exhaustion tests.
FEW_SLOTS_MODEL = "Qwen/Qwen3-8B-Base"
FEW_SLOTS = 4


def require_extra_venv(python: Path, what: str) -> None:
    """Skip when an optional test venv is missing, unless the run promised to build it."""
    if python.exists():
        return
    message = f"{python.parent.parent.name} is missing ({what}); scripts/setup_extra_venvs.sh builds it"
    if os.environ.get("TUFT_REQUIRE_EXTRA_VENVS") == "1":
        pytest.fail(message)
    pytest.skip(message)


@dataclass(frozen=True)
class RecipeServer:
    url: str
    root: Path
    hf_home: Path
    log: Path

    def env(self) -> dict[str, str]:
        """Environment for a recipe subprocess: this server, the offline cache, no network."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TINKER_", "HF_", "WANDB_"))}
        env.update(
            TINKER_BASE_URL=self.url,
            TINKER_API_KEY="tml-cookbook-recipe-test",
            TINKER_TELEMETRY="0",
            TINKER_COOKBOOK_RUNS_DIR=str(self.root / "runs"),
            HF_HOME=str(self.hf_home),
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            WANDB_MODE="disabled",
            # The recipes' only other network touch is a best-effort pricing download; point it
            # at a closed loopback port so it fails at once without leaving the machine.
            HTTPS_PROXY="http://127.0.0.1:9",
            HTTP_PROXY="http://127.0.0.1:9",
            NO_PROXY="127.0.0.1,localhost",
            PYTHONUNBUFFERED="1",
        )
        for key in ("https_proxy", "http_proxy", "no_proxy", "all_proxy", "ALL_PROXY"):
            env.pop(key, None)
        return env

    def log_tail(self, lines: int = 40) -> str:
        kept = [line for line in self.log.read_text(errors="replace").splitlines() if " absl: " not in line]
        return "\n".join(kept[-lines:])

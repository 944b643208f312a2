"""scripts/bench/memory.py: an ahead-of-time compile of the real training step reports its memory.

Runs the script as a user would, on the built-in tiny model with one layer, so the compile
stays a few seconds on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "bench" / "memory.py"
BYTE_FIELDS = ("peak_bytes", "temp_bytes", "argument_bytes", "output_bytes", "lower_bound_bytes")


def test_train_step_memory_json(tmp_path: Path) -> None:
    args = ["--model", "tiny", "--layers", "1", "--batch", "2", "--seq", "64", "--rank", "4", "--slots", "3"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--cache-dir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {key: result[key] for key in ("model", "mode", "batch", "seq", "layers", "rank", "slots")} == dict(
        model="tiny", mode="train", batch=2, seq=64, layers=1, rank=4, slots=3
    )
    for key in (*BYTE_FIELDS, "compile_s", "lower_s"):
        assert result[key] > 0, key
    assert result["alias_bytes"] >= 0
    assert result["peak_bytes"] >= result["temp_bytes"]
    assert result["peak_bytes"] >= result["argument_bytes"] + result["output_bytes"] - result["alias_bytes"]
    assert result["lower_bound_bytes"] == sum(result["lower_bound_parts"].values())

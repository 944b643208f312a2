"""More concurrent runs than adapter slots: 24 SDK clients on a model with 4 slots each train,
save and sample at once (`scripts/bench/load.py`), and every call of every client completes with
its own result, none lost or duplicated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from live_server import ServerProcess
from tuft_jax.builtin_model import build_tiny_hf_checkpoint

MODEL = "tuft/tiny-4-slots"
CLIENTS, STEPS = 24, 3
LOAD_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench" / "load.py"


@pytest.fixture(scope="module")
def few_slots_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("load")
    model_dir = build_tiny_hf_checkpoint(root / "tiny", "qwen3", seed=0)
    config = root / "models.yaml"
    config.write_text(
        f"models:\n  - {{name: {MODEL}, path: {model_dir}, max_context_length: 512, max_lora_rank: 8, max_adapters: 4}}\n"
    )
    server = ServerProcess(root, args=["--model-config", str(config)])
    try:
        yield server.start()
    finally:
        server.stop()


def test_more_concurrent_clients_than_adapter_slots_all_complete(few_slots_server: ServerProcess) -> None:
    command = [sys.executable, str(LOAD_SCRIPT), "--url", few_slots_server.url, "--model", MODEL]
    command += ["--clients", str(CLIENTS), "--steps", str(STEPS), "--timeout", "600", "--details"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=660)
    assert done.stdout, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["clients_failed"] == 0, (report["errors"], few_slots_server.log()[-3000:])
    assert done.returncode == 0
    calls_per_client = 1 + 2 * STEPS + 3  # create, steps x (fb + optim), save, sampling client, sample
    assert report["calls_completed"] == CLIENTS * calls_per_client
    assert report["twin_disagreements"] == []
    for run in report["runs"]:
        assert len(run["losses"]) == STEPS and run["losses"][-1] < run["losses"][0]
        assert len(run["tokens"]) == 8

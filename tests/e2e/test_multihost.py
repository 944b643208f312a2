"""Two JAX processes on loopback (process 0 serves HTTP and broadcasts every engine call) train
and sample exactly like one process: same losses, same greedy tokens, loadable checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import tinker
from live_server import ServerProcess, cache_dir, free_port
from tinker import types

BASE_MODEL = "tuft/tiny-qwen3"
TOKENS = [17, 301, 45, 99, 12, 250, 33, 7, 64, 128, 5, 77]


@pytest.fixture(scope="module")
def two_process_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("multihost")
    group = ["--coordinator-address", f"127.0.0.1:{free_port()}", "--num-processes", "2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    with (root / "worker.log").open("w") as log:
        worker = subprocess.Popen(
            [
                sys.executable, "-m", "server", "--checkpoint-dir", str(root / "worker-checkpoints"),
                "--cache-dir", str(cache_dir(root)), *group, "--process-id", "1",
            ],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    leader = ServerProcess(root, args=[*group, "--process-id", "0"])
    try:
        leader.start()
        yield leader.url
    finally:
        leader.stop()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
    assert worker.returncode == 0, (root / "worker.log").read_text()[-3000:]


def _flow(url: str) -> tuple[list[float], list[int], float]:
    service = tinker.ServiceClient(base_url=url, api_key="tml-multihost")
    training = service.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=0).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)},
    )
    losses = []
    for _ in range(3):
        losses.append(training.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"])
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    state = training.save_state("multihost").result().path
    sampler = training.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    greedy = sampler.sample(types.ModelInput.from_ints(TOKENS[:4]), 1, params).result().sequences[0].tokens
    restored = service.create_training_client_from_state_with_optimizer(state).result()
    resumed = restored.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    service.close("success")
    return losses, greedy, resumed


def test_two_processes_match_one(server_url: str, two_process_url: str) -> None:
    single = _flow(server_url)
    double = _flow(two_process_url)
    np.testing.assert_allclose(double[0], single[0], rtol=1e-4)
    assert double[1] == single[1]
    np.testing.assert_allclose(double[2], single[2], rtol=1e-4)
    assert single[0][-1] < single[0][0]

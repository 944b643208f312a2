"""Restart safety through the real SDK: `kill -9` the server while a forward_backward is in
flight, start it again on the same directories, and everything durable is still there.

- the in-flight request fails clearly (`RequestFailedError`, category `server`) instead of
  hanging;
- training runs and checkpoints are listed by `RestClient`;
- `create_training_client_from_state_with_optimizer` continues the run exactly: the loss
  after loading equals the loss at the save, and one more AdamW step lands where the
  uninterrupted run's next step did (so the optimizer moments were restored too);
- the sampler checkpoint's `peft/` directory loads with transformers + peft and gives the
  server's `compute_logprobs` to 1e-4.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import tinker
from live_server import ServerProcess
from peft_check import peft_logprobs
from tinker import types
from transformers import AutoTokenizer

BASE_MODEL = "tuft/tiny-qwen3"
API_KEY = "tml-e2e-restart"
TEXT = "Durable state: a run survives kill -9. Durable state: a run survives kill -9."
LEARNING_RATE = 1e-2


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def _loss(training: tinker.TrainingClient, datum: types.Datum) -> float:
    return training.forward([datum], "cross_entropy").result().metrics["loss:sum"]


def _step(training: tinker.TrainingClient, datum: types.Datum) -> None:
    training.forward_backward([datum], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=LEARNING_RATE)).result()


@pytest.fixture(scope="module")
def restarted(tmp_path_factory: pytest.TempPathFactory):
    """Train, save, kill -9 mid-forward_backward, restart; returns what the test needs."""
    root = tmp_path_factory.mktemp("restart")
    signals = root / "signals"
    signals.mkdir()
    launcher = [str(Path(__file__).with_name("slow_server.py")), str(signals)]
    server = ServerProcess(root, launcher=launcher).start()
    try:
        service = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
        training = service.create_lora_training_client(base_model=BASE_MODEL, rank=8, seed=0).result()
        tokenizer_dir = training.get_info().model_data.tokenizer_id
        tokens = AutoTokenizer.from_pretrained(tokenizer_dir).encode(TEXT)
        datum = _datum(tokens)
        first_loss = _loss(training, datum)
        for _ in range(4):
            _step(training, datum)
        state_path = training.save_state("before-kill").result().path
        sampler_path = training.save_weights_for_sampler("peft-check").result().path
        saved_loss = _loss(training, datum)
        _step(training, datum)
        next_loss = _loss(training, datum)

        (signals / "slow").touch()
        in_flight = training.forward_backward([datum], "cross_entropy")
        deadline = time.monotonic() + 60
        while not (signals / "in-forward").exists():
            assert time.monotonic() < deadline, "the forward_backward never reached the engine"
            time.sleep(0.05)
        server.kill()
        (signals / "slow").unlink()
        server.start()

        with pytest.raises(tinker.RequestFailedError) as failure:
            in_flight.result(timeout=240)
        yield {
            "server": server,
            "model_id": training.model_id,
            "failure": failure.value,
            "tokens": tokens,
            "tokenizer_dir": tokenizer_dir,
            "state_path": state_path,
            "sampler_path": sampler_path,
            "losses": (first_loss, saved_loss, next_loss),
        }
    finally:
        server.stop()


@pytest.fixture(scope="module")
def service(restarted) -> tinker.ServiceClient:
    client = tinker.ServiceClient(base_url=restarted["server"].url, api_key=API_KEY)
    yield client
    client.close("success")


def test_in_flight_request_fails_clearly(restarted) -> None:
    failure = restarted["failure"]
    assert failure.category == "server"
    assert "restarted" in str(failure)


def test_runs_and_checkpoints_are_listed(restarted, service: tinker.ServiceClient) -> None:
    rest = tinker.RestClient(base_url=restarted["server"].url, api_key=API_KEY)
    model_id = restarted["model_id"]
    runs = rest.list_training_runs().result()
    assert model_id in [run.training_run_id for run in runs.training_runs]
    run = rest.get_training_run(model_id).result()
    assert run.base_model == BASE_MODEL and run.lora_rank == 8
    assert run.last_checkpoint is not None and run.last_checkpoint.tinker_path == restarted["state_path"]
    checkpoints = rest.list_checkpoints(model_id).result().checkpoints
    assert {c.tinker_path for c in checkpoints} == {restarted["state_path"], restarted["sampler_path"]}
    info = rest.get_weights_info_by_tinker_path(restarted["state_path"]).result()
    assert (info.base_model, info.lora_rank) == (BASE_MODEL, 8)
    # Another API key (another tenant) sees none of it.
    stranger = tinker.RestClient(base_url=restarted["server"].url, api_key="tml-e2e-stranger")
    assert model_id not in [r.training_run_id for r in stranger.list_training_runs().result().training_runs]


def test_training_continues_from_the_checkpoint(restarted, service: tinker.ServiceClient) -> None:
    first_loss, saved_loss, next_loss = restarted["losses"]
    datum = _datum(restarted["tokens"])
    resumed = service.create_training_client_from_state_with_optimizer(restarted["state_path"]).result()
    loaded_loss = _loss(resumed, datum)
    assert math.isclose(loaded_loss, saved_loss, rel_tol=1e-4), (loaded_loss, saved_loss)
    assert loaded_loss < 0.7 * first_loss, "the run continues, not starts over"
    _step(resumed, datum)
    assert math.isclose(_loss(resumed, datum), next_loss, rel_tol=1e-3), "optimizer state was restored"

    weights_only = service.create_training_client_from_state(restarted["state_path"]).result()
    assert math.isclose(_loss(weights_only, datum), saved_loss, rel_tol=1e-4)


def test_sampler_checkpoint_is_a_peft_adapter(restarted, service: tinker.ServiceClient) -> None:
    tokens = restarted["tokens"][:16]
    sampler = service.create_sampling_client(model_path=restarted["sampler_path"]).result()
    served = np.array(sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()[1:], np.float64)

    name = restarted["sampler_path"].rsplit("/", 1)[1]
    peft_dir = restarted["server"].checkpoint_dir / restarted["model_id"] / "sampler_weights" / name / "peft"
    np.testing.assert_allclose(served, peft_logprobs(restarted["tokenizer_dir"], peft_dir, tokens), atol=1e-4)

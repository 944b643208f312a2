"""`tinker checkpoint download` (the SDK's own CLI, run as a subprocess) against a live server.

For a training checkpoint the CLI loads it into a new run, exports it with
`save_weights_external`, fetches every file through the signed URLs without its API key, and
deletes the export; for an `external_weights` path it only fetches. Either way the files are
a PEFT adapter that transformers + peft load on the same tiny base model, giving the
server's `compute_logprobs` to 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tinker
from peft_check import peft_logprobs
from tinker import types
from tinker_cli import Cli
from transformers import AutoTokenizer

BASE_MODEL = "tuft/tiny-qwen3"
API_KEY = "tml-e2e-cli-download"
TEXT = "Weights leave the server as a PEFT adapter. Weights leave the server as a PEFT adapter."
FILES = ["adapter_config.json", "adapter_model.safetensors", "checkpoint_complete"]


@pytest.fixture(scope="module")
def service(server_url: str) -> tinker.ServiceClient:
    client = tinker.ServiceClient(base_url=server_url, api_key=API_KEY)
    yield client
    client.close("success")


@pytest.fixture(scope="module")
def trained(service: tinker.ServiceClient) -> dict:
    """A run trained a few steps: its training client, tokens, and the served logprobs of its weights."""
    training = service.create_lora_training_client(base_model=BASE_MODEL, rank=8, seed=0).result()
    base_dir = training.get_info().model_data.tokenizer_id
    tokens = AutoTokenizer.from_pretrained(base_dir).encode(TEXT)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    for _ in range(4):
        training.forward_backward([datum], "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    sampler = training.save_weights_and_get_sampling_client().result()
    served = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    return {"training": training, "base_dir": base_dir, "tokens": tokens, "served": np.array(served[1:], np.float64)}


def download(server_url: str, tinker_path: str, output: Path) -> Path:
    """Run the CLI as a user would; returns the directory it filled."""
    report = Cli(server_url, API_KEY, output).json("checkpoint", "download", tinker_path, "--output", str(output))
    destination = Path(report["destination"])
    assert destination == output / tinker_path.removeprefix("tinker://").replace("/", "_")
    assert sorted(p.name for p in destination.iterdir()) == FILES
    assert report["file_size_bytes"] == sum(p.stat().st_size for p in destination.iterdir())
    return destination


def assert_adapter_matches_server(trained: dict, adapter_dir: Path) -> None:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["base_model_name_or_path"]) == ("LORA", 8, BASE_MODEL)
    got = peft_logprobs(trained["base_dir"], adapter_dir, trained["tokens"])
    np.testing.assert_allclose(got, trained["served"], rtol=0, atol=1e-4)
    base = peft_logprobs(trained["base_dir"], None, trained["tokens"])
    assert np.max(np.abs(got - base)) > 0.05, "not vacuous: training changed the logprobs"


def test_download_of_a_training_checkpoint(server_url: str, trained: dict, tmp_path: Path) -> None:
    state_path = trained["training"].save_state("final").result().path
    adapter_dir = download(server_url, state_path, tmp_path)
    assert_adapter_matches_server(trained, adapter_dir)
    rest = tinker.RestClient(base_url=server_url, api_key=API_KEY)
    own_run = f"tinker://{trained['training'].model_id}/"
    exports = [
        c.tinker_path
        for c in rest.list_user_checkpoints().result().checkpoints
        if c.checkpoint_type == "external" and not c.tinker_path.startswith(own_run)
    ]
    assert exports == [], "the CLI deleted the temporary export of the run it loaded the checkpoint into"


def test_download_of_external_weights(server_url: str, trained: dict, tmp_path: Path) -> None:
    training = trained["training"]
    external_path = training.save_weights_external("exported", ttl_seconds=3600).result().path
    assert external_path == f"tinker://{training.model_id}/external_weights/exported"
    rest = tinker.RestClient(base_url=server_url, api_key=API_KEY)
    checkpoints = rest.list_checkpoints(training.model_id).result().checkpoints
    (listed,) = [c for c in checkpoints if c.checkpoint_type == "external"]
    assert listed.tinker_path == external_path and listed.expires_at is not None
    assert_adapter_matches_server(trained, download(server_url, external_path, tmp_path))

"""The real `tinker` CLI (the SDK's console script, run as a subprocess) against a live server.

One test function per subcommand (or small group of them), each asserting on the CLI's JSON
output (`tinker --format json ...`) or on what it wrote. `trained` is one training run, made
with the SDK under this module's API key, with a training and a sampler checkpoint; tests that
change or delete a checkpoint save their own; the billing test uses a key of its own. To cover
another subcommand, add a test function that calls `cli.run(...)` / `cli.json(...)`
(tests/e2e/tinker_cli.py); `checkpoint download` has its own module, test_cli_download.py.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import tinker
from tinker import types
from tinker_cli import Cli

BASE_MODEL = "tuft/tiny-qwen3"
@dataclass(frozen=True)
class Trained:
    training: tinker.TrainingClient
    session_id: str
    run_id: str
    state_path: str
    sampler_path: str


@pytest.fixture(scope="module")
def api_key() -> str:
    return f"tml-cli-{uuid.uuid4().hex}"


@pytest.fixture
def cli(server_url: str, api_key: str, tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    home.mkdir()
    return Cli(server_url, api_key, home)


@pytest.fixture(scope="module")
def trained(server_url: str, api_key: str) -> Trained:
    service = tinker.ServiceClient(base_url=server_url, api_key=api_key)
    training = service.create_lora_training_client(base_model=BASE_MODEL, rank=8, seed=0).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={"target_tokens": [2, 3, 4, 5], "weights": [1.0] * 4},
    )
    training.forward_backward([datum], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    state_path = training.save_state("cli-state").result().path
    sampler_path = training.save_weights_for_sampler("cli-sampler").result().path
    return Trained(training, training.holder.get_session_id(), training.model_id, state_path, sampler_path)


def _checkpoint_paths(cli: Cli, run_id: str) -> list[str]:
    return [c["tinker_path"] for c in cli.json("checkpoint", "list", "--run-id", run_id)["checkpoints"]]


# ---- auth ------------------------------------------------------------------------------------


def test_auth_login_status_and_logout(cli: Cli) -> None:
    login = cli.run("auth", "login", stdin=cli.api_key + "\n", with_key=False)
    assert "Logged in as" in login.stdout
    stored = json.loads((cli.home / ".tinker" / "credentials.json").read_text())
    assert cli.api_key in json.dumps(stored), "the pasted key is the stored default credential"

    status = cli.run("auth", "status", with_key=False)
    assert "Credentials available: yes" in status.stdout and "Tinker accessible: yes" in status.stdout

    logout = cli.run("auth", "logout", with_key=False)
    assert "still active" in logout.stdout, "logging out of a pasted key only forgets it locally"
    assert cli.json("run", "list")["runs"] is not None, "and the key still works"


# ---- runs ------------------------------------------------------------------------------------


def test_run_list_and_info(cli: Cli, trained: Trained) -> None:
    runs = cli.json("run", "list")["runs"]
    assert [r["training_run_id"] for r in runs] == [trained.run_id]
    info = cli.json("run", "info", trained.run_id)
    assert (info["training_run_id"], info["base_model"], info["lora_rank"]) == (trained.run_id, BASE_MODEL, 8)
    assert info["last_checkpoint"]["tinker_path"] == trained.state_path
    assert info["last_sampler_checkpoint"]["tinker_path"] == trained.sampler_path


# ---- sessions --------------------------------------------------------------------------------


def test_session_export_trace(cli: Cli, trained: Trained) -> None:
    exported = cli.json("session", "export-trace", trained.session_id, "--output", "trace.json")
    destination = cli.home / exported["destination"]
    assert exported["destination"] == "trace.json" and exported["file_size_bytes"] == destination.stat().st_size
    trace = json.loads(destination.read_text())
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [e["name"] for e in slices][:5] == [
        "create_model", "forward_backward", "optim_step", "save_weights", "save_weights_for_sampler",
    ]  # fmt: skip
    assert all(e["args"]["outcome"] == "done" for e in slices)

    default_name = cli.run("session", "export-trace", trained.session_id)
    assert (cli.home / f"{trained.session_id}.pftrace").stat().st_size > 0, default_name.stdout
    url = cli.json("session", "export-trace", trained.session_id, "--url-only")["url"]
    assert url.startswith(cli.base_url) and "sig=" in url


# ---- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_list_and_info(cli: Cli, trained: Trained) -> None:
    assert _checkpoint_paths(cli, trained.run_id)[:2] == [trained.state_path, trained.sampler_path]
    everything = [c["tinker_path"] for c in cli.json("checkpoint", "list")["checkpoints"]]
    assert trained.state_path in everything and trained.sampler_path in everything
    info = cli.json("checkpoint", "info", trained.state_path)
    assert (info["tinker_path"], info["checkpoint_type"], info["lora_rank"]) == (trained.state_path, "training", 8)


def test_checkpoint_publish_and_unpublish(cli: Cli, trained: Trained) -> None:
    path = trained.training.save_weights_for_sampler("cli-published").result().path
    cli.run("checkpoint", "publish", path)
    assert cli.json("checkpoint", "info", path)["public"] is True
    cli.run("checkpoint", "unpublish", path)
    assert cli.json("checkpoint", "info", path)["public"] is False


def test_checkpoint_set_ttl(cli: Cli, trained: Trained) -> None:
    path = trained.training.save_weights_for_sampler("cli-ttl").result().path
    cli.run("checkpoint", "set-ttl", path, "--ttl", "7200")
    expires = datetime.fromisoformat(cli.json("checkpoint", "info", path)["expires_at"])
    assert 7000 < (expires - datetime.now(UTC)).total_seconds() <= 7200
    cli.run("checkpoint", "set-ttl", path, "--remove")
    assert cli.json("checkpoint", "info", path)["expires_at"] is None


def test_checkpoint_delete(cli: Cli, trained: Trained) -> None:
    path = trained.training.save_weights_for_sampler("cli-doomed").result().path
    assert path in _checkpoint_paths(cli, trained.run_id)
    cli.run("checkpoint", "delete", path, "--yes")
    assert path not in _checkpoint_paths(cli, trained.run_id)
    assert trained.state_path in _checkpoint_paths(cli, trained.run_id)


# ---- billing and the audit log ---------------------------------------------------------------


def test_billing_usage_and_checkpoint_storage_count_what_was_sent(server_url: str, tmp_path: Path) -> None:
    """A key of its own, so the usage the CLI shows is exactly what this test sent."""
    key = f"tml-billing-{uuid.uuid4().hex}"
    home = tmp_path / "home"
    home.mkdir()
    cli = Cli(server_url, key, home)
    service = tinker.ServiceClient(base_url=server_url, api_key=key)
    training = service.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=0).result()
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(list(range(1, n + 1))),
            loss_fn_inputs={"target_tokens": list(range(2, n + 2)), "weights": [1.0] * n},
        )
        for n in (5, 7)
    ]
    training.forward_backward(data, "cross_entropy").result()
    sampler = service.create_sampling_client(base_model=BASE_MODEL).result()
    prompt = types.ModelInput.from_ints([3, 4, 5, 6])
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=1)
    sampled = sampler.sample(prompt, num_samples=3, sampling_params=params).result()
    saved = training.save_weights_for_sampler("billed").result().path

    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start, end = (hour - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"), (hour + timedelta(hours=1)).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    report = cli.json("billing", "usage", start, end)
    tokens = {row["event_info"]["type"]: 0 for row in report["data"]}
    for row in report["data"]:
        tokens[row["event_info"]["type"]] += row["event_info"].get("token_count") or row["event_info"].get("count") or 0
    assert tokens["training"] == 12
    assert tokens["sampling_prefill"] == 4
    assert tokens["sampling_sample"] == sum(len(s.tokens) for s in sampled.sequences)
    assert tokens["checkpoint"] == 1 and "storage" in tokens
    assert set(report["sessions"]) == {training.holder.get_session_id()}
    cli.run("billing", "usage", start, end, "--csv", "usage.csv")
    assert (home / "usage.csv").read_text().splitlines()[0].startswith("bucket_start,")

    storage = cli.json("billing", "checkpoint-storage")["data"]
    listed = cli.json("checkpoint", "list", "--run-id", training.model_id)["checkpoints"]
    assert [(row["checkpoint_count"], row["size_bytes"]) for row in storage] == [(1, listed[0]["size_bytes"])]

    audit = tinker.AdminClient(base_url=server_url, api_key=key).get_audit_log("checkpoints").result()
    assert [(e.event, e.tinker_path) for e in audit.entries] == [("checkpoint_create", saved)]

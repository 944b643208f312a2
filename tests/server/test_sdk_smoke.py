"""The unmodified tinker SDK against the real HTTP stack (uvicorn) with the fake engine.

Catches wire-level mismatches (schemas, headers, protobuf, futures) without loading JAX; the
end-to-end test with the real engine lives in tests/e2e.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import tinker
import uvicorn
from tinker import types as T

from server.app import build_app
from server.config import ServerOptions


@pytest.fixture
def base_url(engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = build_app({engine.name: engine}, tmp_path / "checkpoints", options=ServerOptions(future_hold_s=5.0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_sdk_flow(base_url: str, engine) -> None:
    service = tinker.ServiceClient(base_url=base_url, api_key="tml-smoke")
    rest = tinker.RestClient(base_url=base_url, api_key="tml-smoke")
    caps = rest.get_server_capabilities().result()
    assert [m.model_name for m in caps.supported_models] == [engine.name]

    training = service.create_lora_training_client(base_model=engine.name, rank=4).result()
    assert training.get_info().model_data.tokenizer_id == engine.tokenizer_path
    datum = T.Datum(
        model_input=T.ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={"target_tokens": [2, 3, 4, 5], "weights": [1.0, 1.0, 1.0, 1.0]},
    )
    fwd = training.forward_backward([datum] * 3, "cross_entropy").result()
    assert fwd.metrics == {"loss:sum": 12.0} and len(fwd.loss_fn_outputs) == 3
    step = training.optim_step(T.AdamParams(learning_rate=0.1)).result()
    assert step.metrics == {"grad_norm:mean": 12.0}

    state_path = training.save_state("ckpt-1").result().path
    sampler_path = training.save_weights_for_sampler("s-1").result().path
    assert sampler_path.endswith("/sampler_weights/s-1")

    sampler = training.save_weights_and_get_sampling_client().result()
    params = T.SamplingParams(max_tokens=3, seed=1, stop=[9])
    result = sampler.sample(T.ModelInput.from_ints([5, 6]), num_samples=2, sampling_params=params).result()
    assert [s.tokens for s in result.sequences] == [[7, 8, 9]] * 2
    assert sampler.compute_logprobs(T.ModelInput.from_ints([5, 6, 7])).result() == [None, -1.0, -1.0]

    from_path = service.create_sampling_client(model_path=sampler_path).result()
    assert len(from_path.sample(T.ModelInput.from_ints([1]), 1, params).result().sequences) == 1

    restored = service.create_training_client_from_state_with_optimizer(state_path).result()
    assert restored.get_info().lora_rank == 4

    checkpoints = rest.list_checkpoints(training.model_id).result().checkpoints
    assert [c.checkpoint_id for c in checkpoints] == ["weights/ckpt-1", "sampler_weights/s-1"]
    assert rest.get_weights_info_by_tinker_path(state_path).result().lora_rank == 4
    rest.delete_checkpoint_from_tinker_path(sampler_path).result()

    with pytest.raises(tinker.BadRequestError):
        training.forward_backward([datum], "no_such_loss").result()
    assert training.optim_step(T.AdamParams()).result().metrics is not None
    service.close("success").result()
    session = rest.get_session(training.holder.get_session_id()).result()
    assert session.training_run_ids == [training.model_id, restored.model_id]


@pytest.mark.filterwarnings("ignore:RestClient.search_sessions is experimental")
def test_sdk_projects_copies_search_and_traces(base_url: str, engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """copy_weights, assign_session_project, search_sessions and export_session_trace as the SDK
    calls them and parses the answers; the trace URL downloads with a plain HTTP client."""
    service = tinker.ServiceClient(base_url=base_url, api_key="tml-smoke", project_id="proj-train")
    rest = tinker.RestClient(base_url=base_url, api_key="tml-smoke")
    training = service.create_lora_training_client(base_model=engine.name, rank=4).result()
    state_path = training.save_state("ckpt-1").result().path
    session_id = training.holder.get_session_id()

    copy_path = rest.copy_weights(state_path, "proj-archive", ttl_seconds=7200).result()
    archived = rest.list_training_runs(project_id="proj-archive").result().training_runs
    assert [r.last_checkpoint.tinker_path for r in archived] == [copy_path]
    monkeypatch.setenv("TINKER_PROJECT_ID", "proj-env")
    rest.copy_weights(state_path).result()
    assert len(rest.list_training_runs(project_id="proj-env").result().training_runs) == 1
    assert tinker.ServiceClient(base_url=base_url, api_key="tml-smoke", project_id="proj-svc").copy_weights(
        copy_path
    ).result().endswith("/weights/ckpt-1")

    assert [r.training_run_id for r in rest.list_training_runs(project_id="proj-train").result().training_runs] == [
        training.model_id
    ]
    rest.assign_session_project(session_id, "proj-moved").result()
    assert rest.list_training_runs(project_id="proj-train").result().training_runs == []
    page = rest.search_sessions(T.SessionSearchRequest(project_ids=["proj-moved"])).result()
    assert [(s.session_id, s.checkpoints_count) for s in page.sessions] == [(session_id, 1)]
    assert page.next_cursor is None

    url = rest.export_session_trace(session_id).result()
    with urllib.request.urlopen(url, timeout=10) as response:
        trace = json.loads(response.read())
    kinds = [e["name"] for e in trace["traceEvents"] if e["ph"] == "X"]
    assert kinds == ["create_model", "save_weights"]
    service.close("success").result()

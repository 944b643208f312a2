"""SIGTERM stops the real server within seconds: the running engine call finishes, a
long-poll held on a request that will not run before the exit (it waits for a lower seq_id)
is answered at once instead of after `future_hold_s`, and the process exits."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
from live_server import ServerProcess
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

BASE_MODEL = "tuft/tiny-qwen3"
HEADERS = {"X-API-Key": "tml-e2e-shutdown"}
ENGINE_CALL_S = 2.0

# `python -c LAUNCHER SIGNAL_DIR [tuft arguments]`: the real server, except that while
# SIGNAL_DIR/slow exists a forward_backward marks `in-forward`, takes ENGINE_CALL_S longer,
# and marks `forward-done` when it returns.
LAUNCHER = f"""
import sys, time
from pathlib import Path
from tuft_jax.engine import Engine
signals = Path(sys.argv.pop(1))
forward_backward = Engine.forward_backward
def slow_forward_backward(self, *args, **kwargs):
    slow = (signals / "slow").exists()
    if slow:
        (signals / "in-forward").touch()
        time.sleep({ENGINE_CALL_S})
    result = forward_backward(self, *args, **kwargs)
    if slow:
        (signals / "forward-done").touch()
    return result
Engine.forward_backward = slow_forward_backward
from server.cli import main
main()
"""


def _post(http: httpx.Client, path: str, body: dict) -> dict:
    response = http.post(f"/api/v1/{path}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _result(http: httpx.Client, request_id: str) -> httpx.Response:
    for _ in range(20):
        response = http.post("/api/v1/retrieve_future", json={"request_id": request_id})
        assert response.status_code == 200, response.text
        if response.headers["content-type"] == "application/x-protobuf" or response.json().get("type") != "try_again":
            return response
    raise AssertionError(f"request {request_id} never finished")


def _forward_backward(http: httpx.Client, model_id: str, seq_id: int) -> str:
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    fwd_input = types.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy")
    proto = forward_backward_request_to_proto(types.ForwardBackwardRequest(fwd_input, model_id=model_id, seq_id=seq_id))
    response = http.post(
        "/api/v1/forward_backward", content=proto.SerializeToString(), headers={"Content-Type": "application/x-protobuf"}
    )
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def test_sigterm_finishes_the_engine_call_and_exits_within_seconds(tmp_path: Path) -> None:
    signals = tmp_path / "signals"
    signals.mkdir()
    server = ServerProcess(tmp_path, launcher=["-c", LAUNCHER, str(signals)]).start()
    assert server.process is not None
    try:
        with httpx.Client(base_url=server.url, headers=HEADERS, timeout=60) as http:
            session_id = _post(http, "create_session", {"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"})["session_id"]
            created = _post(
                http,
                "create_model",
                {"session_id": session_id, "model_seq_id": 0, "base_model": BASE_MODEL, "lora_config": {"rank": 8}},
            )
            model_id = _result(http, created["request_id"]).json()["model_id"]
            _result(http, _forward_backward(http, model_id, 1))  # compiles, so the slow call below is all sleep
            (signals / "slow").touch()
            _forward_backward(http, model_id, 2)
            waiting = {"model_id": model_id, "seq_id": 4, "adam_params": {"learning_rate": 0.01}}  # 3 never comes
            queued = _post(http, "optim_step", waiting)
            deadline = time.monotonic() + 60
            while not (signals / "in-forward").exists():
                assert time.monotonic() < deadline, "the forward_backward never reached the engine"
                time.sleep(0.02)

            poll: dict[str, object] = {}

            def long_poll() -> None:
                with httpx.Client(base_url=server.url, headers=HEADERS, timeout=60) as poller:
                    try:
                        poll["response"] = poller.post("/api/v1/retrieve_future", json={"request_id": queued["request_id"]})
                    except httpx.TransportError as exc:
                        poll["response"] = exc
                poll["at"] = time.monotonic()

            poller = threading.Thread(target=long_poll)
            poller.start()
            time.sleep(0.3)  # the poll is now held by the server; the engine call runs ~1.7 s more
            sent = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            server.process.wait(timeout=30)
            exit_s = time.monotonic() - sent
            poller.join(timeout=30)
        print(f"SIGTERM -> exit in {exit_s:.2f} s; long-poll answered after {poll['at'] - sent:.2f} s")  # type: ignore[operator]
        assert (signals / "forward-done").exists(), "the running engine call was not allowed to finish"
        assert exit_s < 5.0
        assert poll["at"] - sent < 1.5  # type: ignore[operator]
        response = poll["response"]
        assert isinstance(response, httpx.Response) and response.status_code == 200, response
        assert response.json()["type"] == "try_again"
    finally:
        server.stop()

"""Hostile request bodies: size limits (413), zstd bombs, deep JSON (400), unreadable seq_ids.

Every refusal must be a JSON `{"detail": ...}` with a 4xx status, cost the server little
memory, and never leave a training run waiting forever.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import zstandard
from starlette.testclient import TestClient
from tinker import types as T
from tinker.proto.request_conv import forward_backward_request_to_proto

from live_server import free_port, wait_until_healthy

from server.http import MAX_JSON_DEPTH

API_KEY = "tml-test-key"
PROTO = {"Content-Type": "application/x-protobuf"}
SMALL_LIMITS = {"max_json_body_bytes": 2048, "max_sample_body_bytes": 8192, "max_forward_backward_bytes": 16384}


def fwd_body(model_id: str, seq_id: int) -> bytes:
    datum = T.Datum(
        model_input=T.ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={"target_tokens": [2, 3, 4, 0], "weights": [1.0] * 4},
    )
    fwd_input = T.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy")
    return forward_backward_request_to_proto(T.ForwardBackwardRequest(fwd_input, model_id=model_id, seq_id=seq_id)).SerializeToString()


def zstd_zeros(size: int) -> bytes:
    """`size` zero bytes as one zstd frame declaring its size (~32 KiB per GiB)."""
    compressor = zstandard.ZstdCompressor(level=1).compressobj(size=size)
    block = bytes(1 << 20)
    return b"".join(compressor.compress(block) for _ in range(size >> 20)) + compressor.flush()


def padded(body: bytes, size: int) -> bytes:
    """A JSON object `body` grown to `size` bytes by an unknown string field."""
    return body[:-1] + b',"pad":"' + b"x" * (size - len(body) - 9) + b'"}'


def streamed(body: bytes, piece: int = 1024) -> Iterator[bytes]:
    """The body in pieces: sent chunked, without a Content-Length."""
    for start in range(0, len(body), piece):
        yield body[start : start + piece]


def assert_too_large(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text
    assert "limit" in response.json()["detail"]


ROUTES = {
    "create_session": ("/api/v1/create_session", 2048, b'{"tags":[],"user_metadata":{},"sdk_version":"0.38.0"}'),
    "heartbeat": ("/api/v1/session_heartbeat", 2048, b'{"session_id":"s"}'),
    "create_model": ("/api/v1/create_model", 2048, b'{"session_id":"s","model_seq_id":0,"base_model":"b"}'),
    "optim_step": ("/api/v1/optim_step", 2048, b'{"model_id":"m","seq_id":1}'),
    "retrieve_future": ("/api/v1/retrieve_future", 2048, b'{"request_id":"r"}'),
    "weights_info": ("/api/v1/weights_info", 2048, b'{"tinker_path":"tinker://m/weights/w"}'),
    "telemetry": ("/api/v1/telemetry", 2048, b'{"events":[]}'),
    "asample": ("/api/v1/asample", 8192, b'{"sampling_session_id":"s","num_samples":1}'),
    "forward_backward": ("/api/v1/forward_backward", 16384, fwd_body("m", 1)),
}


@pytest.mark.parametrize("how", ["content-length", "chunked"])
@pytest.mark.parametrize("route", list(ROUTES))
def test_oversized_bodies_are_refused_per_route(make_client, engine, route: str, how: str) -> None:
    path, limit, small = ROUTES[route]
    big = padded(small, limit + 1) if small.startswith(b"{") else small + b"\0" * limit
    with make_client(engine, **SMALL_LIMITS) as client:
        response = client.post(path, content=big if how == "content-length" else streamed(big))
        if route == "telemetry" and how == "chunked":
            assert response.status_code == 200  # discarded unread: nothing is buffered
        else:
            assert_too_large(response)
        at_limit = client.post(path, content=padded(small, limit) if small.startswith(b"{") else small)
        assert at_limit.status_code != 413, at_limit.text


def test_default_limits_refuse_a_large_session_and_accept_large_sdk_requests(api, client: TestClient, engine) -> None:
    big = padded(b'{"tags":[],"user_metadata":{},"sdk_version":"0.38.0"}', (1 << 20) + 1)
    assert_too_large(client.post("/api/v1/create_session", content=big))
    engine.max_context_length = 1 << 20
    model_id = api.model(api.session())
    tokens = list(range(1, 8)) * 100_000  # one 700k-token datum: an 11 MB protobuf, which the SDK sends alone
    datum = T.Datum(
        model_input=T.ModelInput.from_ints(tokens),
        loss_fn_inputs={"target_tokens": tokens[1:] + [0], "weights": [1.0] * len(tokens)},
    )
    for seq_id, encoding in ((1, None), (2, "zstd")):
        fwd_input = T.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy")
        raw = forward_backward_request_to_proto(T.ForwardBackwardRequest(fwd_input, model_id=model_id, seq_id=seq_id))
        body = raw.SerializeToString()
        assert len(body) > 10 << 20
        headers = {**PROTO, "Content-Encoding": "zstd"} if encoding else PROTO
        response = client.post("/api/v1/forward_backward", content=zstandard.compress(body) if encoding else body, headers=headers)
        assert response.status_code == 200, response.text
        assert isinstance(api.result(response.json()["request_id"]), bytes)


def test_zstd_bomb_is_refused_and_the_model_moves_on(make_client, make_api, engine) -> None:
    with make_client(engine, seq_gap_timeout_s=0.3) as client:
        api = make_api(client)
        model_id = api.model(api.session())
        bomb = zstd_zeros(1 << 30)
        response = client.post("/api/v1/forward_backward", content=bomb, headers={**PROTO, "Content-Encoding": "zstd"})
        assert_too_large(response)
        assert "decompresses to more than" in response.json()["detail"]
        later = api.post("optim_step", {"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.1}})
        assert "metrics" in api.result(later["request_id"])


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_bodies(depth: int) -> dict[str, tuple[str, str]]:
    deep = nested(depth)
    return {
        "create_session user_metadata": (
            "/api/v1/create_session",
            f'{{"tags":[],"sdk_version":"0.38.0","user_metadata":{{"k":{deep}}}}}',
        ),
        "create_model user_metadata": (
            "/api/v1/create_model",
            f'{{"session_id":"s","model_seq_id":0,"base_model":"b","user_metadata":{{"k":{deep}}}}}',
        ),
        "optim_step optimizer_params (Any)": (
            "/api/v1/optim_step",
            f'{{"model_id":"m","seq_id":1,"optimizer_params":{{"k":{deep}}}}}',
        ),
        "asample target_prompt_logprobs (Any)": (
            "/api/v1/asample",
            f'{{"prompt":{{"chunks":[]}},"sampling_params":{{}},"target_prompt_logprobs":{{"k":{deep}}}}}',
        ),
        "heartbeat unknown field": ("/api/v1/session_heartbeat", f'{{"session_id":"s","extra":{deep}}}'),
        "retrieve_future nested objects": (
            "/api/v1/retrieve_future",
            '{"request_id":"r","x":' + '{"a":' * depth + "1" + "}" * (depth + 1),
        ),
        "weights_info unknown field": ("/api/v1/weights_info", f'{{"tinker_path":"tinker://m/weights/w","x":{deep}}}'),
    }


@pytest.mark.parametrize("depth", [100, 960, 1000, 100_000])
@pytest.mark.parametrize("case", list(nested_bodies(1)))
def test_deeply_nested_json_is_a_400(client: TestClient, case: str, depth: int) -> None:
    path, body = nested_bodies(depth)[case]
    response = client.post(path, content=body)
    assert response.status_code == 400, response.text
    assert "nested" in response.json()["detail"]


def test_nesting_limit_is_exact_and_ignores_brackets_in_strings(api, client: TestClient) -> None:
    def create_session(metadata: str) -> httpx.Response:
        return client.post("/api/v1/create_session", content=f'{{"tags":[],"sdk_version":"0.38.0","user_metadata":{metadata}}}')

    # user_metadata itself is level 2 (inside the body's object).
    assert create_session(f'{{"k":{nested(MAX_JSON_DEPTH - 2)}}}').status_code == 200
    refused = create_session(f'{{"k":{nested(MAX_JSON_DEPTH - 1)}}}')
    assert refused.status_code == 400 and f"more than {MAX_JSON_DEPTH} levels" in refused.json()["detail"]
    brackets_in_text = '"' + '[{\\\"' * 1000 + '"'
    assert create_session(f'{{"k":{brackets_in_text},"l":{nested(10)}}}').status_code == 200


def test_deep_training_body_still_consumes_its_seq_id(api, client: TestClient) -> None:
    model_id = api.model(api.session())
    later = api.post("optim_step", {"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.1}})
    body = f'{{"model_id":"{model_id}","seq_id":1,"adam_params":{{"learning_rate":0.1}},"optimizer_params":{{"k":{nested(100)}}}}}'
    refused = client.post("/api/v1/optim_step", content=body)
    assert refused.status_code == 400 and "nested" in refused.json()["detail"]
    assert "metrics" in api.result(later["request_id"])


@pytest.mark.parametrize(
    ("name", "body", "encoding"),
    [
        ("truncated protobuf", lambda model_id: fwd_body(model_id, 1)[:-5], None),
        ("truncated zstd", lambda model_id: zstandard.compress(fwd_body(model_id, 1))[:-4], "zstd"),
        ("plain body labelled zstd", lambda model_id: fwd_body(model_id, 1), "zstd"),
    ],
)
def test_unreadable_seq_id_is_skipped_after_the_gap_timeout(
    make_client, make_api, engine, name: str, body: Callable[[str], bytes], encoding: str | None
) -> None:
    with make_client(engine, seq_gap_timeout_s=0.5) as client:
        api = make_api(client)
        model_id = api.model(api.session())
        headers = {**PROTO, **({"Content-Encoding": encoding} if encoding else {})}
        bad = client.post("/api/v1/forward_backward", content=body(model_id), headers=headers)
        assert bad.status_code == 400 and bad.json()["detail"]
        started = time.monotonic()
        later = client.post("/api/v1/forward_backward", content=fwd_body(model_id, 2), headers=PROTO)
        assert later.status_code == 200, later.text
        assert isinstance(api.result(later.json()["request_id"]), bytes)
        assert 0.4 < time.monotonic() - started < 5
        late = client.post("/api/v1/forward_backward", content=fwd_body(model_id, 1), headers=PROTO)
        assert late.status_code == 400 and "was skipped" in late.json()["detail"]


SERVER = """
import sys
from pathlib import Path
sys.path.insert(0, {tests_server!r})
import uvicorn
from conftest import FAST_OPTIONS, FakeEngine
from server.app import build_app
engine = FakeEngine()
app = build_app({{engine.name: engine}}, Path(sys.argv[2]), options=FAST_OPTIONS)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


class Memory:
    """RSS of another process, and its peak since the last `reset_peak` (where Linux allows)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def _status(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) << 10
        raise KeyError(field)

    def rss(self) -> int:
        return self._status("VmRSS")

    def peak(self) -> int:
        return self._status("VmHWM")

    def reset_peak(self) -> bool:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[tuple[str, Memory]]:
    port = free_port()
    code = SERVER.format(tests_server=str(Path(__file__).resolve().parent))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen([sys.executable, "-c", code, str(port), str(tmp_path)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, timeout=60)
        yield url, Memory(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=20)


MIB = 1 << 20


def test_a_refused_request_costs_the_server_little_memory(live_server: tuple[str, Memory]) -> None:
    url, memory = live_server
    headers = {"X-API-Key": API_KEY}
    bomb = zstd_zeros(1 << 30)
    huge = b'{"tags":[],"user_metadata":{},"pad":"' + b"x" * (50 * MIB) + b'"}'
    refusals = {
        "zstd bomb": dict(url=f"{url}/api/v1/forward_backward", content=bomb, headers={**headers, **PROTO, "Content-Encoding": "zstd"}),
        "50 MB create_session": dict(url=f"{url}/api/v1/create_session", content=huge, headers=headers),
        "50 MB create_session, chunked": dict(url=f"{url}/api/v1/create_session", content=streamed(huge, 1 << 16), headers=headers),
        "48 MiB forward_backward, chunked": dict(
            url=f"{url}/api/v1/forward_backward", content=streamed(bytes(48 * MIB), 1 << 16), headers={**headers, **PROTO}
        ),
    }
    with httpx.Client(timeout=60) as http:
        http.post(f"{url}/api/v1/create_session", json={"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"}, headers=headers)
        for name, request in refusals.items():
            before = memory.rss()
            peak_known = memory.reset_peak()
            try:
                response = http.post(**request)
                assert response.status_code == 413, (name, response.text)
                assert response.json()["detail"]
            except httpx.TransportError as exc:
                # The server answered 413 and closed the connection while this client was still sending.
                print(f"{name}: {exc!r}")
                assert name != "zstd bomb"
            time.sleep(0.2)
            growth = memory.rss() - before
            peak_growth = memory.peak() - before if peak_known else growth
            print(f"{name}: RSS growth {growth / MIB:.1f} MiB, peak growth {peak_growth / MIB:.1f} MiB")
            assert growth < 64 * MIB, name
            assert peak_growth < 64 * MIB, name
        assert http.get(f"{url}/api/v1/healthz").status_code == 200

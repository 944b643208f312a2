"""The protobuf codec against the real tinker SDK's encoders and decoders."""

from __future__ import annotations

import math
import random
import re
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
import torch
import zstandard
from tinker import types as T
from tinker.proto import tinker_public_pb2 as sdk_pb
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import (
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

from server.errors import PayloadTooLarge
from server.wire import tinker_public_pb2 as pb
from server.wire.proto_codec import (
    BadForwardBackwardRequest,
    decode_forward_backward_request,
    encode_forward_backward_output,
    encode_sample_response,
)
from tuft_jax.errors import InputError
from tuft_jax.types import SampledSequence, SampleResult


def _sdk_body(
    data: list[T.Datum],
    loss_fn: str = "cross_entropy",
    loss_fn_config: dict[str, float | str] | None = None,
    forward_only: bool = False,
) -> bytes:
    """Serialize exactly as tinker.resources.training.forward_backward does."""
    request = T.ForwardBackwardRequest(
        forward_backward_input=T.ForwardBackwardInput(
            data=data, loss_fn=loss_fn, loss_fn_config=loss_fn_config
        ),
        model_id="sess:train:0",
        seq_id=7,
    )
    msg = forward_backward_request_to_proto(request)
    msg.forward_only = forward_only
    return msg.SerializeToString()


def _simple_datum(n: int = 4) -> T.Datum:
    return T.Datum(
        model_input=T.ModelInput.from_ints(list(range(1, n + 1))),
        loss_fn_inputs={"target_tokens": list(range(2, n + 2)), "weights": [1.0] * n},
    )


def test_descriptor_is_identical_to_the_sdks() -> None:
    # Both modules register "tinker_public.proto" in the default pool: any drift makes
    # importing them together fail, and would mean our bytes no longer match the SDK's.
    assert pb.DESCRIPTOR.serialized_pb == sdk_pb.DESCRIPTOR.serialized_pb


def test_request_round_trip_through_sdk_encoder() -> None:
    sparse_targets = torch.zeros(6, 5, dtype=torch.int64)
    sparse_targets[0, 1] = 11
    sparse_targets[3, 4] = 12
    sparse_weights = torch.zeros(6, 5, dtype=torch.float32)
    sparse_weights[5, 0] = 0.5
    dense_2d = torch.arange(12, dtype=torch.float32).reshape(6, 2) / 3
    bf16 = torch.tensor([0.1, -2.5, 3.0e5], dtype=torch.bfloat16)
    data = [
        _simple_datum(4),
        T.Datum(
            model_input=T.ModelInput(
                chunks=[T.EncodedTextChunk(tokens=[5, 6]), T.EncodedTextChunk(tokens=[7, 8, 9, 10])]
            ),
            loss_fn_inputs={
                "target_tokens": sparse_targets,
                "weights": sparse_weights,
                "advantages": np.linspace(-1, 1, 6, dtype=np.float32),
                "logprobs": dense_2d,
                "ratio": bf16,
            },
        ),
    ]
    assert data[1].loss_fn_inputs["target_tokens"].sparse_crow_indices is not None
    assert data[1].loss_fn_inputs["weights"].sparse_crow_indices is not None

    call = decode_forward_backward_request(
        _sdk_body(data, "ppo", {"clip_low_threshold": 0.8, "loss_id": "abc"}, forward_only=True),
        None,
    )

    assert (call.model_id, call.seq_id, call.loss_fn, call.forward_only) == (
        "sess:train:0",
        7,
        "ppo",
        True,
    )
    assert call.loss_fn_config == {"clip_low_threshold": pytest.approx(0.8), "loss_id": "abc"}
    first, second = call.data
    assert first.tokens.dtype == np.int32 and first.tokens.tolist() == [1, 2, 3, 4]
    assert first.loss_inputs["target_tokens"].dtype == np.int64
    assert first.loss_inputs["target_tokens"].tolist() == [2, 3, 4, 5]
    assert first.loss_inputs["weights"].dtype == np.float32
    assert second.tokens.tolist() == [5, 6, 7, 8, 9, 10]
    np.testing.assert_array_equal(second.loss_inputs["target_tokens"], sparse_targets.numpy())
    assert second.loss_inputs["target_tokens"].dtype == np.int64
    np.testing.assert_array_equal(second.loss_inputs["weights"], sparse_weights.numpy())
    np.testing.assert_array_equal(
        second.loss_inputs["advantages"], np.linspace(-1, 1, 6, dtype=np.float32)
    )
    np.testing.assert_array_equal(second.loss_inputs["logprobs"], dense_2d.numpy())
    np.testing.assert_array_equal(second.loss_inputs["ratio"], bf16.float().numpy())


def test_v2_config_wins_and_legacy_fills_the_gaps() -> None:
    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(_sdk_body([_simple_datum()], "ppo", {"a": 1.5, "b": "text"}))
    msg.loss_fn_config["a"] = 9.0
    msg.loss_fn_config["legacy_only"] = 2.5
    config = decode_forward_backward_request(msg.SerializeToString(), None).loss_fn_config
    assert config == {"a": 1.5, "b": "text", "legacy_only": 2.5}
    msg.ClearField("loss_fn_config_v2")
    config = decode_forward_backward_request(msg.SerializeToString(), None).loss_fn_config
    assert config == {"a": 9.0, "legacy_only": 2.5}


def test_int32_and_bfloat16_tensors_widen_exactly() -> None:
    bf16 = torch.tensor([[1.5, -0.0078125], [3.0e38, float("inf")]], dtype=torch.bfloat16)
    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(_sdk_body([_simple_datum(2)]))
    inputs = msg.data[0].loss_fn_inputs
    inputs["target_tokens"].CopyFrom(
        pb.Tensor(dense=np.array([3, -4], "<i4").tobytes(), dtype=pb.DTYPE_INT32, shape=[2])
    )
    inputs["weights"].CopyFrom(
        pb.Tensor(
            dense=bf16.view(torch.int16).numpy().tobytes(), dtype=pb.DTYPE_BFLOAT16, shape=[2, 2]
        )
    )
    datum = decode_forward_backward_request(msg.SerializeToString(), None).data[0]
    assert datum.loss_inputs["target_tokens"].dtype == np.int64
    assert datum.loss_inputs["target_tokens"].tolist() == [3, -4]
    assert datum.loss_inputs["weights"].dtype == np.float32
    np.testing.assert_array_equal(datum.loss_inputs["weights"], bf16.float().numpy())


def test_shapeless_dense_tensor_is_one_dimensional() -> None:
    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(_sdk_body([_simple_datum(3)]))
    msg.data[0].loss_fn_inputs["weights"].ClearField("shape")
    weights = decode_forward_backward_request(msg.SerializeToString(), None).data[0].loss_inputs[
        "weights"
    ]
    assert weights.shape == (3,)


def _zstd_without_content_size(raw: bytes) -> bytes:
    compressor = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    return compressor.compress(raw) + compressor.flush()


@pytest.mark.parametrize(
    "compress",
    [
        zstandard.ZstdCompressor().compress,
        _zstd_without_content_size,
        lambda raw: zstandard.compress(raw[:10]) + zstandard.compress(raw[10:]),
    ],
    ids=["sdk-frame", "no-content-size", "two-frames"],
)
def test_zstd_body(compress: Callable[[bytes], bytes]) -> None:
    raw = _sdk_body([_simple_datum(), _simple_datum(6)])
    plain = decode_forward_backward_request(raw, None)
    packed = decode_forward_backward_request(compress(raw), "zstd")
    assert [d.tokens.tolist() for d in packed.data] == [d.tokens.tolist() for d in plain.data]
    assert packed.data[1].loss_inputs["weights"].tolist() == [1.0] * 6


@pytest.mark.parametrize(
    ("body", "encoding", "message"),
    [
        (zstandard.compress(b"x" * 64)[:-3], "zstd", "truncated"),
        (b"", "zstd", "truncated"),
        (b"definitely not zstd", "zstd", "not valid zstd data"),
        (b"", "gzip", "unsupported Content-Encoding 'gzip'"),
        (_sdk_body([_simple_datum()]), "zstd", "not valid zstd data"),
    ],
    ids=["truncated", "empty", "garbage", "gzip", "plain-body-labelled-zstd"],
)
def test_bad_bodies(body: bytes, encoding: str, message: str) -> None:
    with pytest.raises(BadForwardBackwardRequest, match=re.escape(message)) as raised:
        decode_forward_backward_request(body, encoding, max_decompressed_bytes=1 << 16)
    assert (raised.value.model_id, raised.value.seq_id) == (None, None)


def zstd_zeros(size: int, *, declare_size: bool) -> bytes:
    """`size` zero bytes as one zstd frame (~32 KiB per GiB), without holding them in memory."""
    compressor = zstandard.ZstdCompressor(level=1).compressobj(size=size if declare_size else -1)
    block = bytes(1 << 20)
    return b"".join(compressor.compress(block) for _ in range(size >> 20)) + compressor.flush()


@pytest.mark.parametrize("declare_size", [True, False], ids=["declared-1GiB", "undeclared"])
def test_zstd_bomb_stops_near_the_limit(declare_size: bool) -> None:
    bomb = zstd_zeros(1 << 30, declare_size=declare_size)
    limit = 8 << 20
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge, match=f"more than {limit} bytes"):
            decode_forward_backward_request(bomb, "zstd", max_decompressed_bytes=limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit + (8 << 20)


def test_body_exactly_at_the_limit_is_accepted() -> None:
    raw = _sdk_body([_simple_datum(), _simple_datum(6)])
    call = decode_forward_backward_request(zstandard.compress(raw), "zstd", max_decompressed_bytes=len(raw))
    assert len(call.data) == 2
    with pytest.raises(PayloadTooLarge):
        decode_forward_backward_request(zstandard.compress(raw), "zstd", max_decompressed_bytes=len(raw) - 1)


def test_refusal_after_parsing_carries_the_envelope_ids() -> None:
    msg = _valid()
    msg.data[0].model_input[0].encoded_text.tokens = b"\x01\x02\x03"
    with pytest.raises(BadForwardBackwardRequest, match="not a whole number") as raised:
        decode_forward_backward_request(zstandard.compress(msg.SerializeToString()), "zstd")
    assert (raised.value.model_id, raised.value.seq_id) == ("sess:train:0", 7)
    del msg.data[:]
    with pytest.raises(BadForwardBackwardRequest, match="no data") as raised:
        decode_forward_backward_request(msg.SerializeToString(), None)
    assert raised.value.seq_id == 7


def _valid() -> pb.ForwardBackwardRequest:
    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(_sdk_body([_simple_datum(4), _simple_datum(4)]))
    return msg


def _sparse(shape: list[int], crow: list[int], col: list[int], values: list[float]) -> pb.Tensor:
    return pb.Tensor(
        dtype=pb.DTYPE_FLOAT32,
        shape=shape,
        sparse_csr=pb.SparseCsr(
            values=np.array(values, "<f4").tobytes(),
            crow_indices=np.array(crow, "<i8").tobytes(),
            col_indices=np.array(col, "<i8").tobytes(),
        ),
    )


def _set_weights(tensor: pb.Tensor) -> Callable[[pb.ForwardBackwardRequest], None]:
    def mutate(msg: pb.ForwardBackwardRequest) -> None:
        msg.data[1].loss_fn_inputs["weights"].CopyFrom(tensor)

    return mutate


def _add_chunk(chunk: pb.Chunk) -> Callable[[pb.ForwardBackwardRequest], None]:
    def mutate(msg: pb.ForwardBackwardRequest) -> None:
        msg.data[1].model_input.append(chunk)

    return mutate


def _set_tokens(tokens: bytes) -> Callable[[pb.ForwardBackwardRequest], None]:
    def mutate(msg: pb.ForwardBackwardRequest) -> None:
        msg.data[1].model_input[0].encoded_text.tokens = tokens

    return mutate


_W = "datum 1: loss_fn_inputs['weights']"
_MALFORMED: dict[str, tuple[Callable[[pb.ForwardBackwardRequest], None], str]] = {
    "no-data": (lambda m: m.ClearField("data"), "request has no data"),
    "empty-config-value": (
        lambda m: m.loss_fn_config_v2["eps"].Clear(),
        "loss_fn_config['eps'] has neither a number nor a text value",
    ),
    "image-chunk": (
        _add_chunk(pb.Chunk(image=pb.ImageChunk(data=b"png", format="png"))),
        "datum 1: model_input chunk 1 is of type image; only encoded_text chunks",
    ),
    "dmel-chunk": (
        _add_chunk(pb.Chunk(dmel=pb.DmelChunk(dmel=b"\x01"))),
        "datum 1: model_input chunk 1 is of type dmel",
    ),
    "empty-chunk": (_add_chunk(pb.Chunk()), "datum 1: model_input chunk 1 has no content"),
    "ragged-token-bytes": (
        _set_tokens(b"\x01\x00\x00\x00\x02"),
        "datum 1: model_input chunk 0 has 5 token bytes, not a whole number of int32 tokens",
    ),
    "no-tokens": (_set_tokens(b""), "datum 1: model_input has no tokens"),
    "dense-too-short": (
        _set_weights(pb.Tensor(dense=b"\0" * 12, dtype=pb.DTYPE_FLOAT32, shape=[4])),
        f"{_W} has 12 bytes, expected 4 float32 values for shape [4]",
    ),
    "dense-2d-mismatch": (
        _set_weights(pb.Tensor(dense=b"\0" * 48, dtype=pb.DTYPE_INT64, shape=[2, 4])),
        f"{_W} has 48 bytes, expected 8 int64 values for shape [2, 4]",
    ),
    "shapeless-ragged": (
        _set_weights(pb.Tensor(dense=b"\0" * 6, dtype=pb.DTYPE_FLOAT32)),
        f"{_W} has 6 bytes, not a whole number of float32 values",
    ),
    "dtype-unspecified": (
        _set_weights(pb.Tensor(dense=b"\0" * 16, shape=[4])),
        f"{_W} has dtype DTYPE_UNSPECIFIED; expected FLOAT32, INT64, INT32 or BFLOAT16",
    ),
    "dtype-unknown": (
        _set_weights(pb.Tensor(dense=b"\0" * 16, dtype=9, shape=[4])),  # type: ignore[arg-type]
        f"{_W} has dtype 9",
    ),
    "negative-dim": (
        _set_weights(pb.Tensor(dense=b"", dtype=pb.DTYPE_FLOAT32, shape=[-1, 4])),
        f"{_W} has a negative dimension in shape [-1, 4]",
    ),
    "sparse-1d": (
        _set_weights(_sparse([4], [0, 1], [0], [1.0])),
        f"{_W} is sparse CSR with shape [4]; sparse tensors must be 2-D",
    ),
    "sparse-huge": (
        _set_weights(_sparse([1 << 20, 1 << 20], [0], [], [])),
        f"{_W} has shape [1048576, 1048576], more than",
    ),
    "sparse-crow-count": (
        _set_weights(_sparse([2, 2], [0, 1], [0], [1.0])),
        f"{_W} has 2 CSR crow_indices, expected 3 (rows + 1) for shape [2, 2]",
    ),
    "sparse-crow-order": (
        _set_weights(_sparse([2, 2], [0, 2, 1], [0], [1.0])),
        f"{_W} has invalid CSR crow_indices",
    ),
    "sparse-crow-end": (
        _set_weights(_sparse([2, 2], [0, 1, 1], [0, 1], [1.0, 2.0])),
        "end at 2 (the number of col_indices)",
    ),
    "sparse-crow-bytes": (
        _set_weights(
            pb.Tensor(
                dtype=pb.DTYPE_FLOAT32,
                shape=[1, 1],
                sparse_csr=pb.SparseCsr(crow_indices=b"\0" * 12),
            )
        ),
        f"{_W} CSR crow_indices has 12 bytes, not a whole number of int64 values",
    ),
    "sparse-col-range": (
        _set_weights(_sparse([2, 2], [0, 1, 2], [0, 2], [1.0, 2.0])),
        f"{_W} has CSR col_indices outside [0, 2) for shape [2, 2]",
    ),
    "sparse-values-count": (
        _set_weights(_sparse([2, 2], [0, 1, 2], [0, 1], [1.0])),
        f"{_W} has 4 CSR value bytes, expected 2 float32 values (one per col_index)",
    ),
}


@pytest.mark.parametrize("case", list(_MALFORMED))
def test_malformed_request(case: str) -> None:
    mutate, message = _MALFORMED[case]
    msg = _valid()
    msg.loss_fn_config_v2["eps"].number = 0.1
    mutate(msg)
    with pytest.raises(InputError, match=re.escape(message)):
        decode_forward_backward_request(msg.SerializeToString(), None)


@pytest.mark.parametrize(
    "body",
    [b"\xff\xff\xff\xff", b"\x0a\x02\xff\xfe", b"\x1a\x05\x0a"],
    ids=["bad-tag", "bad-utf8-model-id", "truncated-datum"],
)
def test_invalid_protobuf(body: bytes) -> None:
    with pytest.raises(InputError, match="not a valid ForwardBackwardRequest protobuf"):
        decode_forward_backward_request(body, None)


def test_corrupted_bodies_only_ever_raise_input_error() -> None:
    raw = _sdk_body([_simple_datum(4), _simple_datum(5)])
    rng = random.Random(0)
    for _ in range(500):
        body = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        body = body[: rng.randint(0, len(body))] if rng.random() < 0.3 else body
        try:
            decode_forward_backward_request(bytes(body), None)
        except InputError:
            pass


def _records(body: bytes) -> list[pb.ArrayRecord]:
    msg = pb.ForwardBackwardOutput()
    msg.ParseFromString(body)
    return list(msg.loss_fn_outputs)


def test_output_round_trip_through_sdk_decoder() -> None:
    outputs = [
        {"logprobs": np.array([-0.5, -1.25], np.float32), "topk": np.zeros((2, 3), np.int32)},
        {"logprobs": np.array([-2.0, -3.0, -4.0], np.float64), "topk": np.ones((3, 3), np.int64)},
        {"logprobs": np.array([-7.0], np.float32), "topk": np.full((1, 5), 9, np.int64)},
        {"logprobs": np.array([np.nan], np.float32), "topk": np.full((1, 5), 8, np.int64)},
    ]
    body = encode_forward_backward_output(outputs, {"loss:sum": 3.5, "ntokens:sum": 7})

    assert [record.num_datums for record in _records(body)] == [2, 2]
    decoded = deserialize_forward_backward_output(body)
    assert decoded.loss_fn_output_type == "ArrayRecord"
    assert decoded.metrics == {"loss:sum": 3.5, "ntokens:sum": 7.0}
    assert len(decoded.loss_fn_outputs) == len(outputs)
    for sent, got in zip(outputs, decoded.loss_fn_outputs, strict=True):
        assert got["logprobs"].dtype == "float32" and got["topk"].dtype == "int64"
        for name, array in sent.items():
            assert got[name].shape == list(array.shape)
            np.testing.assert_array_equal(
                got[name].to_numpy(), array.astype(got[name].to_numpy().dtype)
            )


def test_output_dtype_change_splits_records() -> None:
    outputs = [{"x": np.array([1, 2], np.int64)}, {"x": np.array([0.5], np.float32)}]
    body = encode_forward_backward_output(outputs, {})
    assert [record.num_datums for record in _records(body)] == [1, 1]
    decoded = deserialize_forward_backward_output(body).loss_fn_outputs
    assert (decoded[0]["x"].dtype, decoded[0]["x"].data) == ("int64", [1, 2])
    assert (decoded[1]["x"].dtype, decoded[1]["x"].data) == ("float32", [0.5])


def test_output_without_fields_keeps_the_datum_count() -> None:
    assert deserialize_forward_backward_output(
        encode_forward_backward_output([{}] * 3, {})
    ).loss_fn_outputs == [{}, {}, {}]
    assert deserialize_forward_backward_output(
        encode_forward_backward_output([], {"loss:sum": 0.0})
    ).loss_fn_outputs == []


@pytest.mark.parametrize(
    ("outputs", "metrics", "message"),
    [
        ([], {"loss": 1.0}, "metric 'loss' must be named 'name:reduction'"),
        ([], {"a:b:sum": 1.0}, "metric 'a:b:sum'"),
        ([{"a": np.zeros(1)}, {"b": np.zeros(1)}], {}, "same field names"),
        ([{"a": np.array(["x"])}], {}, "cannot send an output of dtype <U1"),
    ],
)
def test_output_encoder_rejects_what_the_client_cannot_read(
    outputs: list[dict[str, np.ndarray]], metrics: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        encode_forward_backward_output(outputs, metrics)


def test_sample_response_round_trip_through_sdk_decoder() -> None:
    result = SampleResult(
        sequences=[
            SampledSequence(tokens=[5, 6, 7], logprobs=[-0.1, -0.2, -0.3], stop_reason="stop"),
            SampledSequence(tokens=[8, 9], logprobs=[-1.5, -2.5], stop_reason="length"),
        ],
        prompt_logprobs=[math.nan, -1.0, -2.0],
        topk_prompt_logprobs=[[], [(4, -0.5), (3, -1.5)], [(2, -0.25)]],
    )
    decoded = deserialize_sample_response(encode_sample_response(result))

    assert [s.stop_reason for s in decoded.sequences] == ["stop", "length"]
    assert [s.tokens for s in decoded.sequences] == [[5, 6, 7], [8, 9]]
    assert decoded.sequences[0].logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert decoded.sequences[1].logprobs == [-1.5, -2.5]
    assert math.isnan(decoded.prompt_logprobs_np[0])
    assert decoded.prompt_logprobs == [None, -1.0, -2.0]
    assert decoded.topk_prompt_logprobs == [None, [(4, -0.5), (3, -1.5)], [(2, -0.25)]]
    assert decoded.topk_prompt_logprobs_np.token_ids.shape == (3, 2)


def test_sample_response_without_optional_parts() -> None:
    result = SampleResult(sequences=[SampledSequence(tokens=[], logprobs=[], stop_reason="length")])
    decoded = deserialize_sample_response(encode_sample_response(result))
    assert decoded.sequences[0].tokens == [] and decoded.sequences[0].logprobs is None
    assert decoded.prompt_logprobs is None and decoded.topk_prompt_logprobs is None


def test_sample_response_rejects_unknown_stop_reason() -> None:
    bad = SampledSequence(tokens=[1], logprobs=[0.0], stop_reason="eos")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown stop reason 'eos'"):
        encode_sample_response(SampleResult(sequences=[bad]))

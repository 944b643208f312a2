"""Binary (protobuf) wire format of the Tinker SDK: forward_backward requests in, results out.

Decoding is strict because the body comes from the network: every malformed input raises
`InputError` naming the datum and field, so the client gets a 400 it can act on instead of
a 500. Encoding mirrors what `tinker.proto.response_conv` expects to read.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import zstandard
from google.protobuf.message import DecodeError

from server.config import MAX_FORWARD_BACKWARD_BYTES
from server.errors import PayloadTooLarge
from server.wire import tinker_public_pb2 as pb
from tuft_jax.errors import InputError
from tuft_jax.types import Datum, SampleResult

MAX_SPARSE_CELLS = 1 << 28
"""Largest dense size a sparse CSR input may expand to (its shape is not bounded by the body)."""

_ZSTD_MAX_RATIO = 1 << 16
"""Bound (with 2x margin) on zstd's output per input byte: a 4-byte RLE block yields 128 KiB."""
_ZSTD_MIN_FEED_BYTES = 64
"""Smallest step, near the limit: the output overshoots the limit by at most 4 MiB."""

_TOPK_PAD_TOKEN = 0
_TOPK_PAD_LOGPROB = -99999.0

_STOP_REASONS: dict[str, int] = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}


class BadForwardBackwardRequest(InputError):
    """A refused body, with the envelope's (model_id, seq_id) when the protobuf parsed, so the
    route can consume that seq_id and the model's later requests need not wait for it."""

    def __init__(self, message: str, model_id: str | None = None, seq_id: int | None = None) -> None:
        super().__init__(message)
        self.model_id = model_id
        self.seq_id = seq_id


@dataclass(frozen=True)
class ForwardBackwardCall:
    """A decoded forward_backward (or forward) request, ready for the engine."""

    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float | str]
    forward_only: bool
    data: list[Datum]


@dataclass(frozen=True)
class _WireDtype:
    """How one proto DType is laid out on the wire and widened for the engine."""

    name: str
    wire: np.dtype
    widen: Callable[[np.ndarray], np.ndarray]


def _widen_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32, so shifting the bits up is exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


_WIRE_DTYPES: dict[int, _WireDtype] = {
    pb.DTYPE_FLOAT32: _WireDtype("float32", np.dtype("<f4"), lambda a: a.astype(np.float32)),
    pb.DTYPE_INT64: _WireDtype("int64", np.dtype("<i8"), lambda a: a.astype(np.int64)),
    pb.DTYPE_INT32: _WireDtype("int32", np.dtype("<i4"), lambda a: a.astype(np.int64)),
    pb.DTYPE_BFLOAT16: _WireDtype("bfloat16", np.dtype("<u2"), _widen_bfloat16),
}
_INDEX = _WIRE_DTYPES[pb.DTYPE_INT64]


def decode_forward_backward_request(
    body: bytes,
    content_encoding: str | None,
    *,
    max_decompressed_bytes: int = MAX_FORWARD_BACKWARD_BYTES,
) -> ForwardBackwardCall:
    """Parse a (possibly zstd-compressed) `ForwardBackwardRequest` body.

    Raises `PayloadTooLarge` past `max_decompressed_bytes` and `BadForwardBackwardRequest`
    for anything malformed.
    """
    try:
        raw = _decompress(body, content_encoding, max_decompressed_bytes)
    except InputError as exc:
        raise BadForwardBackwardRequest(str(exc)) from exc
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(raw)
    except DecodeError as exc:
        raise BadForwardBackwardRequest(
            f"request body is not a valid ForwardBackwardRequest protobuf: {exc}"
        ) from exc
    try:
        if not msg.data:
            raise InputError("request has no data: forward_backward needs at least one datum")
        return ForwardBackwardCall(
            model_id=msg.model_id,
            seq_id=msg.seq_id,
            loss_fn=msg.loss_fn,
            loss_fn_config=_loss_fn_config(msg),
            forward_only=msg.forward_only,
            data=[_decode_datum(i, datum) for i, datum in enumerate(msg.data)],
        )
    except InputError as exc:
        raise BadForwardBackwardRequest(str(exc), msg.model_id, msg.seq_id) from exc


def _decompress(body: bytes, content_encoding: str | None, limit: int) -> bytes | bytearray:
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding != "zstd":
        raise InputError(f"unsupported Content-Encoding {content_encoding!r}: send zstd or nothing")
    try:
        return _zstd_decompress(body, limit)
    except zstandard.ZstdError as exc:
        raise InputError(f"request body is not valid zstd data: {exc}") from exc


def _zstd_decompress(body: bytes, limit: int) -> bytearray:
    """Decompress every frame in steps; unlike `stream_reader`, this notices truncation.

    Frames need not declare their content size, so the limit is enforced on the output.
    Each step feeds only as many bytes as can expand into the room left under the limit (at
    least a minimal step), so a bomb stops a few MiB past the limit.
    """
    view = memoryview(body)
    out = bytearray()
    pos = 0
    while True:
        frame = zstandard.ZstdDecompressor().decompressobj()
        while not frame.eof:
            if pos >= len(view):
                raise InputError("zstd request body is truncated: its last frame is incomplete")
            feed = max(_ZSTD_MIN_FEED_BYTES, (limit - len(out)) // _ZSTD_MAX_RATIO)
            end = min(pos + feed, len(view))
            out += frame.decompress(view[pos:end])
            pos = end
            if len(out) > limit:
                raise PayloadTooLarge(f"request body decompresses to more than {limit} bytes, the limit of forward_backward")
        pos -= len(frame.unused_data)
        if pos >= len(view):
            return out


def _loss_fn_config(msg: pb.ForwardBackwardRequest) -> dict[str, float | str]:
    """Numbers come from the legacy map and the v2 map alike; v2 wins and alone carries strings."""
    config: dict[str, float | str] = dict(msg.loss_fn_config)
    for key, value in msg.loss_fn_config_v2.items():
        kind = value.WhichOneof("value")
        if kind == "number":
            config[key] = float(value.number)
        elif kind == "text":
            config[key] = value.text
        else:
            raise InputError(f"loss_fn_config[{key!r}] has neither a number nor a text value")
    return config


def _decode_datum(index: int, datum: pb.Datum) -> Datum:
    where = f"datum {index}"
    pieces: list[np.ndarray] = []
    for j, chunk in enumerate(datum.model_input):
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            what = "has no content" if kind is None else f"is of type {kind}"
            raise InputError(
                f"{where}: model_input chunk {j} {what}; only encoded_text chunks can be trained on"
            )
        tokens = chunk.encoded_text.tokens
        if len(tokens) % 4:
            raise InputError(
                f"{where}: model_input chunk {j} has {len(tokens)} token bytes, "
                "not a whole number of int32 tokens"
            )
        pieces.append(np.frombuffer(tokens, dtype="<i4"))
    if not pieces or not any(piece.size for piece in pieces):
        raise InputError(f"{where}: model_input has no tokens")
    loss_inputs = {
        name: _decode_tensor(tensor, f"{where}: loss_fn_inputs[{name!r}]")
        for name, tensor in datum.loss_fn_inputs.items()
    }
    return Datum(tokens=np.concatenate(pieces, dtype=np.int32), loss_inputs=loss_inputs)


def _decode_tensor(tensor: pb.Tensor, where: str) -> np.ndarray:
    dtype = _WIRE_DTYPES.get(tensor.dtype)
    if dtype is None:
        known = tensor.dtype in pb.DType.values()
        name = pb.DType.Name(tensor.dtype) if known else str(tensor.dtype)
        raise InputError(
            f"{where} has dtype {name}; expected FLOAT32, INT64, INT32 or BFLOAT16"
        )
    shape = list(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise InputError(f"{where} has a negative dimension in shape {shape}")
    if tensor.WhichOneof("encoding") == "sparse_csr":
        return _decode_sparse(tensor.sparse_csr, shape, dtype, where)
    if not shape:
        return _values(tensor.dense, dtype, where)
    expected = math.prod(shape)
    if len(tensor.dense) != expected * dtype.wire.itemsize:
        raise InputError(
            f"{where} has {len(tensor.dense)} bytes, "
            f"expected {expected} {dtype.name} values for shape {shape}"
        )
    return _values(tensor.dense, dtype, where).reshape(shape)


def _decode_sparse(
    csr: pb.SparseCsr, shape: list[int], dtype: _WireDtype, where: str
) -> np.ndarray:
    """Densify CSR with pad 0 (the only pad the SDK uses for loss inputs)."""
    if len(shape) != 2:
        raise InputError(f"{where} is sparse CSR with shape {shape}; sparse tensors must be 2-D")
    rows, cols = shape
    if rows * cols > MAX_SPARSE_CELLS:
        raise InputError(f"{where} has shape {shape}, more than {MAX_SPARSE_CELLS} cells")
    crow = _values(csr.crow_indices, _INDEX, f"{where} CSR crow_indices")
    col = _values(csr.col_indices, _INDEX, f"{where} CSR col_indices")
    nnz = col.size
    if crow.size != rows + 1:
        raise InputError(
            f"{where} has {crow.size} CSR crow_indices, "
            f"expected {rows + 1} (rows + 1) for shape {shape}"
        )
    if crow[0] != 0 or crow[-1] != nnz or np.any(np.diff(crow) < 0):
        raise InputError(
            f"{where} has invalid CSR crow_indices: they must start at 0, "
            f"never decrease and end at {nnz} (the number of col_indices)"
        )
    if nnz and (col.min() < 0 or col.max() >= cols):
        raise InputError(f"{where} has CSR col_indices outside [0, {cols}) for shape {shape}")
    if len(csr.values) != nnz * dtype.wire.itemsize:
        raise InputError(
            f"{where} has {len(csr.values)} CSR value bytes, "
            f"expected {nnz} {dtype.name} values (one per col_index)"
        )
    values = _values(csr.values, dtype, where)
    dense = np.zeros(shape, dtype=values.dtype)
    dense[np.repeat(np.arange(rows), np.diff(crow)), col] = values
    return dense


def _values(buffer: bytes, dtype: _WireDtype, where: str) -> np.ndarray:
    """Little-endian values from `buffer`, widened to what the engine computes with."""
    if len(buffer) % dtype.wire.itemsize:
        raise InputError(
            f"{where} has {len(buffer)} bytes, not a whole number of {dtype.name} values"
        )
    return dtype.widen(np.frombuffer(buffer, dtype=dtype.wire))


def encode_forward_backward_output(
    outputs: list[dict[str, np.ndarray]], metrics: dict[str, float]
) -> bytes:
    """Serialize per-datum outputs as `ForwardBackwardOutput`.

    Consecutive datums whose fields agree in dtype and trailing shape share one ArrayRecord;
    the client concatenates records in order, so ragged outputs need no special casing.
    Scalars travel as shape [1], since the wire always carries a leading dimension.
    """
    for key in metrics:
        if key.count(":") != 1:
            raise ValueError(
                f"metric {key!r} must be named 'name:reduction'; the client splits on ':'"
            )
    arrays = [{name: _wire_array(value) for name, value in output.items()} for output in outputs]
    if arrays and any(array.keys() != arrays[0].keys() for array in arrays):
        raise ValueError("every datum's outputs must have the same field names")
    msg = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for name, value in metrics.items():
        msg.metrics[name] = float(value)
    for _, run in itertools.groupby(arrays, key=_layout):
        msg.loss_fn_outputs.append(_array_record(list(run)))
    return msg.SerializeToString()


def _wire_array(value: np.ndarray) -> np.ndarray:
    """Only float32 and int64 are public on the wire: floats narrow or widen, integers widen."""
    array = np.atleast_1d(np.asarray(value))
    if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
        return np.ascontiguousarray(array, dtype="<f4")
    if array.dtype.kind in "iub":
        return np.ascontiguousarray(array, dtype="<i8")
    raise ValueError(f"cannot send an output of dtype {array.dtype}; only numeric arrays travel")


def _layout(output: dict[str, np.ndarray]) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """What must agree between datums that share one ArrayRecord."""
    return tuple(
        (name, value.dtype.str, value.shape[1:]) for name, value in sorted(output.items())
    )


def _array_record(run: list[dict[str, np.ndarray]]) -> pb.ArrayRecord:
    record = pb.ArrayRecord(type_tag="ArrayRecord", num_datums=len(run))
    for name, first in run[0].items():
        values = [datum[name] for datum in run]
        offsets = np.zeros(len(values) + 1, dtype="<i8")
        np.cumsum([value.nbytes for value in values], out=offsets[1:])
        record.fields[name].CopyFrom(
            pb.BatchedTensor(
                data=b"".join(value.tobytes() for value in values),
                offsets=offsets.tobytes(),
                dtype=pb.DTYPE_FLOAT32 if first.dtype.kind == "f" else pb.DTYPE_INT64,
                trailing_shape=first.shape[1:],
            )
        )
    return record


def encode_sample_response(result: SampleResult) -> bytes:
    """Serialize a sampling result as `SampleResponse` (NaN prompt logprobs survive as NaN)."""
    msg = pb.SampleResponse()
    for sequence in result.sequences:
        stop_reason = _STOP_REASONS.get(sequence.stop_reason)
        if stop_reason is None:
            raise ValueError(
                f"unknown stop reason {sequence.stop_reason!r}; expected 'stop' or 'length'"
            )
        seq = msg.sequences.add(stop_reason=stop_reason, tokens=_le_bytes(sequence.tokens, "<i4"))
        if sequence.logprobs:
            seq.logprobs = _le_bytes(sequence.logprobs, "<f4")
        if sequence.topk_logprobs is not None:
            seq.topk_sampled_logprobs.CopyFrom(_topk(sequence.topk_logprobs))
    if result.prompt_logprobs is not None:
        msg.prompt_logprobs = _le_bytes(result.prompt_logprobs, "<f4")
    if result.topk_prompt_logprobs is not None:
        msg.topk_prompt_logprobs.CopyFrom(_topk(result.topk_prompt_logprobs))
    return msg.SerializeToString()


def _topk(rows: list[list[tuple[int, float]]]) -> pb.TopkLogprobs:
    """Rows are padded to the widest one; an all-pad row reads back as None (e.g. position 0)."""
    k = max((len(row) for row in rows), default=0)
    token_ids = np.full((len(rows), k), _TOPK_PAD_TOKEN, dtype="<i4")
    logprobs = np.full((len(rows), k), _TOPK_PAD_LOGPROB, dtype="<f4")
    for i, row in enumerate(rows):
        if row:
            tokens, row_logprobs = zip(*row)
            token_ids[i, : len(row)] = tokens
            logprobs[i, : len(row)] = row_logprobs
    return pb.TopkLogprobs(
        token_ids=token_ids.tobytes(), logprobs=logprobs.tobytes(), k=k, length=len(rows)
    )


def _le_bytes(values: Sequence[int] | Sequence[float], dtype: str) -> bytes:
    return np.asarray(values, dtype=dtype).tobytes()

"""JSON bodies of the Tinker HTTP API (SDK 0.38.0), as msgspec Structs.

Requests ignore unknown fields (the SDK adds fields over time and always sends `type`).
Responses omit fields left at their default, so `None` never reaches the SDK's pydantic
models; fields the SDK requires have no default and are therefore always present. A `type`
discriminator the SDK inspects (`try_again`) is a struct tag, which is always encoded.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from server.paths import CheckpointType

INT64_MAX = 2**63 - 1
MAX_TTL_SECONDS = 10 * 366 * 24 * 3600
"""The longest checkpoint TTL (ten years): further out, expiry dates stop being dates."""

SeqId = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
"""A client-chosen sequence number (`seq_id`, `model_seq_id`, ...): an int64 >= 0."""
TtlSeconds = Annotated[int, msgspec.Meta(ge=1, le=MAX_TTL_SECONDS)]
"""A checkpoint's time to live in seconds; the fields are nullable, null meaning no expiry."""
LoraRank = Annotated[int, msgspec.Meta(ge=1)]
"""The upper bound is the engine's `max_lora_rank`, checked by the create_model route."""
LoraSeed = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
"""The engine's PRNG takes an int64 seed."""


class Request(msgspec.Struct, kw_only=True):
    """Base for request bodies: unknown fields are ignored."""


class Response(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Base for response bodies: defaults (None, False, ...) are left out."""


# ---- bootstrap and sessions -----------------------------------------------------------------


class CreateSessionRequest(Request):
    tags: list[str] = []
    user_metadata: dict[str, Any] | None = None
    sdk_version: str = ""
    project_id: ProjectId | None = None
    display_name: str | None = None


class CreateSessionResponse(Response, tag_field="type", tag="create_session"):
    session_id: str


class SessionHeartbeatRequest(Request):
    session_id: str


class SessionHeartbeatResponse(Response, tag_field="type", tag="session_heartbeat"):
    pass


class FinishReason(Request):
    type: str = "success"


class SessionFinishRequest(Request):
    reason: FinishReason | None = None
    detail: str | None = None


class SupportedModel(Response):
    model_name: str
    max_context_length: int
    trainable: bool
    sampleable: bool


class GetServerCapabilitiesResponse(Response):
    supported_models: list[SupportedModel]


# ---- training ---------------------------------------------------------------------------------


class LoraConfigBody(Request):
    rank: LoraRank
    seed: LoraSeed | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class OptimizerConfigBody(Request):
    type: str = "adamw"


class CreateModelRequest(Request):
    session_id: str
    model_seq_id: SeqId
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfigBody | None = None
    optimizer_config: OptimizerConfigBody | None = None


class CreateModelResponse(Response, tag_field="type", tag="create_model"):
    model_id: str


class GetInfoRequest(Request):
    model_id: str


class ModelData(Response):
    model_name: str
    tokenizer_id: str


class GetInfoResponse(Response, tag_field="type", tag="get_info"):
    model_id: str
    model_data: ModelData
    model_name: str
    is_lora: bool
    lora_rank: int | None = None


class LoadWeightsRequest(Request):
    path: str
    optimizer: bool
    model_id: str | None = None
    seq_id: SeqId | None = None
    session_id: str | None = None
    model_seq_id: SeqId | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    optimizer_config: OptimizerConfigBody | None = None


class LoadWeightsResponse(Response, tag_field="type", tag="load_weights"):
    path: str | None = None
    model_id: str | None = None


class AdamParamsBody(Request):
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


class OptimStepRequest(Request):
    model_id: str
    seq_id: SeqId | None = None
    adam_params: AdamParamsBody | None = None
    optimizer_params: dict[str, Any] | None = None


class OptimStepResponse(Response):
    metrics: dict[str, float] | None = None


class SaveWeightsRequest(Request):
    model_id: str
    path: str | None = None
    seq_id: SeqId | None = None
    ttl_seconds: TtlSeconds | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None


class SaveWeightsResponse(Response, tag_field="type", tag="save_weights"):
    path: str


class SaveWeightsForSamplerRequest(Request):
    model_id: str
    path: str | None = None
    sampling_session_seq_id: SeqId | None = None
    seq_id: SeqId | None = None
    ttl_seconds: TtlSeconds | None = None
    user_metadata: dict[str, str] | None = None


class SaveWeightsForSamplerResponse(Response, tag_field="type", tag="save_weights_for_sampler"):
    path: str | None = None
    sampling_session_id: str | None = None


class SaveWeightsExternalRequest(Request):
    model_id: str
    path: str
    seq_id: SeqId | None = None
    ttl_seconds: TtlSeconds | None = None
    age_encryption_recipients: list[str] | None = None


class SaveWeightsExternalResponse(Response, tag_field="type", tag="save_weights_external"):
    path: str
    size_bytes: int | None = None


# ---- sampling ---------------------------------------------------------------------------------


class CreateSamplingSessionRequest(Request):
    session_id: str
    sampling_session_seq_id: SeqId
    base_model: str | None = None
    model_path: str | None = None


class CreateSamplingSessionResponse(Response, tag_field="type", tag="create_sampling_session"):
    sampling_session_id: str


class GetSamplerResponse(Response):
    sampler_id: str
    base_model: str
    model_path: str | None = None


class ChunkBody(Request):
    """One prompt chunk; only `encoded_text` carries tokens this text-only server can use."""

    type: str
    tokens: list[int] | None = None


class ModelInputBody(Request):
    chunks: list[ChunkBody]


class SamplingParamsBody(Request):
    """`stop` omitted keeps the implicit EOS stop; `[]` disables every stop."""

    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str | int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


class SampleRequest(Request):
    prompt: ModelInputBody
    sampling_params: SamplingParamsBody
    num_samples: int = 1
    sampling_session_id: str | None = None
    seq_id: SeqId | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    prompt_alt_tokens_k: int = 0
    target_prompt_logprobs: dict[str, Any] | None = None
    prompt_logprobs_last_n: int | None = None


# ---- futures ----------------------------------------------------------------------------------


class UntypedAPIFuture(Response):
    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None


class FutureRetrieveRequest(Request):
    request_id: str


class TryAgainResponse(Response, tag_field="type", tag="try_again"):
    request_id: str
    queue_state: Literal["active", "paused_capacity", "paused_rate_limit"]


class RequestFailedResponse(Response):
    error: str
    category: Literal["user", "server"]


# ---- REST -------------------------------------------------------------------------------------


class Cursor(Response):
    offset: int
    limit: int
    total_count: int


class Checkpoint(Response):
    checkpoint_id: str
    checkpoint_type: CheckpointType
    time: datetime
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None


class CheckpointsListResponse(Response):
    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


class TrainingRun(Response):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    last_request_time: datetime
    lora_rank: int | None = None
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None


class TrainingRunsResponse(Response):
    training_runs: list[TrainingRun]
    cursor: Cursor


class ExternalWeightsUrlsResponse(Response):
    urls: dict[str, str]
    """Signed download URL of each file, keyed by its path inside the checkpoint."""
    expires: datetime


class WeightsInfoRequest(Request):
    tinker_path: str


class WeightsInfoResponse(Response):
    base_model: str
    is_lora: bool
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None


class GetSessionResponse(Response):
    training_run_ids: list[str]
    sampler_ids: list[str]
    user_metadata: dict[str, str] | None = None
    display_name: str | None = None


class ListSessionsResponse(Response):
    sessions: list[str]


# ---- sessions: projects, search, trace export -------------------------------------------------

ProjectId = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
"""A project is a label sessions (and so their training runs) are grouped under."""


class AssignSessionProjectRequest(Request):
    project_id: ProjectId


class SessionTraceExportResponse(Response):
    status: Literal["pending", "ready", "failed"]
    url: str | None = None
    error: str | None = None


class OwnSearchOwner(Request, tag_field="type", tag="own"):
    pass


class AccessibleSearchOwner(Request, tag_field="type", tag="accessible"):
    pass


class UserSearchOwner(Request, tag_field="type", tag="user"):
    owner_urns: Annotated[list[str], msgspec.Meta(min_length=1, max_length=10)]


class ActiveStatusQuery(Request, tag_field="type", tag="active"):
    pass


class CancelledStatusQuery(Request, tag_field="type", tag="cancelled"):
    pass


class FailedStatusQuery(Request, tag_field="type", tag="failed"):
    pass


ClientFinishReasonType = Literal["success", "errored", "interrupted"]


class ClientFinishedStatusQuery(Request, tag_field="type", tag="client_finished"):
    reasons: Annotated[list[ClientFinishReasonType], msgspec.Meta(min_length=1)] | None = None


StatusQuery = ActiveStatusQuery | CancelledStatusQuery | FailedStatusQuery | ClientFinishedStatusQuery


class SessionSearchCursor(Request):
    """Sent back by the client exactly as a response gave it."""

    last_created_at: Annotated[datetime, msgspec.Meta(tz=True)]
    last_session_id: str


class SessionSearchRequest(Request):
    session_id: str | None = None
    project_ids: list[ProjectId] | None = None
    user_metadata: dict[str, str] = {}
    display_name: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    owner: OwnSearchOwner | AccessibleSearchOwner | UserSearchOwner = msgspec.field(default_factory=OwnSearchOwner)
    statuses: Annotated[list[StatusQuery], msgspec.Meta(min_length=1)] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=200)] = 50
    cursor: SessionSearchCursor | None = None


class ClientFinishReason(Response):
    type: ClientFinishReasonType


class ActiveStatus(Response, tag_field="type", tag="active"):
    pass


class ClientFinishedStatus(Response, tag_field="type", tag="client_finished"):
    reason: ClientFinishReason


class SessionSummary(Response):
    session_id: str
    created_at: datetime
    owner: str
    project_id: str
    """Empty for a session in no project."""
    checkpoints_count: int
    status: ActiveStatus | ClientFinishedStatus | None = None
    """None for a session that ended without its client finishing it (expired, or cut off by a restart)."""
    display_name: str | None = None
    user_metadata: dict[str, str] | None = None
    checkpoint_storage_bytes: int | None = None


class SessionSearchResponse(Response):
    sessions: list[SessionSummary]
    next_cursor: SessionSearchCursor | None = None


# ---- copy_weights and the caller's API key ----------------------------------------------------


class CopyWeightsRequest(Request):
    source_path: str
    destination_project_id: ProjectId | None = None
    session_id: str | None = None
    model_seq_id: SeqId | None = None
    ttl_seconds: TtlSeconds | None = None
    weights_access_token: str | None = None


class CopyWeightsResponse(Response):
    tinker_path: str


class ApiKeyOrgDetails(Response):
    name: str


class ApiKeyUserDetails(Response):
    email: str


class ApiKeyDetails(Response):
    org_details: ApiKeyOrgDetails
    user_details: ApiKeyUserDetails


class SelfApiKeyResponse(Response):
    key_id: int
    name: str
    note: str
    details: ApiKeyDetails

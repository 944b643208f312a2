"""A compact client flow run by `test_sdk_versions.py` under each installed `tinker` SDK.

Run as `python sdk_compat_client.py BASE_URL BASE_MODEL` with any SDK version's python; it
imports nothing but `tinker` and the standard library (token ids are literal, so no tokenizer
is needed), raises on the first mismatch, and prints one JSON line of results at the end.
"""

from __future__ import annotations

import json
import math
import sys

import tinker
from tinker import types

# Token ids that exist in every tiny test checkpoint (vocabularies of a few hundred entries).
TOKENS = [84, 72, 69, 32, 113, 117, 105, 99, 107, 32, 98, 114, 111, 119, 110, 32, 102, 111, 120] * 2


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


def _ready(client):
    """Newer SDKs return futures from the client factories (older ones return the client)."""
    return client.result() if callable(getattr(client, "result", None)) else client


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def main(base_url: str, base_model: str) -> None:
    service = tinker.ServiceClient(base_url=base_url, api_key="tml-sdk-compat-test")
    result: dict = {"sdk_version": tinker.__version__}

    # Deprecated in newer SDKs (moved to RestClient), but the one call every supported SDK has.
    names = [m.model_name for m in service.get_server_capabilities().supported_models]
    _check(base_model in names, f"{base_model} not in capabilities {names}")

    training = _ready(service.create_lora_training_client(base_model=base_model, rank=8, seed=0))
    _check(training.get_info().model_data.model_name == base_model, "get_info names another model")

    datum = _datum(TOKENS)
    losses = []
    for _ in range(6):
        fwd_bwd = training.forward_backward([datum], "cross_entropy")
        optim = training.optim_step(types.AdamParams(learning_rate=1e-2))
        out = fwd_bwd.result()
        optim.result()
        logprobs = out.loss_fn_outputs[0]["logprobs"].tolist()
        _check(len(logprobs) == len(TOKENS) - 1, f"logprobs length {len(logprobs)}")
        _check(math.isclose(-sum(logprobs), out.metrics["loss:sum"], rel_tol=1e-3), f"loss:sum {out.metrics}")
        losses.append(out.metrics["loss:sum"])
    _check(losses[-1] < 0.5 * losses[0], f"loss did not go down: {losses}")
    result["losses"] = losses

    state_path = training.save_state("compat-state").result().path
    sampler_path = training.save_weights_for_sampler("compat-sampler").result().path
    _check(state_path.startswith("tinker://") and "/weights/" in state_path, state_path)
    _check(sampler_path.startswith("tinker://") and "/sampler_weights/" in sampler_path, sampler_path)

    sampler = _ready(service.create_sampling_client(model_path=sampler_path))
    prompt = types.ModelInput.from_ints(TOKENS[:8])
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=3)
    response = sampler.sample(prompt, 2, params, include_prompt_logprobs=True).result()
    _check(len(response.sequences) == 2, f"{len(response.sequences)} sequences")
    for seq in response.sequences:
        _check(1 <= len(seq.tokens) <= 8 and len(seq.logprobs) == len(seq.tokens), f"bad sequence {seq}")
        _check(seq.stop_reason in ("length", "stop"), f"stop_reason {seq.stop_reason}")
    _check(response.prompt_logprobs is not None and len(response.prompt_logprobs) == 8, "prompt_logprobs")
    _check(response.prompt_logprobs[0] is None, "first prompt logprob should be None")
    result["sampled"] = [seq.tokens for seq in response.sequences]

    # The trained adapter should now prefer the trained continuation over the base model.
    base_sampler = _ready(service.create_sampling_client(base_model=base_model))
    trained = sum(sampler.compute_logprobs(types.ModelInput.from_ints(TOKENS)).result()[1:])
    base = sum(base_sampler.compute_logprobs(types.ModelInput.from_ints(TOKENS)).result()[1:])
    _check(trained > base, f"trained adapter logprob {trained} <= base {base}")

    # Resume from the saved state (weights and optimizer) into a fresh training client.
    current = training.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    resumed = _ready(service.create_training_client_from_state_with_optimizer(state_path))
    again = resumed.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    _check(math.isclose(again, current, rel_tol=1e-3), f"resumed loss {again} != saved {current}")
    refreshed = _ready(training.save_weights_and_get_sampling_client())
    _check(len(refreshed.sample(prompt, 1, params).result().sequences) == 1, "refreshed sampler")

    _finish_session(service, base_url, training.model_id.split(":train:")[0])
    print(json.dumps(result))


def _finish_session(service: tinker.ServiceClient, base_url: str, session_id: str) -> None:
    """Free the session's adapter slots now rather than when its heartbeats time out.

    SDKs before `ServiceClient.close(status)` have no call that finishes a session, so the
    same request the newer ones send is made directly.
    """
    try:
        close = service.close("success")
    except (AttributeError, TypeError):  # older SDKs: no close(), or one that only stops local tasks
        import httpx

        reply = httpx.post(
            f"{base_url}/api/v1/sessions/{session_id}/finish",
            json={"reason": {"type": "success"}, "detail": None},
            headers={"X-API-Key": "tml-sdk-compat-test"},
            timeout=30,
        )
        reply.raise_for_status()
    else:
        close.result()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

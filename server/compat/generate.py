"""Sampling for the OpenAI- and Anthropic-compatible routes, through the same engine worker and
continuous-batching decode rows as the Tinker `asample` route (same checks, same backpressure).

The engine hands back whole samples (`submit_sample` calls back once every sample of a request
has finished), so streamed responses send the finished text as per-token deltas.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from server.auth import current_owner
from server.compat.models import ModelChoice, adapter_slot
from server.compat.text import Completion, decode_completion
from server.routes.sampling import sampling_params
from server.service import Service
from server.wire.types import SamplingParamsBody
from server.worker import SampleItem
from tuft_jax.types import SampleResult, SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def params_for(
    choice: ModelChoice,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: str | list[str] | None,
) -> SamplingParams:
    """The engine's parameters: stop strings as given, and generation also stops at the engine's
    EOS and the tokenizer's (e.g. a chat model's end-of-turn token)."""
    stops = [stop] if isinstance(stop, str) else stop
    body = SamplingParamsBody(
        max_tokens=max_tokens,
        seed=seed,
        stop=stops or None,
        temperature=1.0 if temperature is None else temperature,
        top_k=-1 if top_k is None else top_k,
        top_p=1.0 if top_p is None else top_p,
    )
    params = sampling_params(body, choice.engine.eos_token_id)
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in params.stop_token_ids:
        params = dataclasses.replace(params, stop_token_ids=(*params.stop_token_ids, eos))
    return params


async def generate(
    service: Service,
    choice: ModelChoice,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[np.ndarray],
    num_samples: int,
    params: SamplingParams,
) -> list[list[Completion]]:
    """`num_samples` completions of each prompt. Every prompt is checked before anything is
    loaded or queued, so a bad one fails the request without spending engine time."""
    engine = choice.engine
    for prompt in prompts:
        engine.check_sample(prompt, num_samples, params)
    owner = current_owner()
    service.quotas.check_tokens(owner, sum(prompt.size for prompt in prompts))
    async with adapter_slot(service, choice) as slot:
        worker = service.workers[engine.name]
        outcomes = [
            worker.sample(
                SampleItem(
                    slot=slot,
                    prompt=prompt,
                    num_samples=num_samples,
                    params=params,
                    prompt_logprobs=False,
                    topk_prompt_logprobs=0,
                    finish=service.usage.metered_sample(owner, None, engine.name, prompt.size, lambda result: result),
                )
            )
            for prompt in prompts
        ]
        results: list[SampleResult] = await asyncio.gather(*outcomes)
    return [[decode_completion(tokenizer, sequence, params) for sequence in result.sequences] for result in results]

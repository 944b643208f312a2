"""One base model in memory serving many LoRA adapters: the engine the HTTP service drives.

All methods are blocking and must be called from one thread per engine (the service's
worker); validation (`check_*`) is cheap, host-only and safe to call from anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from transformers import AutoTokenizer

from tuft_jax import adapters, checkpoints, losses, peft_export
from tuft_jax.batching import batch_bucket, bucket, build_train_batch
from tuft_jax.errors import InputError
from tuft_jax.model_registry import BaseModelSpec
from tuft_jax.models.decoder import LoraShape
from tuft_jax.models.hf_weights import load_causal_lm
from tuft_jax.optimizer import adamw_step, init_optimizer_state
from tuft_jax.sampler import DecodeRequest, generate
from tuft_jax.sharding import batch_sharding, make_mesh, place_like_params
from tuft_jax.train_step import BatchArrays, forward, forward_backward
from tuft_jax.types import AdamParams, Datum, ForwardResult, LoraConfig, SampledSequence, SampleResult, SamplingParams

MAX_SAMPLES_PER_REQUEST = 128


def _random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


class Engine:
    def __init__(self, spec: BaseModelSpec, mesh: Mesh | None = None) -> None:
        self.spec = spec
        self.mesh = make_mesh() if mesh is None else mesh
        self.name = spec.name
        self.max_context_length = spec.max_context_length
        self.tokenizer_path = str(spec.path)
        self.slots = adapters.SlotTable(spec.max_adapters + 1, spec.max_lora_rank)
        dtype = jnp.bfloat16 if spec.dtype == "bfloat16" else jnp.float32
        lora_shape = LoraShape(self.slots.num_slots, spec.max_lora_rank)
        self.graphdef, self.base, self.lora, self.config = load_causal_lm(spec.path, lora_shape, dtype, self.mesh)
        self.grads = jax.tree.map(jnp.zeros_like, self.lora)
        self.opt_state = place_like_params(init_optimizer_state(self.lora), self.mesh)
        self.steps: dict[int, int] = {}
        self.tokenizer = AutoTokenizer.from_pretrained(spec.path)
        eos = self.config.eos_token_ids or (self.tokenizer.eos_token_id,)
        self.eos_token_id = int(eos[0])
        self.vocab_size = self.config.vocab_size

    # ---- adapters -------------------------------------------------------------------------

    def create_adapter(self, lora: LoraConfig) -> int:
        slot = self.slots.allocate(lora)
        seed = _random_seed() if lora.seed is None else lora.seed
        self.lora = adapters.init_slot(
            self.lora, jnp.int32(slot), jax.random.key(seed), jnp.int32(lora.rank), jnp.asarray(adapters.group_flags(lora))
        )
        self.steps[slot] = 0
        return slot

    def release_adapter(self, slot: int) -> None:
        if slot == 0:
            return
        self.slots.release(slot)
        self.steps.pop(slot, None)
        index = jnp.int32(slot)
        self.lora = adapters.clear_slot(self.lora, index)
        self.grads = adapters.clear_slot(self.grads, index)
        self.opt_state = adapters.clear_slot(self.opt_state, index)

    def adapter_config(self, slot: int) -> LoraConfig:
        return self.slots.config(slot)

    def snapshot_adapter(self, slot: int) -> int:
        """A frozen copy for a sampler: later training of `slot` does not change it."""
        new = self.slots.allocate(self.slots.config(slot))
        self.lora = adapters.copy_slot(self.lora, jnp.int32(slot), jnp.int32(new))
        return new

    # ---- training -------------------------------------------------------------------------

    def check_forward_backward(self, data: list[Datum], loss_fn: str, loss_config: dict[str, float | str]) -> dict[str, float]:
        if not data:
            raise InputError("forward_backward needs at least one datum")
        for i, datum in enumerate(data):
            self._check_tokens(datum.tokens, f"datum {i}: model_input")
        resolved = losses.check_loss_request(loss_fn, loss_config, [d.loss_inputs for d in data], [len(d.tokens) for d in data])
        for i, datum in enumerate(data):
            self._check_tokens(datum.loss_inputs["target_tokens"].reshape(-1), f"datum {i}: loss_fn_inputs['target_tokens']")
        return resolved

    def forward_backward(
        self, batch: list[tuple[int, list[Datum]]], loss_fn: str, loss_config: dict[str, float], forward_only: bool
    ) -> list[ForwardResult]:
        for slot, _ in batch:
            self.slots.config(slot)
        rows = [(slot, datum) for slot, datums in batch for datum in datums]
        fill = {
            key: float(loss_config.get(key, 1.0))
            for _, datum in rows
            for key in datum.loss_inputs
            if key != "target_tokens"
        }
        tb = build_train_batch(rows, fill, min_rows=self.mesh.shape["fsdp"])
        host = BatchArrays(
            tokens=tb.tokens,
            positions=tb.positions,
            slots=tb.slots,
            scales=self.slots.scales[tb.slots],
            targets=tb.targets,
            mask=tb.mask,
            inputs=tb.inputs,
        )
        arrays = jax.tree.map(lambda x: jax.device_put(x, batch_sharding(self.mesh, x.ndim)), host)
        config = {key: jnp.float32(value) for key, value in loss_config.items()}
        if forward_only:
            lp, per_row = forward(self.graphdef, self.base, self.lora, arrays, config, loss_fn)
        else:
            self.grads, lp, per_row = forward_backward(self.graphdef, self.base, self.lora, self.grads, arrays, config, loss_fn)
        lp, per_row = np.asarray(lp), np.asarray(per_row)
        results, row = [], 0
        for _, datums in batch:
            outputs = []
            for datum in datums:
                n, shape = len(datum.tokens), tb.target_shapes[row]
                width = int(np.prod(shape[1:], dtype=int))
                outputs.append({"logprobs": lp[row, :n, :width].reshape(shape).astype(np.float32)})
                row += 1
            loss = float(per_row[row - len(datums) : row].sum())
            results.append(ForwardResult(outputs=outputs, metrics={"loss:sum": loss}))
        return results

    def optim_step(self, slot: int, params: AdamParams) -> dict[str, float]:
        self.slots.config(slot)
        hyper = jnp.asarray(
            [params.learning_rate, params.beta1, params.beta2, params.eps, params.weight_decay, params.grad_clip_norm],
            jnp.float32,
        )
        self.lora, self.opt_state, self.grads, norm = adamw_step(self.lora, self.opt_state, self.grads, jnp.int32(slot), hyper)
        self.steps[slot] = self.steps.get(slot, 0) + 1
        return {"grad_norm:mean": float(norm)}

    # ---- checkpoints ----------------------------------------------------------------------

    def _slot_tree(self, slot: int, with_optimizer: bool) -> dict:
        tree = {"lora": nnx.to_pure_dict(self.lora)}
        if with_optimizer:
            tree["opt"] = self.opt_state
        return jax.tree.map(lambda x: np.asarray(x[slot]), tree)

    def save_adapter(self, slot: int, directory: Path, *, with_optimizer: bool) -> int:
        """Writes an Orbax checkpoint of the slot; returns its size in bytes."""
        metadata = checkpoints.AdapterMetadata(
            base_model=self.name,
            lora=self.slots.config(slot),
            alpha=adapters.LORA_ALPHA,
            step=self.steps.get(slot, 0),
            has_optimizer=with_optimizer,
        )
        return checkpoints.save_adapter(directory, self._slot_tree(slot, with_optimizer), metadata)

    def load_adapter(self, directory: Path, *, with_optimizer: bool) -> int:
        metadata = checkpoints.read_metadata(directory)
        if metadata.base_model != self.name:
            raise InputError(f"checkpoint was trained on {metadata.base_model!r}, not {self.name!r}")
        if with_optimizer and not metadata.has_optimizer:
            raise InputError("checkpoint has no optimizer state (it was saved for sampling)")
        slot = self.slots.allocate(metadata.lora)
        try:
            tree = checkpoints.load_adapter(directory, self._slot_tree(0, metadata.has_optimizer), self.spec.max_lora_rank)
        except Exception:
            self.slots.release(slot)
            raise
        index = jnp.int32(slot)
        self.lora = nnx.from_flat_state(
            [(path, var.replace(var[...].at[index].set(value))) for (path, var), value in zip(
                nnx.to_flat_state(self.lora), jax.tree.leaves(tree["lora"]), strict=True
            )]
        )
        if with_optimizer:
            self.opt_state = jax.tree.map(lambda x, v: x.at[index].set(v), self.opt_state, tree["opt"])
        self.steps[slot] = metadata.step
        return slot

    def export_peft(self, slot: int, directory: Path) -> int:
        """Writes the slot as a standard PEFT LoRA adapter (what other tools load); returns its size in bytes."""
        config = self.slots.config(slot)
        flat = nnx.to_flat_state(self.lora)
        values = jax.device_get([var[...][slot] for _, var in flat])
        lora = {path: value for (path, _), value in zip(flat, values, strict=True)}
        return peft_export.write_peft_adapter(directory, lora, config, adapters.LORA_ALPHA, self.name)

    # ---- sampling -------------------------------------------------------------------------

    def _check_tokens(self, tokens: np.ndarray, where: str) -> None:
        if tokens.size == 0:
            raise InputError(f"{where} is empty")
        if tokens.size > self.max_context_length:
            raise InputError(f"{where} has {tokens.size} tokens; the context limit is {self.max_context_length}")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise InputError(f"{where} has token id {bad}, outside the vocabulary [0, {self.vocab_size})")

    def check_sample(self, prompt: np.ndarray, num_samples: int, params: SamplingParams) -> None:
        self._check_tokens(prompt, "prompt")
        if not 1 <= num_samples <= MAX_SAMPLES_PER_REQUEST:
            raise InputError(f"num_samples must be between 1 and {MAX_SAMPLES_PER_REQUEST}, got {num_samples}")
        if params.max_tokens < 1:
            raise InputError(f"max_tokens must be at least 1, got {params.max_tokens}")
        if prompt.size + params.max_tokens > self.max_context_length:
            raise InputError(
                f"prompt ({prompt.size} tokens) + max_tokens ({params.max_tokens}) exceeds the context limit {self.max_context_length}"
            )
        if not np.isfinite(params.temperature) or params.temperature < 0:
            raise InputError(f"temperature must be a finite number >= 0, got {params.temperature}")
        if not 0 < params.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {params.top_p}")
        if params.top_k < -1 or params.top_k == 0:
            raise InputError(f"top_k must be -1 (no limit) or a positive integer, got {params.top_k}")
        for token in params.stop_token_ids:
            if not 0 <= token < self.vocab_size:
                raise InputError(f"stop token id {token} is outside the vocabulary [0, {self.vocab_size})")

    def sample(
        self,
        slot: int,
        prompt: np.ndarray,
        num_samples: int,
        params: SamplingParams,
        *,
        prompt_logprobs: bool,
        topk_prompt_logprobs: int,
    ) -> SampleResult:
        if slot != 0:
            self.slots.config(slot)
        rows = batch_bucket(num_samples)
        width = bucket(prompt.size)
        max_new = bucket(params.max_tokens)
        padded = np.zeros((rows, width), np.int32)
        padded[:, : prompt.size] = prompt
        stop_ids = np.full((bucket(len(params.stop_token_ids), minimum=4),), -1, np.int32)
        stop_ids[: len(params.stop_token_ids)] = params.stop_token_ids
        seed = _random_seed() if params.seed is None else params.seed
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(rows))
        request = DecodeRequest(
            prompt=jnp.asarray(padded),
            prompt_len=jnp.full((rows,), prompt.size, jnp.int32),
            slots=jnp.full((rows,), slot, jnp.int32),
            scales=jnp.asarray(np.repeat(self.slots.scales[slot][None], rows, axis=0)),
            temperature=jnp.full((rows,), params.temperature, jnp.float32),
            top_k=jnp.full((rows,), params.top_k, jnp.int32),
            top_p=jnp.full((rows,), params.top_p, jnp.float32),
            keys=keys,
            max_tokens=jnp.asarray(np.where(np.arange(rows) < num_samples, params.max_tokens, 0), jnp.int32),
            stop_ids=jnp.asarray(stop_ids),
        )
        out = generate(
            self.graphdef,
            self.base,
            self.lora,
            request,
            max_new=max_new,
            cache_len=bucket(width + max_new),
            score_prompt=prompt_logprobs or topk_prompt_logprobs > 0,
            topk_prompt=topk_prompt_logprobs,
        )
        out = jax.device_get(out)
        sequences = [
            self._finish_sequence(out.tokens[i, : out.num_tokens[i]], out.logprobs[i, : out.num_tokens[i]], bool(out.stopped[i]), params)
            for i in range(num_samples)
        ]
        result = SampleResult(sequences=sequences)
        if prompt_logprobs:
            result.prompt_logprobs = [float(x) for x in out.prompt_logprobs[0, : prompt.size]]
        if topk_prompt_logprobs > 0:
            ids, lps = out.topk_prompt_ids[0], out.topk_prompt_logprobs[0]
            result.topk_prompt_logprobs = [[]] + [
                [(int(t), float(lp)) for t, lp in zip(ids[p - 1], lps[p - 1], strict=True)] for p in range(1, prompt.size)
            ]
        return result

    def _finish_sequence(self, tokens: np.ndarray, logprobs: np.ndarray, stopped: bool, params: SamplingParams) -> SampledSequence:
        """Applies stop strings (cut after the token that completes one)."""
        token_list = [int(t) for t in tokens]
        if params.stop_strings and not stopped:
            text = self.tokenizer.decode(token_list)
            if any(stop in text for stop in params.stop_strings):
                for end in range(1, len(token_list) + 1):
                    prefix = self.tokenizer.decode(token_list[:end])
                    if any(stop in prefix for stop in params.stop_strings):
                        token_list, logprobs, stopped = token_list[:end], logprobs[:end], True
                        break
        return SampledSequence(
            tokens=token_list,
            logprobs=[float(x) for x in logprobs],
            stop_reason="stop" if stopped else "length",
        )

"""One base model in memory serving many LoRA adapters: the engine the HTTP service drives.

All methods are blocking and must be called from one thread per engine (the service's
worker); validation (`check_*`) is cheap, host-only and safe to call from anywhere. In a
multi-process deployment, methods marked `@collective` run on every process (process 0
announces each call through `broadcaster`); file I/O and random draws happen on process 0
before the collective part, so every process sees the same arguments.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from transformers import AutoTokenizer

from tuft_jax import adapters, checkpoints, layer_stack, losses, peft_export, step_plan
from tuft_jax.batching import build_train_batch
from tuft_jax.decode_scheduler import DecodeScheduler, SampleJob
from tuft_jax.errors import CapacityError, InputError, SlotsBusy
from tuft_jax.kv_blocks import blocks_for
from tuft_jax.layers import LoraForm
from tuft_jax.multihost import Broadcaster, collective, to_host
from tuft_jax.model_registry import BaseModelSpec
from tuft_jax.models.decoder import LoraShape, layer_layout
from tuft_jax.models.hf_weights import load_causal_lm
from tuft_jax.optimizer import adamw_step, init_optimizer_state
from tuft_jax.paged_attention import block_bytes
from tuft_jax.sampler import MAX_STOP_IDS
from tuft_jax.sharding import batch_sharding, data_parallel, make_mesh, place_like_params, replicated
from tuft_jax.train_step import BatchArrays, accumulate, forward, forward_backward
from tuft_jax.types import AdamParams, Datum, ForwardResult, KVCacheStats, LoraConfig, SampleResult, SamplingParams

MAX_SAMPLES_PER_REQUEST = 128
MAX_TEMPERATURE = 100.0
"""Far above any useful temperature (the distribution is uniform long before), within float32."""
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 1024
DECODE_ROWS = 32
"""Most sequences decoded together (continuous batching); the KV blocks they hold are what bounds them."""
KV_MEMORY_FRACTION = 0.5
"""Without `kv_cache_tokens`, the KV pool takes at most this share of the device memory free
after the weights are loaded (the rest is left to training steps), and never more than
`decode_rows` full-length sequences need."""
DECODE_CHUNK = 16
"""Tokens decoded per row between two visits of the host (admissions, stop strings, training jobs)."""


def lora_form(slots: Collection[int]) -> LoraForm:
    """On accelerators `single` when one adapter (plus the bare base model) is in the batch, else
    the grouped matmul. On XLA:CPU every batch gathers each row's adapter: `ragged_dot` is
    expanded into one dense product per slot there (memory and time grow with the slots), and
    the per-row form measured faster than `single` too (`docs/performance.md`)."""
    if jax.default_backend() == "cpu":
        return "per_row"
    return "single" if len(set(slots) - {0}) <= 1 else "grouped"


def _random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


@dataclass
class _Parked:
    """An adapter moved out of the device slots: its weights, AdamW state and pending gradients."""

    config: LoraConfig
    tree: dict


class Engine:
    def __init__(
        self,
        spec: BaseModelSpec,
        mesh: Mesh | None = None,
        *,
        decode_rows: int = DECODE_ROWS,
        decode_chunk: int = DECODE_CHUNK,
        step_memory_bytes: int | None = None,
        kv_cache_tokens: int | None = None,
    ) -> None:
        """`step_memory_bytes` caps what one training pass may allocate beyond the resident
        state (default: the devices' free memory, read before each new batch shape);
        `kv_cache_tokens` sizes the sampler's KV pool (default: the spec's, else
        `KV_MEMORY_FRACTION`)."""
        self.spec = spec
        self.mesh = make_mesh(tp=spec.tensor_parallel, ep=spec.expert_parallel) if mesh is None else mesh
        self.name = spec.name
        self.max_context_length = spec.max_context_length
        self.max_lora_rank = spec.max_lora_rank
        self.tokenizer_path = str(spec.path)
        self.slots = adapters.SlotTable(spec.max_adapters + 1, spec.max_lora_rank)
        dtype = jnp.bfloat16 if spec.dtype == "bfloat16" else jnp.float32
        lora_shape = LoraShape(self.slots.num_slots, spec.max_lora_rank)
        self.graphdef, self.base, self.lora, self.config = load_causal_lm(spec.path, lora_shape, dtype, self.mesh)
        self.layout = layer_layout(self.config)
        experts, ep = (self.config.moe.num_experts if self.config.moe else None), self.mesh.shape["ep"]
        if ep > 1 and (experts is None or experts % ep):
            raise ValueError(
                f"{spec.name}: expert_parallel {ep} needs an MoE model whose experts it divides (experts: {experts})"
            )
        self.grads = jax.tree.map(jnp.zeros_like, self.lora)
        self.opt_state = place_like_params(init_optimizer_state(self.lora), self.mesh)
        local = list(self.mesh.local_devices)
        self.planner = step_plan.StepPlanner(
            (lambda: step_memory_bytes) if step_memory_bytes is not None else (lambda: step_plan.free_device_bytes(local))
        )
        self.steps: dict[int, int] = {}
        self._slot_of: dict[int, int] = {}
        self._parked: dict[int, _Parked] = {}
        self._last_use: dict[int, int] = {}
        self._clock = itertools.count(1)
        self._ids = itertools.count(1)
        self.tokenizer = AutoTokenizer.from_pretrained(spec.path)
        eos = self.config.eos_token_ids or (self.tokenizer.eos_token_id,)
        self.eos_token_id = int(eos[0])
        self.vocab_size = self.config.vocab_size
        self._weights_version: dict[int, int] = {}
        self.decoder = DecodeScheduler(
            self.graphdef,
            lambda: (self.base, self.lora),
            self.config,
            dtype,
            self.tokenizer.decode,
            self._resolve_for_sampling,
            rows=decode_rows,
            chunk=decode_chunk,
            max_length=spec.max_context_length,
            kv_blocks=self._kv_blocks(kv_cache_tokens or spec.kv_cache_tokens, decode_rows, dtype),
            weights_version=lambda adapter: self._weights_version.get(adapter, 0),
            placement=replicated(self.mesh),
            mesh=self.mesh,
        )
        self._release_when_idle: set[int] = set()
        self._slots_wanted = False
        """A call was refused with SlotsBusy since the last sampling step: admit no new sample
        requests until it ran, so the pinned slots drain."""
        self.broadcaster: Broadcaster | None = None
        self._sample_callbacks: dict[int, Callable[[SampleResult | None, BaseException | None], None]] = {}
        self._requests = itertools.count()

    def _kv_blocks(self, tokens: int | None, rows: int, dtype: jnp.dtype) -> int:
        """Blocks of the KV pool (scratch included): `tokens` if given, else what `rows`
        full-length sequences need, capped by KV_MEMORY_FRACTION of the free memory per device;
        at least one full-length sequence and a partial-block copy (see `DecodeScheduler`)."""
        cfg = self.config
        per_block = block_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
        longest = blocks_for(self.max_context_length) + 1
        devices = self.mesh.shape["fsdp"]  # the pool's blocks are split over fsdp, one scratch block each
        if tokens is not None:
            usable = max(blocks_for(tokens), longest)
        else:
            heads = self.mesh.shape["tp"] if cfg.num_kv_heads % self.mesh.shape["tp"] == 0 else 1
            free = step_plan.free_device_bytes(list(self.mesh.local_devices))
            affordable = int(KV_MEMORY_FRACTION * free) * devices // max(1, per_block // heads)
            usable = max(min(rows * longest, affordable), longest)
        return -(-(usable + devices) // devices) * devices

    def kv_cache_stats(self) -> KVCacheStats:
        """KV blocks used, idle in the prefix cache and free; bytes per block; prefix-cache hits."""
        return self.decoder.kv_stats()

    # ---- adapters -------------------------------------------------------------------------
    #
    # Callers hold adapter ids; the device holds a fixed number of slots. When the slots run out,
    # the least recently used adapter that no sample is reading is parked in host memory (with
    # its optimizer state and pending gradients) and brought back on its next use, so sampler
    # snapshots taken every RL step never exhaust the slots. Slots that admitted samples read
    # are pinned; a call that needs a slot while all are pinned raises SlotsBusy before changing
    # anything, and the worker runs it again after the next decode chunk.

    def _touch(self, adapter: int) -> None:
        self._last_use[adapter] = next(self._clock)

    def _allocate(self, config: LoraConfig, keep: Collection[int] = ()) -> int:
        while True:
            try:
                return self.slots.allocate(config)
            except CapacityError:
                if not self._park_least_recent(keep):
                    raise self._slots_busy() from None

    def _slots_busy(self) -> SlotsBusy:
        self._slots_wanted = True
        return SlotsBusy(f"all {self.spec.max_adapters} adapter slots are read by running samples")

    def _parkable(self, keep: Collection[int]) -> list[int]:
        return [a for a, slot in self._slot_of.items() if a not in keep and not self.decoder.pins_slot(slot)]

    def _park_least_recent(self, keep: Collection[int]) -> bool:
        candidates = self._parkable(keep)
        if not candidates:
            return False
        victim = min(candidates, key=self._last_use.__getitem__)
        slot = self._slot_of.pop(victim)
        tree = self._slot_tree(slot, with_optimizer=True, with_grads=True)
        self._parked[victim] = _Parked(self.slots.config(slot), tree)
        self._clear_slot(slot)
        return True

    def device_slot(self, adapter: int, keep: Collection[int] = ()) -> int:
        """The device slot holding `adapter` (0 is the bare base model), unparking it if needed."""
        if adapter == 0:
            return 0
        if adapter not in self._slot_of:
            parked = self._parked.get(adapter)
            if parked is None:
                raise InputError(f"adapter {adapter} does not exist on this base model")
            slot = self._allocate(parked.config, keep={*keep, adapter})
            self._write_slot(slot, parked.tree)
            del self._parked[adapter]
            self._slot_of[adapter] = slot
        self._touch(adapter)
        return self._slot_of[adapter]

    def _new_adapter(self, config: LoraConfig, keep: Collection[int] = ()) -> tuple[int, int]:
        slot = self._allocate(config, keep)
        adapter = next(self._ids)
        self._slot_of[adapter] = slot
        self._touch(adapter)
        return adapter, slot

    def _clear_slot(self, slot: int) -> None:
        self.slots.release(slot)
        index = jnp.int32(slot)
        self.lora = adapters.clear_slot(self.lora, index)
        self.grads = adapters.clear_slot(self.grads, index)
        self.opt_state = adapters.clear_slot(self.opt_state, index)

    def create_adapter(self, lora: LoraConfig) -> int:
        seed = _random_seed() if lora.seed is None else lora.seed
        return self._create_seeded_adapter(lora, seed)

    @collective
    def _create_seeded_adapter(self, lora: LoraConfig, seed: int) -> int:
        adapter, slot = self._new_adapter(lora)
        self.lora = adapters.init_slot(
            self.lora, jnp.int32(slot), jax.random.key(seed), jnp.int32(lora.rank), jnp.asarray(adapters.group_flags(lora))
        )
        self.steps[adapter] = 0
        return adapter

    @collective
    def release_adapter(self, adapter: int) -> None:
        """Frees the adapter, once no queued or running sample reads it any more."""
        if adapter == 0:
            return
        slot = self._slot_of.get(adapter)
        if self.decoder.uses_adapter(adapter):
            self._release_when_idle.add(adapter)
            return
        self._release_when_idle.discard(adapter)
        self._parked.pop(adapter, None)
        self._last_use.pop(adapter, None)
        self.steps.pop(adapter, None)
        if slot is not None:
            del self._slot_of[adapter]
            self._clear_slot(slot)

    def adapter_config(self, adapter: int) -> LoraConfig:
        if adapter in self._parked:
            return self._parked[adapter].config
        return self.slots.config(self.device_slot(adapter))

    @collective
    def snapshot_adapter(self, adapter: int) -> int:
        """A frozen copy for a sampler: later training of `adapter` does not change it."""
        source = self.device_slot(adapter)
        new, slot = self._new_adapter(self.slots.config(source), keep={adapter})
        self.lora = adapters.copy_slot(self.lora, jnp.int32(source), jnp.int32(slot))
        self.steps[new] = self.steps.get(adapter, 0)
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

    @collective
    def forward_backward(
        self, batch: list[tuple[int, list[Datum]]], loss_fn: str, loss_config: dict[str, float], forward_only: bool
    ) -> list[ForwardResult]:
        """Runs `batch` in as many passes as the free slots need: each pass holds at most as many
        adapters as there are slots no running sample reads, parking others between passes."""
        results: list[ForwardResult] = []
        for group in self._slot_groups(batch):
            results.extend(self._forward_backward_group(group, loss_fn, loss_config, forward_only))
        return results

    def _slot_groups(self, batch: list[tuple[int, list[Datum]]]) -> list[list[tuple[int, list[Datum]]]]:
        """Consecutive runs of `batch` whose adapters fit the unpinned slots together (an adapter
        in a pinned slot or the base model needs none). Raises SlotsBusy when one cannot fit."""
        pinned = {slot for slot in range(1, self.slots.num_slots) if self.decoder.pins_slot(slot)}
        capacity = self.spec.max_adapters - len(pinned)
        groups: list[list[tuple[int, list[Datum]]]] = [[]]
        needing: set[int] = set()
        for adapter, datums in batch:
            needs = adapter != 0 and self._slot_of.get(adapter) not in pinned
            if needs and adapter not in needing and len(needing) == capacity:
                if capacity == 0:
                    raise self._slots_busy()
                groups.append([])
                needing = set()
            groups[-1].append((adapter, datums))
            if needs:
                needing.add(adapter)
        return groups

    def _forward_backward_group(
        self, batch: list[tuple[int, list[Datum]]], loss_fn: str, loss_config: dict[str, float], forward_only: bool
    ) -> list[ForwardResult]:
        in_batch = {adapter for adapter, _ in batch}
        slot_of = {adapter: self.device_slot(adapter, keep=in_batch) for adapter in in_batch}
        rows = [(slot_of[adapter], datum) for adapter, datums in batch for datum in datums]
        fill = {
            key: float(loss_config.get(key, 1.0))
            for _, datum in rows
            for key in datum.loss_inputs
            if key != "target_tokens"
        }
        tb = build_train_batch(rows, fill, min_rows=data_parallel(self.mesh), pack=True)
        host = BatchArrays(
            tokens=tb.tokens,
            positions=tb.positions,
            slots=tb.slots,
            scales=self.slots.scales[tb.slots],
            targets=tb.targets,
            mask=tb.mask,
            inputs=tb.inputs,
            segments=tb.segments,
        )
        config = {key: jnp.float32(value) for key, value in loss_config.items()}
        form = lora_form({slot for slot, _ in rows})
        plan = self._plan_pass(host, config, loss_fn, form, forward_only)
        first_slot = max(slot for slot, _ in rows) if form == "single" else 0  # where the pass's grads go
        used_rows = 1 + max(row for row, _ in tb.placements)
        lp_parts, loss_parts = [], []
        rows_per_pass = plan.variant.rows
        for start in range(0, used_rows, rows_per_pass):
            part = jax.tree.map(
                lambda x: jax.device_put(x[start : start + rows_per_pass], batch_sharding(self.mesh, x.ndim)), host
            )
            if forward_only:
                lp, per_token = plan.compiled(self.base, self.lora, part, config)
            else:
                step_grads, lp, per_token = plan.compiled(self.base, self.lora, part, config)
                self.grads = accumulate(self.grads, step_grads, jnp.int32(first_slot))
            lp_parts.append(to_host(lp))
            loss_parts.append(to_host(per_token))
        lp, per_token = np.concatenate(lp_parts), np.concatenate(loss_parts)
        results, i = [], 0
        for _, datums in batch:
            outputs, loss = [], 0.0
            for datum in datums:
                (row, start), shape = tb.placements[i], tb.target_shapes[i]
                span = slice(start, start + len(datum.tokens))
                width = int(np.prod(shape[1:], dtype=int))
                outputs.append({"logprobs": lp[row, span, :width].reshape(shape).astype(np.float32)})
                loss += float(per_token[row, span].sum())
                i += 1
            results.append(ForwardResult(outputs=outputs, metrics={"loss:sum": loss}))
        return results

    def _plan_pass(
        self, host: BatchArrays, config: dict[str, jax.Array], loss_fn: str, form: LoraForm, forward_only: bool
    ) -> step_plan.Plan:
        """The compiled pass (and micro-batch rows) this batch shape runs with; see `step_plan`."""

        def lower(variant: step_plan.Variant) -> jax.stages.Lowered:
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(
                    (variant.rows, *x.shape[1:]), x.dtype, sharding=batch_sharding(self.mesh, x.ndim)
                ),
                host,
            )
            args = (self.graphdef, self.base, self.lora, abstract, config, loss_fn)
            if forward_only:
                return forward.lower(*args, lora_form=form, mesh=self.mesh)
            return forward_backward.lower(*args, lora_form=form, remat=variant.remat, mesh=self.mesh)

        leaves, treedef = jax.tree.flatten(host)
        key = (forward_only, loss_fn, form, tuple(sorted(config)), treedef, tuple((x.shape[1:], x.dtype.str) for x in leaves))
        return self.planner.plan(key, host.tokens.shape[0], data_parallel(self.mesh), lower, backward=not forward_only)

    @collective
    def optim_step(self, adapter: int, params: AdamParams) -> dict[str, float]:
        slot = self.device_slot(adapter)
        hyper = jnp.asarray(
            [params.learning_rate, params.beta1, params.beta2, params.eps, params.weight_decay, params.grad_clip_norm],
            jnp.float32,
        )
        self.lora, self.opt_state, self.grads, norm = adamw_step(self.lora, self.opt_state, self.grads, jnp.int32(slot), hyper)
        self.steps[adapter] = self.steps.get(adapter, 0) + 1
        self._weights_version[adapter] = self._weights_version.get(adapter, 0) + 1
        return {"grad_norm:mean": float(to_host(norm))}

    # ---- checkpoints ----------------------------------------------------------------------

    def _state_tree(self, with_optimizer: bool, with_grads: bool = False) -> dict:
        """The slot-stacked device state an adapter checkpoint (or a parked adapter) holds."""
        tree = {"lora": nnx.to_pure_dict(self.lora)}
        if with_optimizer:
            tree["opt"] = self.opt_state
        if with_grads:
            tree["grads"] = nnx.to_pure_dict(self.grads)
        return tree

    def _slot_tree(self, slot: int, with_optimizer: bool, with_grads: bool = False) -> dict:
        return jax.tree.map(lambda x: to_host(x[slot]), self._state_tree(with_optimizer, with_grads))

    def _write_slot(self, slot: int, tree: dict) -> None:
        """Installs a `_slot_tree` (any of lora / opt / grads it has) into `slot`."""
        index = jnp.int32(slot)

        def put(state: nnx.State, values: dict) -> nnx.State:
            leaves = zip(nnx.to_flat_state(state), jax.tree.leaves(values), strict=True)
            return nnx.from_flat_state([(path, var.replace(var[...].at[index].set(v))) for (path, var), v in leaves])

        self.lora = put(self.lora, tree["lora"])
        if "grads" in tree:
            self.grads = put(self.grads, tree["grads"])
        if "opt" in tree:
            self.opt_state = jax.tree.map(lambda x, v: x.at[index].set(v), self.opt_state, tree["opt"])

    @collective
    def _adapter_state(self, adapter: int, with_optimizer: bool) -> tuple[LoraConfig, int, dict]:
        """(geometry, step, host copy of the weights and optionally AdamW state) of one adapter."""
        slot = self.device_slot(adapter)
        return self.slots.config(slot), self.steps.get(adapter, 0), self._slot_tree(slot, with_optimizer)

    def save_adapter(self, adapter: int, directory: Path, *, with_optimizer: bool) -> int:
        """Writes an Orbax checkpoint of the adapter; returns its size in bytes."""
        config, step, tree = self._adapter_state(adapter, with_optimizer)
        metadata = checkpoints.AdapterMetadata(
            base_model=self.name, lora=config, alpha=adapters.LORA_ALPHA, step=step, has_optimizer=with_optimizer
        )
        return checkpoints.save_adapter(directory, tree, metadata)

    def load_adapter(self, directory: Path, *, with_optimizer: bool) -> int:
        metadata = checkpoints.read_metadata(directory)
        if metadata.base_model != self.name:
            raise InputError(f"checkpoint was trained on {metadata.base_model!r}, not {self.name!r}")
        if with_optimizer and not metadata.has_optimizer:
            raise InputError("checkpoint has no optimizer state (it was saved for sampling)")
        if metadata.alpha != adapters.LORA_ALPHA:
            raise InputError(f"checkpoint uses LoRA alpha {metadata.alpha}; this server trains with alpha {adapters.LORA_ALPHA}")
        if metadata.lora.rank > self.spec.max_lora_rank:
            raise InputError(f"checkpoint rank {metadata.lora.rank} exceeds this model's max LoRA rank {self.spec.max_lora_rank}")
        template = jax.tree.map(lambda x: np.zeros(x.shape[1:], x.dtype), self._state_tree(metadata.has_optimizer))
        tree = checkpoints.load_adapter(directory, template, self.spec.max_lora_rank)
        if not with_optimizer:
            tree.pop("opt", None)
        return self._install_adapter(metadata.lora, metadata.step, tree)

    @collective
    def _install_adapter(self, config: LoraConfig, step: int, tree: dict) -> int:
        adapter, slot = self._new_adapter(config)
        self._write_slot(slot, tree)
        self.steps[adapter] = step
        return adapter

    def export_peft(self, adapter: int, directory: Path) -> int:
        """Writes the adapter as a standard PEFT LoRA adapter (what other tools load); returns its size in bytes."""
        config, _, tree = self._adapter_state(adapter, with_optimizer=False)
        flat = nnx.to_flat_state(self.lora)
        lora = {path: value for (path, _), value in zip(flat, jax.tree.leaves(tree["lora"]), strict=True)}
        return peft_export.write_peft_adapter(directory, layer_stack.unstack(lora, self.layout), config, adapters.LORA_ALPHA, self.name)

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

    def check_sample(
        self,
        prompt: np.ndarray,
        num_samples: int,
        params: SamplingParams,
        *,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
    ) -> None:
        """Every field's range, named as the SDK names it, so a bad request is a 400 here and
        never reaches the decode rows other tenants share."""
        self._check_tokens(prompt, "prompt")
        if not 1 <= num_samples <= MAX_SAMPLES_PER_REQUEST:
            raise InputError(f"num_samples must be between 1 and {MAX_SAMPLES_PER_REQUEST}, got {num_samples}")
        if params.max_tokens < 1:
            raise InputError(f"sampling_params.max_tokens must be at least 1, got {params.max_tokens}")
        if prompt.size + params.max_tokens > self.max_context_length:
            raise InputError(
                f"prompt ({prompt.size} tokens) + sampling_params.max_tokens ({params.max_tokens}) exceeds the context "
                f"limit {self.max_context_length}"
            )
        if not (np.isfinite(params.temperature) and 0 <= params.temperature <= MAX_TEMPERATURE):
            raise InputError(f"sampling_params.temperature must be between 0 and {MAX_TEMPERATURE}, got {params.temperature}")
        if not 0 < params.top_p <= 1:
            raise InputError(f"sampling_params.top_p must be in (0, 1], got {params.top_p}")
        if not (params.top_k == -1 or 1 <= params.top_k <= self.vocab_size):
            raise InputError(
                f"sampling_params.top_k must be -1 (no limit) or between 1 and the vocabulary size {self.vocab_size}, "
                f"got {params.top_k}"
            )
        if params.seed is not None and not -(1 << 63) <= params.seed < 1 << 64:
            raise InputError(f"sampling_params.seed must be a 64-bit integer, got {params.seed}")
        for token in params.stop_token_ids:
            if not 0 <= token < self.vocab_size:
                raise InputError(f"sampling_params.stop token id {token} is outside the vocabulary [0, {self.vocab_size})")
        if len(params.stop_token_ids) > MAX_STOP_IDS:
            count = len(params.stop_token_ids)
            raise InputError(f"sampling_params.stop: at most {MAX_STOP_IDS} stop token ids (EOS included), got {count}")
        if len(params.stop_strings) > MAX_STOP_STRINGS or any(not 0 < len(s) <= MAX_STOP_STRING_CHARS for s in params.stop_strings):
            raise InputError(
                f"sampling_params.stop: at most {MAX_STOP_STRINGS} stop strings of 1 to {MAX_STOP_STRING_CHARS} characters"
            )
        for name, k in (("topk_prompt_logprobs", topk_prompt_logprobs), ("topk_sample_logprobs", topk_sample_logprobs)):
            if not 0 <= k <= self.vocab_size:
                raise InputError(f"{name} must be between 0 and the vocabulary size {self.vocab_size}, got {k}")

    def submit_sample(
        self,
        adapter: int,
        prompt: np.ndarray,
        num_samples: int,
        params: SamplingParams,
        *,
        prompt_logprobs: bool,
        topk_prompt_logprobs: int,
        on_done: Callable[[SampleResult | None, BaseException | None], None],
        topk_sample_logprobs: int = 0,
    ) -> None:
        """Queues a request for the decode rows; `on_done(result, error)` runs (on this thread, in a
        later `step_sampling`) once all its samples have finished."""
        self.check_sample(
            prompt, num_samples, params, topk_prompt_logprobs=topk_prompt_logprobs, topk_sample_logprobs=topk_sample_logprobs
        )
        if adapter in self._release_when_idle:
            raise InputError(f"adapter {adapter} is being released")
        if adapter != 0 and adapter not in self._slot_of and adapter not in self._parked:
            raise InputError(f"adapter {adapter} does not exist on this base model")
        seed = int.from_bytes(os.urandom(8), "little") if params.seed is None else params.seed
        request = next(self._requests)
        self._sample_callbacks[request] = on_done
        try:
            self._queue_sample(
                request, adapter, prompt, num_samples, params, seed, prompt_logprobs, topk_prompt_logprobs, topk_sample_logprobs
            )
        except BaseException:
            del self._sample_callbacks[request]
            raise

    @collective
    def _queue_sample(
        self,
        request: int,
        adapter: int,
        prompt: np.ndarray,
        num_samples: int,
        params: SamplingParams,
        seed: int,
        prompt_logprobs: bool,
        topk_prompt_logprobs: int,
        topk_sample_logprobs: int,
    ) -> None:
        """The part every process runs; only process 0 holds the request's callback."""

        def on_done(result: SampleResult | None, error: BaseException | None) -> None:
            callback = self._sample_callbacks.pop(request, None)
            if callback is not None:
                callback(result, error)

        self.decoder.submit(
            SampleJob(
                adapter=adapter,
                prompt=np.asarray(prompt, np.int32),
                num_samples=num_samples,
                params=params,
                seed=seed,
                prompt_logprobs=prompt_logprobs,
                topk_prompt_logprobs=topk_prompt_logprobs,
                on_done=on_done,
                topk_sample_logprobs=topk_sample_logprobs,
            )
        )

    def has_sampling_work(self) -> bool:
        return self.decoder.busy

    def queued_sample_rows(self) -> int:
        """Samples submitted but not yet decoding (what backpressure bounds)."""
        return self.decoder.queued_rows

    @collective
    def step_sampling(self) -> None:
        """One scheduler iteration: admit queued samples into free rows, decode one chunk, finish
        what ended; then free the slots whose release waited for their samples."""
        try:
            self.decoder.step()
        finally:
            self._slots_wanted = False
            for adapter in [a for a in self._release_when_idle if not self.decoder.uses_adapter(a)]:
                self.release_adapter(adapter)

    def _resolve_for_sampling(self, adapter: int, keep: set[int]) -> tuple[int, np.ndarray] | None:
        """The decoder's `resolve`: make `adapter` resident for admission, or None to wait (no
        slot can be had, or a refused call is waiting for the pinned slots to drain)."""
        if adapter != 0 and (self._slots_wanted or (adapter not in self._slot_of and not self._can_take_slot(keep))):
            return None
        slot = self.device_slot(adapter, keep)
        return slot, self.slots.scales[slot].copy()

    def _can_take_slot(self, keep: Collection[int]) -> bool:
        return bool(self.slots.free_slots() or self._parkable(keep))

    def sample(
        self,
        adapter: int,
        prompt: np.ndarray,
        num_samples: int,
        params: SamplingParams,
        *,
        prompt_logprobs: bool,
        topk_prompt_logprobs: int,
        topk_sample_logprobs: int = 0,
    ) -> SampleResult:
        """Blocking: submits the request and drives the scheduler (and whatever else is queued)
        until it completes."""
        outcome: list[SampleResult | BaseException] = []

        def done(result: SampleResult | None, error: BaseException | None) -> None:
            outcome.append(error if error is not None else result)  # type: ignore[arg-type]

        self.submit_sample(
            adapter,
            prompt,
            num_samples,
            params,
            prompt_logprobs=prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs,
            on_done=done,
            topk_sample_logprobs=topk_sample_logprobs,
        )
        while not outcome:
            self.step_sampling()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

"""References for MoE model tests: the HF model on LoRA-merged weights, and its logprobs.

`MergedReference` is independent of our activation-side LoRA: every adapter factor is a torch
leaf tensor, merged into the weight it changes (a projection's [out, in] kernel, or an expert
stack's parameter, the shared factor broadcast over experts), and the HF model runs on the
merged weights through `torch.func.functional_call`, so autograd differentiates the
merged-weight formula.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from engine_testing import LORA_ALPHA
from transformers import AutoModelForCausalLM

ExpertLayout = Literal["out_in", "in_out"]
"""How the HF model holds its expert stacks: [E, out, in] (Qwen3-MoE) or [E, in, out] (gpt-oss)."""


def hf_logprobs(model: torch.nn.Module, sequence: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(sequence[:-1], dtype=torch.long)[None]).logits[0]
    return torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(sequence[1:], dtype=torch.long)[:, None])[:, 0].numpy()


class MergedReference:
    """The HF model with LoRA factors (torch leaves, requiring grad) merged into its weights."""

    def __init__(self, model_dir: Path, arrays: dict[str, np.ndarray], rank: int, experts: ExpertLayout) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.leaves = {key: torch.tensor(value, requires_grad=True) for key, value in arrays.items()}
        self.scale = LORA_ALPHA / rank
        self.experts = experts

    def weights(self) -> dict[str, torch.Tensor]:
        merged = dict(self.model.named_parameters())
        for key, a in self.leaves.items():
            if not key.endswith("lora_a"):
                continue
            b = self.leaves[key[: -len("lora_a")] + "lora_b"]
            module, lora, _ = key.rsplit(".", 2)
            if lora == "gate_up_lora":
                name, delta = f"{module}.gate_up_proj", torch.einsum("dr,ero->edo", a, b)
            elif lora == "down_lora":
                name, delta = f"{module}.down_proj", torch.einsum("eir,rd->eid", a, b)
            else:
                name, delta = f"{module}.weight", (a @ b).T
            if lora != "lora" and self.experts == "out_in":
                delta = delta.transpose(1, 2)
            merged[name] = merged[name] + self.scale * delta
        return merged

    def logprobs(self, sequence: np.ndarray) -> torch.Tensor:
        ids = torch.as_tensor(sequence[:-1], dtype=torch.long)[None]
        logits = torch.func.functional_call(self.model, self.weights(), (ids,)).logits[0]
        return torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(sequence[1:], dtype=torch.long)[:, None])[:, 0]

    def frozen(self) -> torch.nn.Module:
        """The HF model holding the merged weights (for `generate`)."""
        with torch.no_grad():
            self.model.load_state_dict({k: v.detach() for k, v in self.weights().items()}, strict=False)
        return self.model

"""Logprobs of a downloaded or exported PEFT adapter under transformers + peft, to compare with
what the server's `compute_logprobs` gives for the same weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def peft_logprobs(base_model_dir: str | Path, adapter_dir: Path | None, tokens: list[int]) -> np.ndarray:
    """log p(tokens[t] | tokens[:t]) for t >= 1 in float64, on the base model alone when
    `adapter_dir` is None."""
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        logits = model.eval()(torch.tensor([tokens])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0].numpy()

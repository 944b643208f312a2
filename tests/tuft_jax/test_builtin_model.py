"""The built-in tiny model and the test-checkpoint builder produce real, loadable HF checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from transformers import AutoConfig, AutoTokenizer

from tuft_jax import builtin_model
from tuft_jax.builtin_model import (
    BUILTIN_MODEL_NAME,
    LLAMA3_ROPE_PARAMETERS,
    build_tiny_hf_checkpoint,
    ensure_builtin_model,
)
from tuft_jax.tiny_tokenizer import EOS_TOKEN, IM_END_TOKEN, IM_START_TOKEN

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  Leading spaces, trailing tabs\t and\nnewlines\n\n",
    "Ünïcödé, 日本語, emoji 🙂 and numbers 3.14159!",
    f"{IM_START_TOKEN}user\nHello!{IM_END_TOKEN}\n{EOS_TOKEN}",
]


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_builtin_model_is_idempotent_and_deterministic(tmp_path: Path) -> None:
    first = ensure_builtin_model(tmp_path / "a")
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert ensure_builtin_model(tmp_path / "a") == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == mtimes
    assert [p.name for p in (tmp_path / "a").iterdir()] == [first.name]  # no temp dirs left

    second = ensure_builtin_model(tmp_path / "b")
    assert _file_bytes(first) == _file_bytes(second)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        _file_bytes(first)
    )
    assert BUILTIN_MODEL_NAME == "tuft/tiny-qwen3"


def test_builtin_model_losing_the_rename_race_uses_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_build = builtin_model.build_tiny_hf_checkpoint

    def build_after_another_process_won(out_dir: Path, *args: object, **kwargs: object) -> Path:
        monkeypatch.setattr(builtin_model, "build_tiny_hf_checkpoint", real_build)
        winner = ensure_builtin_model(tmp_path)  # the "other process" finishes first
        (winner / "winner").write_text("")
        return real_build(out_dir, *args, **kwargs)

    monkeypatch.setattr(builtin_model, "build_tiny_hf_checkpoint", build_after_another_process_won)
    path = ensure_builtin_model(tmp_path)
    assert (path / "winner").exists()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_builtin_model_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_build(out_dir: Path, *args: object, **kwargs: object) -> Path:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(builtin_model, "build_tiny_hf_checkpoint", failing_build)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_builtin_model(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_loads_offline_and_round_trips(tmp_path: Path) -> None:
    model_dir = ensure_builtin_model(tmp_path / "cache")
    script = textwrap.dedent(
        """
        import json, sys
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(sys.argv[1])
        texts = json.loads(sys.argv[2])
        print(json.dumps([tok.decode(tok.encode(t)) for t in texts]))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, "-c", script, str(model_dir), json.dumps(TEXTS)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == TEXTS


def test_tokenizer_special_tokens_vocab_and_chat_template(tmp_path: Path) -> None:
    model_dir = ensure_builtin_model(tmp_path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)

    assert len(tok) <= 1024
    assert config.vocab_size % 64 == 0 and len(tok) <= config.vocab_size < len(tok) + 64
    assert tok.eos_token == tok.pad_token == EOS_TOKEN
    assert config.eos_token_id == tok.eos_token_id
    special_ids = tok.convert_tokens_to_ids([EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN])
    assert special_ids == [len(tok) - 3, len(tok) - 2, len(tok) - 1]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    # Special tokens are single tokens, never split into bytes.
    assert tok.encode(IM_START_TOKEN + IM_END_TOKEN) == special_ids[1:]
    # Merges make common words single tokens, not byte sequences.
    assert len(tok.encode(" the model")) == 2

    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    ("family", "tie"), [("qwen3", False), ("qwen3", True), ("llama3", False), ("llama3", True)]
)
def test_transformers_loads_checkpoint_and_runs_forward(tmp_path: Path, family: str, tie: bool) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_hf_checkpoint(tmp_path, family, seed=3, tie_word_embeddings=tie)  # type: ignore[arg-type]
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32

    stored = load_file(model_dir / "model.safetensors")
    assert ("lm_head.weight" in stored) == (not tie)
    assert any("q_norm" in key for key in stored) == (family == "qwen3")
    state = model.state_dict()
    for key, value in stored.items():
        np.testing.assert_array_equal(state[key].numpy(), value)

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tok.encode("Hello, how are you today?")])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    # Weights are scaled so logits are O(1), not a near-uniform distribution.
    assert 0.3 < float(logits.std()) < 3.0


def test_llama3_checkpoint_has_llama3_rope_scaling(tmp_path: Path) -> None:
    model_dir = build_tiny_hf_checkpoint(tmp_path, "llama3", seed=0)
    raw = json.loads((model_dir / "config.json").read_text())
    assert raw["model_type"] == "llama"
    assert raw["rope_parameters"] == LLAMA3_ROPE_PARAMETERS
    config = AutoConfig.from_pretrained(model_dir)
    assert config.rope_parameters["rope_type"] == "llama3"
    assert config.rope_parameters["factor"] == 8.0
    assert config.rope_parameters["original_max_position_embeddings"] == 64


def test_seed_overrides_and_vocab_size(tmp_path: Path) -> None:
    a = load_file(build_tiny_hf_checkpoint(tmp_path / "a", "qwen3", seed=1) / "model.safetensors")
    b = load_file(build_tiny_hf_checkpoint(tmp_path / "b", "qwen3", seed=1) / "model.safetensors")
    c = load_file(build_tiny_hf_checkpoint(tmp_path / "c", "qwen3", seed=2) / "model.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert all(v.dtype == np.float32 for v in a.values())

    d = build_tiny_hf_checkpoint(tmp_path / "d", "qwen3", seed=0, vocab_size=640, num_hidden_layers=3, hidden_size=32)
    config = AutoConfig.from_pretrained(d)
    assert (config.vocab_size, config.num_hidden_layers, config.hidden_size) == (640, 3, 32)
    stored = load_file(d / "model.safetensors")
    assert stored["model.embed_tokens.weight"].shape == (640, 32)
    assert "model.layers.2.mlp.down_proj.weight" in stored

    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_tiny_hf_checkpoint(tmp_path / "e", "qwen3", seed=0, vocab_size=100)
    with pytest.raises(ValueError, match="unknown checkpoint family"):
        build_tiny_hf_checkpoint(tmp_path / "f", "gpt2", seed=0)  # type: ignore[arg-type]

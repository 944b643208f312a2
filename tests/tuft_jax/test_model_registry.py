"""models.yaml parsing: the default built-in model, path resolution and every rejected mistake."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tuft_jax.builtin_model import BUILTIN_MODEL_NAME, build_tiny_hf_checkpoint
from tuft_jax.model_registry import BaseModelSpec, load_model_specs


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("checkpoints")
    build_tiny_hf_checkpoint(root / "qwen", "qwen3", seed=0)
    build_tiny_hf_checkpoint(root / "llama", "llama3", seed=0)
    return root


def _entry(path: Path | str, **overrides: Any) -> dict[str, Any]:
    return {
        "name": "m",
        "path": str(path),
        "max_context_length": 512,
        "max_lora_rank": 8,
        "max_adapters": 2,
        **overrides,
    }


def _write_yaml(directory: Path, document: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "models.yaml"
    config_path.write_text(yaml.safe_dump(document))
    return config_path


def test_default_is_the_builtin_model(tmp_path: Path) -> None:
    (spec,) = load_model_specs(None, tmp_path / "cache")
    assert spec == BaseModelSpec(
        name=BUILTIN_MODEL_NAME,
        path=spec.path,
        max_context_length=2048,
        max_lora_rank=32,
        max_adapters=16,
        dtype="float32",
        family="qwen3",
    )
    assert spec.path.parent == tmp_path / "cache"
    assert (spec.path / "config.json").is_file()


def test_loads_entries_with_relative_absolute_and_home_paths(
    tmp_path: Path, checkpoints: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(checkpoints))
    build_tiny_hf_checkpoint(tmp_path / "ckpts" / "llama", "llama3", seed=0)
    config_path = _write_yaml(
        tmp_path / "conf",
        {
            "models": [
                _entry(checkpoints / "qwen", name="abs-qwen", dtype="bfloat16"),
                _entry("../ckpts/llama", name="rel-llama"),
                _entry("~/qwen", name="home-qwen", max_context_length=64),
            ]
        },
    )
    monkeypatch.chdir(checkpoints)  # relative paths follow the yaml file, not the cwd
    specs = load_model_specs(config_path, tmp_path / "cache")
    assert [s.name for s in specs] == ["abs-qwen", "rel-llama", "home-qwen"]
    assert [s.path for s in specs] == [checkpoints / "qwen", tmp_path / "ckpts" / "llama", checkpoints / "qwen"]
    assert [s.family for s in specs] == ["qwen3", "llama", "qwen3"]
    assert [s.dtype for s in specs] == ["bfloat16", "float32", "float32"]
    assert (specs[2].max_context_length, specs[2].max_lora_rank, specs[2].max_adapters) == (64, 8, 2)
    assert not (tmp_path / "cache").exists()  # the built-in model is only built when no config is given


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_model_specs(tmp_path / "nope.yaml", tmp_path)


def test_invalid_yaml(tmp_path: Path) -> None:
    config_path = tmp_path / "models.yaml"
    config_path.write_text("models: [unclosed")
    with pytest.raises(ValueError, match="invalid YAML"):
        load_model_specs(config_path, tmp_path)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "top-level mapping"),
        ({"model": []}, "top-level mapping"),
        ({"models": []}, "non-empty list"),
        ({"models": {"name": "m"}}, "non-empty list"),
        ({"models": ["qwen"]}, r"models\[0\]: expected a mapping"),
    ],
)
def test_bad_document_shape(tmp_path: Path, document: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_model_specs(_write_yaml(tmp_path, document), tmp_path)


def test_unknown_top_level_key(tmp_path: Path, checkpoints: Path) -> None:
    config_path = _write_yaml(tmp_path, {"models": [_entry(checkpoints / "qwen")], "defaults": {}})
    with pytest.raises(ValueError, match="unknown top-level key.*defaults"):
        load_model_specs(config_path, tmp_path)


def test_missing_keys(tmp_path: Path, checkpoints: Path) -> None:
    entry = _entry(checkpoints / "qwen")
    del entry["max_lora_rank"], entry["max_adapters"]
    with pytest.raises(ValueError, match=r"models\[0\]: missing key\(s\) max_lora_rank, max_adapters"):
        load_model_specs(_write_yaml(tmp_path, {"models": [entry]}), tmp_path)


def test_unknown_keys(tmp_path: Path, checkpoints: Path) -> None:
    entry = _entry(checkpoints / "qwen", max_rank=8)
    with pytest.raises(ValueError, match=r"unknown key\(s\) max_rank \(allowed: name, path"):
        load_model_specs(_write_yaml(tmp_path, {"models": [entry]}), tmp_path)


def test_duplicate_names(tmp_path: Path, checkpoints: Path) -> None:
    document = {"models": [_entry(checkpoints / "qwen", name="a"), _entry(checkpoints / "llama", name="a")]}
    with pytest.raises(ValueError, match=r"models\[1\]: duplicate model name 'a'"):
        load_model_specs(_write_yaml(tmp_path, document), tmp_path)


def test_nonexistent_path(tmp_path: Path) -> None:
    document = {"models": [_entry("missing-model")]}
    with pytest.raises(ValueError, match=r"models\[0\] \(m\): path .*missing-model does not exist"):
        load_model_specs(_write_yaml(tmp_path / "conf", document), tmp_path)


def test_path_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"\(m\): .*empty has no config.json"):
        load_model_specs(_write_yaml(tmp_path, {"models": [_entry(tmp_path / "empty")]}), tmp_path)


def test_unsupported_model_type(tmp_path: Path) -> None:
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        load_model_specs(_write_yaml(tmp_path, {"models": [_entry(tmp_path / "gpt2")]}), tmp_path)


@pytest.mark.parametrize("key", ["max_context_length", "max_lora_rank", "max_adapters"])
@pytest.mark.parametrize("value", [0, -4, True, "8", 2.5, None])
def test_limits_must_be_positive_integers(tmp_path: Path, checkpoints: Path, key: str, value: Any) -> None:
    document = {"models": [_entry(checkpoints / "qwen", **{key: value})]}
    with pytest.raises(ValueError, match=f"{key} must be a positive integer"):
        load_model_specs(_write_yaml(tmp_path, document), tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dtype": "float16"}, "dtype must be one of float32, bfloat16"),
        ({"name": ""}, "name must be a non-empty string"),
        ({"name": 7}, "name must be a non-empty string"),
        ({"path": ""}, "path must be a non-empty string"),
        ({"path": 3}, "path must be a non-empty string"),
        ({"kv_cache_tokens": 0}, "kv_cache_tokens must be a positive integer"),
        ({"kv_cache_tokens": 10}, "must hold one max_context_length sequence"),
        ({"tensor_parallel": True}, "tensor_parallel must be a positive integer"),
        ({"expert_parallel": 0}, "expert_parallel must be a positive integer"),
    ],
)
def test_bad_field_values(tmp_path: Path, checkpoints: Path, overrides: dict[str, Any], message: str) -> None:
    document = {"models": [{**_entry(checkpoints / "qwen"), **overrides}]}
    with pytest.raises(ValueError, match=message):
        load_model_specs(_write_yaml(tmp_path, document), tmp_path)


def test_example_models_yaml_is_valid_apart_from_its_paths(tmp_path: Path, checkpoints: Path) -> None:
    """The shipped example documents the real format: with existing paths it loads as is."""
    example = Path(__file__).resolve().parents[2] / "models" / "models.yaml"
    document = yaml.safe_load(example.read_text())
    for entry in document["models"]:
        entry["path"] = str(checkpoints / "qwen")
    specs = load_model_specs(_write_yaml(tmp_path, document), tmp_path)
    assert [(s.name, s.dtype, s.kv_cache_tokens, s.tensor_parallel, s.expert_parallel) for s in specs] == [
        ("Qwen/Qwen3-8B", "bfloat16", 262144, 2, 1),
        ("meta-llama/Llama-3.1-8B", "bfloat16", None, 1, 1),
        ("Qwen/Qwen3-30B-A3B", "bfloat16", None, 1, 1),
    ]

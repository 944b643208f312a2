"""The README's client example against mixture-of-experts base models served from models.yaml.

A tiny random Qwen3-MoE (8 experts, 2 per token, the published per-expert checkpoint layout)
and a tiny random gpt-oss (sinks, a sliding window of 8, YaRN, biased experts) are the models
of a server started with `--model-config`; the README's SDK flow (train, save state and sampler
weights, sample from them) runs verbatim against each, with the base model's name swapped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from live_server import ServerProcess
from tuft_jax.builtin_model import build_tiny_hf_checkpoint

README = Path(__file__).resolve().parents[2] / "README.md"
MODELS = {"tiny/qwen3-moe": "qwen3_moe", "tiny/gpt-oss": "gpt_oss"}


@pytest.fixture(scope="module")
def moe_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("moe")
    entries = []
    for name, family in MODELS.items():
        model_dir = build_tiny_hf_checkpoint(root / family, family, seed=0)  # type: ignore[arg-type]
        entries.append(f"  - {{name: {name}, path: {model_dir}, max_context_length: 512, max_lora_rank: 8, max_adapters: 2}}\n")
    (root / "models.yaml").write_text("models:\n" + "".join(entries))
    server = ServerProcess(root, args=["--model-config", str(root / "models.yaml")])
    try:
        yield server.start().url
    finally:
        server.stop()


@pytest.mark.parametrize("model", list(MODELS))
def test_readme_flow_trains_and_samples_a_moe_model(moe_server: str, model: str) -> None:
    (code,) = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[:1]
    code = code.replace("http://127.0.0.1:8080", moe_server).replace('"tuft/tiny-qwen3"', f'"{model}"')
    assert model in code
    printed: list[tuple] = []
    exec(compile(code, str(README), "exec"), {"print": lambda *args: printed.append(args)})
    assert printed[0] == (list(MODELS),)
    losses = [args[1] for args in printed[1:11]]
    assert [args[0] for args in printed[1:11]] == list(range(10))
    assert losses[-1] < 0.5 * losses[0], losses
    assert len(printed) == 13  # two decoded samples

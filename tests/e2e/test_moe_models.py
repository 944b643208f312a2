"""The README's client example against mixture-of-experts base models served from models.yaml.

A tiny random Qwen3-MoE (8 experts, 2 per token, the published per-expert checkpoint layout) is
the only model of a server started with `--model-config`; the README's SDK flow (train, save
state and sampler weights, sample from them) runs verbatim with the base model's name swapped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from live_server import ServerProcess
from tuft_jax.builtin_model import build_tiny_hf_checkpoint

README = Path(__file__).resolve().parents[2] / "README.md"
MOE_MODEL = "tiny/qwen3-moe"


@pytest.fixture(scope="module")
def moe_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("moe")
    model_dir = build_tiny_hf_checkpoint(root / "tiny-qwen3-moe", "qwen3_moe", seed=0)
    (root / "models.yaml").write_text(
        f"models:\n  - {{name: {MOE_MODEL}, path: {model_dir}, max_context_length: 512, max_lora_rank: 8, max_adapters: 2}}\n"
    )
    server = ServerProcess(root, args=["--model-config", str(root / "models.yaml")])
    try:
        yield server.start().url
    finally:
        server.stop()


def test_readme_flow_trains_and_samples_a_qwen3_moe(moe_server: str) -> None:
    (code,) = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[:1]
    code = code.replace("http://127.0.0.1:8080", moe_server).replace('"tuft/tiny-qwen3"', f'"{MOE_MODEL}"')
    assert MOE_MODEL in code
    printed: list[tuple] = []
    exec(compile(code, str(README), "exec"), {"print": lambda *args: printed.append(args)})
    assert printed[0] == ([MOE_MODEL],)
    losses = [args[1] for args in printed[1:11]]
    assert [args[0] for args in printed[1:11]] == list(range(10))
    assert losses[-1] < 0.5 * losses[0], losses
    assert len(printed) == 13  # two decoded samples

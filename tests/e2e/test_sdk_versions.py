"""The same client flow under the newest tinker SDK and the oldest supported one (0.25).

The newest is the SDK pinned in pyproject.toml's test extra (this venv); the oldest lives in
`.venv-sdk-old`, built from `requirements-sdk-old.txt` by `scripts/setup_extra_venvs.sh`
(which `scripts/test.sh` runs). Each runs `sdk_compat_client.py` as a subprocess against the
session's server; with the same LoRA seed both must also produce the same numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CLIENT = HERE / "sdk_compat_client.py"
OLD_REQUIREMENTS = HERE / "requirements-sdk-old.txt"
BASE_MODEL = "tuft/tiny-qwen3"
OLDEST_SUPPORTED = (0, 25)


def _pinned_tinker(requirements: Path) -> str:
    for line in requirements.read_text().splitlines():
        if line.strip().lower().startswith("tinker=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{requirements} pins no tinker version")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3])


SDKS = {
    "newest": (Path(sys.executable), version("tinker")),
    "oldest": (REPO / ".venv-sdk-old" / "bin" / "python", _pinned_tinker(OLD_REQUIREMENTS)),
}
_results: dict[str, dict] = {}


def test_versions_span_the_supported_range() -> None:
    newest, oldest = (_version_tuple(SDKS[k][1]) for k in ("newest", "oldest"))
    assert oldest >= OLDEST_SUPPORTED, SDKS
    assert oldest < newest, SDKS


@pytest.mark.parametrize("which", list(SDKS))
def test_client_flow_under_sdk(which: str, server_url: str) -> None:
    python, expected_version = SDKS[which]
    if not python.exists():
        message = f"{python.parent.parent.name} is missing; scripts/setup_extra_venvs.sh builds it"
        if os.environ.get("TUFT_REQUIRE_EXTRA_VENVS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    env = {**os.environ, "TINKER_TELEMETRY": "0", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("TINKER_BASE_URL", None)
    env.pop("TINKER_API_KEY", None)
    proc = subprocess.run(
        [str(python), str(CLIENT), server_url, BASE_MODEL],
        cwd=HERE,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"tinker {expected_version} client flow failed:\n{proc.stdout}\n{proc.stderr[-8000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["sdk_version"] == expected_version
    _results[which] = result


def test_sdk_versions_get_identical_results() -> None:
    """Same seed, data and hyperparameters: the SDK version must not change what the server computes."""
    if len(_results) < len(SDKS):
        pytest.skip("needs every SDK's client flow to have run and passed in this session")
    newest, oldest = _results["newest"], _results["oldest"]
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(newest["losses"], oldest["losses"], strict=True)), (
        newest["losses"],
        oldest["losses"],
    )
    assert newest["sampled"] == oldest["sampled"]

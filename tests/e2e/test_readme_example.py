"""The README's client example, run verbatim (only the port differs) against a live server."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_client_example_runs(server_url: str) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace("http://127.0.0.1:8080", server_url)
    assert code.count(server_url) == 2
    exec(compile(code, str(README), "exec"), {})

"""The README's client examples (the SDK's, then the openai and anthropic packages' on the
adapter it trained), run verbatim (only the port differs) against a live server."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_client_examples_run(server_url: str) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 2, "README should have the SDK example and the openai / anthropic one"
    namespace: dict = {}
    for block in blocks:
        code = block.replace("http://127.0.0.1:8080", server_url)
        assert code.count(server_url) == 2
        exec(compile(code, str(README), "exec"), namespace)

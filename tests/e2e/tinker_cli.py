"""The SDK's `tinker` console script, run as a subprocess the way a user runs it: base URL and
key from the environment, its own HOME for the credentials `tinker auth login` stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TINKER = Path(sys.executable).with_name("tinker")
"""The console script installed with the SDK, next to this interpreter."""


@dataclass(frozen=True)
class Cli:
    base_url: str
    api_key: str
    home: Path
    """HOME and working directory of the CLI: where `tinker auth login` stores its credentials."""

    def run(self, *args: str, stdin: str = "", with_key: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `tinker ARGS` (with TINKER_API_KEY unless `with_key` is false) on `stdin`, so a
        prompt never waits for a terminal; it must succeed."""
        env = {**os.environ, "HOME": str(self.home), "TINKER_BASE_URL": self.base_url, "TINKER_TELEMETRY": "0"}
        env.pop("TINKER_API_KEY", None)
        if with_key:
            env["TINKER_API_KEY"] = self.api_key
        done = subprocess.run(
            [str(TINKER), *args], input=stdin, capture_output=True, text=True, env=env, cwd=self.home, timeout=300
        )
        assert done.returncode == 0, f"tinker {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.run("--format", "json", *args).stdout)

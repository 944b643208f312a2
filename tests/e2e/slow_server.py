"""`python tests/e2e/slow_server.py SIGNAL_DIR [tuft arguments]`: the real server, except that
while `SIGNAL_DIR/slow` exists every forward_backward first creates `SIGNAL_DIR/in-forward`
and then blocks. A test can thus kill the server with a request reliably in flight."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tuft_jax.engine import Engine

signals = Path(sys.argv.pop(1))
_forward_backward = Engine.forward_backward


def _slow_forward_backward(self, *args, **kwargs):
    if (signals / "slow").exists():
        (signals / "in-forward").touch()
        while True:
            time.sleep(1)
    return _forward_backward(self, *args, **kwargs)


Engine.forward_backward = _slow_forward_backward

from server.cli import main  # noqa: E402

main()

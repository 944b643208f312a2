"""JAX's persistent compilation cache, so a restarted server reuses every compiled step."""

from __future__ import annotations

from pathlib import Path

import jax


def enable_compilation_cache(directory: Path) -> None:
    """Caches every compiled program under `directory` (trusted: it holds executable code)."""
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

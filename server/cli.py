"""`tuft` console script: load the configured base models and serve the Tinker API."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import uvicorn

DEFAULT_CACHE_DIR = Path("~/.cache/tuft")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tuft", description="Tinker-compatible LoRA fine-tuning service on JAX")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=DEFAULT_CACHE_DIR / "checkpoints", help="where checkpoints are written"
    )
    parser.add_argument(
        "--model-config", type=Path, default=None, help="models.yaml; without it the built-in tiny model is served"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="where the built-in model and the JAX compilation cache live"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Imported here so `tuft --help` answers without loading JAX.
    from server.app import build_app
    from tuft_jax.compile_cache import enable_compilation_cache
    from tuft_jax.engine import Engine
    from tuft_jax.model_registry import load_model_specs

    cache_dir = args.cache_dir.expanduser()
    enable_compilation_cache(cache_dir / "jax-compilation-cache")
    specs = load_model_specs(args.model_config, cache_dir)
    engines = {}
    for spec in specs:
        logging.getLogger(__name__).info("loading base model %s from %s", spec.name, spec.path)
        engines[spec.name] = Engine(spec)
    app = build_app(engines, args.checkpoint_dir.expanduser())
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)

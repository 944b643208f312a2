"""`tuft` console script: serve the Tinker API, and manage API keys.

    tuft [serve] [--port 8080] [--checkpoint-dir DIR] [--db URL] [--auth auto|required|open] [--public-url URL] ...
    tuft api-key create --name NAME [--max-runs N] [--tokens-per-day N] [--db URL | --checkpoint-dir DIR]
    tuft api-key list    [--db URL | --checkpoint-dir DIR]
    tuft api-key revoke KEY_ID [--db URL | --checkpoint-dir DIR]
    tuft api-key quota KEY_ID [--max-runs N|none] [--tokens-per-day N|none] [--db URL | --checkpoint-dir DIR]

Metadata (sessions, runs, checkpoints, keys, request status) lives in the database given by
`--db`: `sqlite:///relative.db`, `sqlite:////absolute/path.db` or `postgresql://...` (needs
psycopg). Without `--db` it is the SQLite file `{checkpoint-dir}/tuft.db`, so the server and
the key commands find the same database from the same `--checkpoint-dir`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

if TYPE_CHECKING:
    from server.store import Quota

DEFAULT_CACHE_DIR = Path("~/.cache/tuft")
DEFAULT_CHECKPOINT_DIR = DEFAULT_CACHE_DIR / "checkpoints"
GRACEFUL_SHUTDOWN_S = 3.0
"""After SIGTERM, how long requests still running may take before they are cancelled.
Long-polls answer at once and the running engine call is waited for separately (by the
app's shutdown), so this only bounds slow uploads and the like."""


def _add_database_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=DEFAULT_CHECKPOINT_DIR, help="where checkpoints are written"
    )
    parser.add_argument(
        "--db",
        default=None,
        metavar="URL",
        help="metadata database: sqlite:///path.db or postgresql://user@host/db (default: {checkpoint-dir}/tuft.db)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from server.api_keys import AUTH_MODES

    parser = argparse.ArgumentParser(prog="tuft", description="Tinker-compatible LoRA fine-tuning service on JAX")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    _add_database_args(parser)
    parser.add_argument(
        "--auth",
        choices=AUTH_MODES,
        default="auto",
        help="auto (default): any tml- key works until an API key is created, then only created keys; "
        "required: only created keys; open: any key (each key is its own tenant)",
    )
    parser.add_argument(
        "--model-config", type=Path, default=None, help="models.yaml; without it the built-in tiny model is served"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="where the built-in model and the JAX compilation cache live"
    )
    parser.add_argument(
        "--public-url",
        default=None,
        metavar="URL",
        help="http(s)://host[:port][/prefix] clients reach this server at, used in the download URLs it hands "
        "out (default: the address each request came to)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    multihost = parser.add_argument_group(
        "multi-host", "run one process per host; process 0 serves HTTP and drives the others"
    )
    multihost.add_argument("--coordinator-address", metavar="HOST:PORT", help="process 0's address for jax.distributed")
    multihost.add_argument("--num-processes", type=int, default=1)
    multihost.add_argument("--process-id", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_processes > 1 and not args.coordinator_address:
        parser.error("--num-processes > 1 needs --coordinator-address")
    if not 0 <= args.process_id < args.num_processes:
        parser.error(f"--process-id must be in [0, {args.num_processes})")
    if args.public_url is not None and not args.public_url.startswith(("http://", "https://")):
        parser.error(f"--public-url must start with http:// or https://, got {args.public_url!r}")
    return args


def _open_store(args: argparse.Namespace):
    from server.store_sql import StoreError, open_store

    try:
        return open_store(args.db, args.checkpoint_dir.expanduser())
    except StoreError as exc:
        sys.exit(f"tuft: {exc}")


def serve(argv: list[str]) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    checkpoint_dir = args.checkpoint_dir.expanduser()
    leader = args.process_id == 0
    store = _open_store(args) if leader else None  # before loading models, so a bad --db fails at once
    # Imported here so `tuft --help` answers without loading JAX.
    from server.app import build_app
    from server.config import ServerOptions
    from tuft_jax import multihost
    from tuft_jax.compile_cache import enable_compilation_cache
    from tuft_jax.engine import Engine
    from tuft_jax.model_registry import load_model_specs

    if args.num_processes > 1:
        multihost.initialize(multihost.ProcessGroup(args.coordinator_address, args.num_processes, args.process_id))
    cache_dir = args.cache_dir.expanduser()
    enable_compilation_cache(cache_dir / "jax-compilation-cache")
    specs = load_model_specs(args.model_config, cache_dir)
    engines = {}
    for spec in specs:
        logging.getLogger(__name__).info("loading base model %s from %s", spec.name, spec.path)
        engines[spec.name] = Engine(spec)
    if not leader:
        multihost.serve_workers(engines)
        return
    on_shutdown = None
    if args.num_processes > 1:
        for name, engine in engines.items():
            engine.broadcaster = multihost.Broadcaster(name)
        on_shutdown = multihost.shutdown_workers
    options = ServerOptions(auth=args.auth, public_url=args.public_url)
    app = build_app(engines, checkpoint_dir, options=options, store=store, on_shutdown=on_shutdown)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S
    )
    _Server(config, on_exit=app.state.shutting_down.set).run()


class _Server(uvicorn.Server):
    """Also tells the app when a signal starts the shutdown: uvicorn waits for open requests
    before the app hears of it, and a long-poll would hold that wait for up to `future_hold_s`."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # The handler runs on the loop's thread, between any two bytecodes: hand over safely.
        asyncio.get_running_loop().call_soon_threadsafe(self._on_exit)


def _limit(text: str) -> int | None:
    """A quota value: a positive integer, or `none` for no limit."""
    if text.lower() == "none":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}")
    return int(text)


def _add_quota_args(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--max-runs", type=_limit, default=default, metavar="N|none", help="training runs the key may have at once"
    )
    parser.add_argument(
        "--tokens-per-day",
        type=_limit,
        default=default,
        metavar="N|none",
        help="training + prompt + sampled tokens per UTC day",
    )


def _key_id(text: str) -> str:
    """A key id, given as the id or as the whole `tml-{id}-{secret}` key."""
    return text.removeprefix("tml-").split("-")[0]


def _quota_text(quota: Quota) -> str:
    runs, tokens = quota.max_concurrent_runs, quota.max_tokens_per_day
    return f"runs<={'any' if runs is None else runs} tokens/day<={'any' if tokens is None else tokens}"


def api_key(argv: list[str]) -> None:
    from server.api_keys import create_api_key
    from server.store import Quota

    parser = argparse.ArgumentParser(prog="tuft api-key", description="manage the API keys this server accepts")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key and print it (it is shown only once)")
    create.add_argument("--name", required=True, help="what the key is for (shown by `list`)")
    _add_quota_args(create, None)
    _add_database_args(create)
    listing = commands.add_parser("list", help="list keys (ids and names; the keys themselves are not stored)")
    _add_database_args(listing)
    revoke = commands.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    _add_database_args(revoke)
    quota = commands.add_parser("quota", help="show or change a key's quotas (a 429 once reached)")
    quota.add_argument("key_id")
    _add_quota_args(quota, argparse.SUPPRESS)
    _add_database_args(quota)
    args = parser.parse_args(argv)
    store = _open_store(args)
    try:
        if args.command == "create":
            try:
                key, record = create_api_key(store, args.name)
            except ValueError as exc:
                sys.exit(f"tuft: {exc}")
            store.set_quota(record.key_id, Quota(args.max_runs, args.tokens_per_day))
            print(key)
            print(
                f"created API key {record.key_id} ({record.name}). Store it now: it cannot be shown again. "
                "The server now accepts only created keys (unless started with --auth open).",
                file=sys.stderr,
            )
        elif args.command == "list":
            for record in store.list_api_keys():
                state = "active" if record.revoked_at is None else f"revoked {record.revoked_at:%Y-%m-%d %H:%M:%S}"
                limits = _quota_text(store.get_quota(record.key_id))
                print(f"{record.key_id}\t{record.created_at:%Y-%m-%d %H:%M:%S}\t{state}\t{limits}\t{record.name}")
        elif args.command == "quota":
            key_id = _key_id(args.key_id)
            if store.get_api_key(key_id) is None:
                sys.exit(f"tuft: no API key with id {key_id!r}")
            current = store.get_quota(key_id)
            updated = Quota(
                getattr(args, "max_runs", current.max_concurrent_runs),
                getattr(args, "tokens_per_day", current.max_tokens_per_day),
            )
            store.set_quota(key_id, updated)
            print(f"{key_id}\t{_quota_text(updated)}")
        else:
            from server.sessions import utc_now

            key_id = _key_id(args.key_id)
            if not store.revoke_api_key(key_id, utc_now()):
                sys.exit(f"tuft: no active API key with id {key_id!r}")
            print(f"revoked API key {key_id}", file=sys.stderr)
    finally:
        store.close()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["api-key"]:
        api_key(argv[1:])
    elif argv[:1] == ["serve"]:
        serve(argv[1:])
    else:
        serve(argv)

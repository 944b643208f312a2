"""Checkpoint downloads: signed URLs for the files of `external_weights` checkpoints (what
`tinker checkpoint download` of SDK 0.38 fetches), and the tar.gz archive of SDKs <= 0.25.

A caller who may read a checkpoint gets URLs signed with the server's key
(server.url_signing, `Service.signed_url`) that a plain HTTP client fetches without an API key
until they expire (`ServerOptions.download_url_s`). A signed request has no caller
(server.auth exempts it), so no ownership check could pass: the signature, handed only to a
reader, stands in for one. It covers one path, so it opens nothing else; file names are
validated like checkpoint names, so no path leaves the checkpoint's directory. The routes are dispatched by
`server.routes.rest.checkpoint_resource`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse

from server import checkpoint_files
from server.auth import current_owner
from server.errors import ApiError, Forbidden, NotFound
from server.http import json_response
from server.paths import CheckpointRef, validate_name
from server.service import Service
from server.sessions import utc_now
from server.wire.types import ExternalWeightsUrlsResponse
from tuft_jax.errors import InputError

FILES = "files"
"""`.../checkpoints/external_weights/{name}/files/{file}`: one file of the checkpoint."""
ARCHIVE = "archive"
"""`.../checkpoints/{kind}/{name}/archive`: the checkpoint as a tar.gz."""


def _require_external(ref: CheckpointRef, what: str) -> None:
    if ref.kind != "external_weights":
        raise InputError(
            f"{what} exists only for external_weights checkpoints, not {ref.tinker_path}; "
            "export one with save_weights_external"
        )


def _signed_path(ref: CheckpointRef, *rest: str) -> str:
    """The canonical path a signature covers: `rest` under the checkpoint's URL."""
    return "/".join((f"/api/v1/training_runs/{ref.model_id}/checkpoints/{ref.checkpoint_id}", *rest))


def external_weights_urls(request: Request, service: Service, ref: CheckpointRef) -> Response:
    """A signed URL for every file of the checkpoint, keyed by its name."""
    _require_external(ref, "external_weights_urls")
    directory = service.checkpoint_directory(ref, "download")
    expires = service.url_expiry()
    urls = {
        entry.name: service.signed_url(request, _signed_path(ref, FILES, entry.name), expires)
        for entry in sorted(directory.iterdir())
        if entry.is_file() and not entry.is_symlink()
    }
    return json_response(ExternalWeightsUrlsResponse(urls=urls, expires=datetime.fromtimestamp(expires, UTC)))


def external_weights_file(request: Request, service: Service, ref: CheckpointRef, name: str) -> Response:
    """One file, for a valid signature (no API key) or for a caller who may read the checkpoint."""
    _require_external(ref, "a file download")
    validate_name(name)
    refusal = Forbidden("this download URL is invalid or has expired; ask for new ones with external_weights_urls")
    path = _directory(request, service, ref, _signed_path(ref, FILES, name), refusal) / name
    if path.is_symlink() or not path.is_file():
        raise NotFound(f"{ref.tinker_path} has no file {name!r}")
    return FileResponse(path, filename=name, stat_result=path.stat())


def _directory(request: Request, service: Service, ref: CheckpointRef, signed_path: str, refusal: ApiError) -> Path:
    """The checkpoint's directory for a caller who may read it, or for a request without a key
    that carries a valid signature for `signed_path` (`refusal` if it does not), as long as the
    checkpoint still exists and has not expired."""
    if current_owner() is not None:
        return service.checkpoint_directory(ref, "download")
    if not service.url_signer.is_valid(signed_path, request.query_params):
        raise refusal
    record = service.store.get_checkpoint(ref)
    directory = ref.directory(service.checkpoint_dir)
    if record is None or record.expired(utc_now()) or not directory.is_dir():
        raise NotFound(f"checkpoint {ref.tinker_path} does not exist any more")
    return directory


def archive(request: Request, service: Service, ref: CheckpointRef) -> Response:
    """The checkpoint directory as a streamed tar.gz (entries under `{name}/`).

    SDKs <= 0.25 (`get_checkpoint_archive_url`, `tinker checkpoint download`) ask with
    `Accept: application/json` for `{"url", "expires"}` and then fetch the URL with a plain
    HTTP client, so they get a link signed for this path.
    """
    signed_path = _signed_path(ref, ARCHIVE)
    directory = _directory(request, service, ref, signed_path, NotFound("this download link is invalid or has expired"))
    if current_owner() is not None and request.headers.get("accept") == "application/json":
        expires = service.url_expiry()
        link = service.signed_url(request, signed_path, expires)
        return json_response({"url": link, "expires": datetime.fromtimestamp(expires, UTC)})
    filename = f"{ref.model_id.replace(':', '_')}-{ref.kind}-{ref.name}.tar.gz"
    return StreamingResponse(
        checkpoint_files.archive_chunks(directory, ref.name),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )

"""What the server accepts and keeps of uploads: the limits, an ASGI guard on request bodies, pruning."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

MB = 1 << 20
#: Largest upload accepted, in MiB: a 4096x4096 photo is 5-15 MB as JPEG, up to ~40 MB as PNG.
MAX_UPLOAD_MB = 48
#: Uploads kept on disk: the most recent ones, at most this many and this many MiB; older ones are deleted.
KEEP_UPLOADS = 64
UPLOAD_SPACE_MB = 1024
#: Room for the multipart headers around one upload, and for the JSON of an edit request.
REQUEST_OVERHEAD = 64 * 1024


@dataclass(frozen=True)
class UploadLimits:
    """What the server accepts and keeps of uploads (``fireflow serve --max-upload-mb ...``)."""

    max_bytes: int = MAX_UPLOAD_MB * MB  #: one upload, and one request body of any kind
    keep: int = KEEP_UPLOADS  #: uploads kept on disk, newest first
    space: int = UPLOAD_SPACE_MB * MB  #: bytes of uploads kept on disk

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.keep < 1 or self.space < self.max_bytes:
            raise ValueError(f"bad upload limits {self}: all positive, space >= max_bytes")


class RequestGuard:
    """ASGI middleware: every request body within the upload limit (refused from its declared length,
    before a byte is read), and after each upload the stored uploads pruned to the limits, oldest first.

    Gradio alone caps each file, but takes 1000 files a request and keeps every upload until exit.
    """

    def __init__(self, app: Any, blocks: Any, limits: UploadLimits):
        self.app, self.blocks, self.limits = app, blocks, limits

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        limit = self.limits.max_bytes + REQUEST_OVERHEAD
        if length is None and b"transfer-encoding" in headers:
            await _plain(send, 411, "Send the upload with a Content-Length header.")
            return
        try:
            n = int(length or 0)
        except ValueError:
            n = -1
        if n < 0:
            await _plain(send, 400, "Bad Content-Length header.")
            return
        if n > limit:
            mb = self.limits.max_bytes / MB
            await _plain(send, 413, f"The upload is {n / MB:.1f} MB; this server takes at most {mb:g} MB.")
            return
        await self.app(scope, receive, send)
        if scope["path"].rstrip("/").endswith("/upload"):
            prune_uploads(self.blocks.upload_file_set, self.limits.keep, self.limits.space)


async def _plain(send: Any, status: int, text: str) -> None:
    body = text.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def prune_uploads(uploads: set[str], keep: int, space: int) -> list[str]:
    """Delete the oldest uploads beyond the newest ``keep`` and beyond ``space`` bytes in all.

    ``uploads`` is Gradio's set of uploaded paths (each in a folder of its own); deleted ones leave
    it. The newest upload is always kept. Returns the deleted paths.
    """
    found = []
    for path in list(uploads):
        try:
            st = os.stat(path)
        except OSError:
            uploads.discard(path)
            continue
        found.append((st.st_mtime_ns, path, st.st_size))
    found.sort(reverse=True)  # newest first
    removed, count, total = [], 0, 0
    for _, path, size in found:
        if count == 0 or (not removed and count < keep and total + size <= space):
            count, total = count + 1, total + size
            continue
        uploads.discard(path)
        removed.append(path)
        try:
            os.unlink(path)
            os.rmdir(os.path.dirname(path))  # Gradio's per-upload folder, if nothing else is in it
        except OSError:
            pass
    return removed

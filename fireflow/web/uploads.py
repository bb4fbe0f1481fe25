"""What the server accepts and keeps of uploads: the limits, an ASGI guard on request bodies, pruning."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MB = 1 << 20
#: Largest upload accepted, in MiB: a 4096x4096 photo is 5-15 MB as JPEG, up to ~40 MB as PNG.
MAX_UPLOAD_MB = 48
#: Uploads kept on disk: the most recent ones, at most this many and this many MiB; older ones are deleted.
KEEP_UPLOADS = 64
UPLOAD_SPACE_MB = 1024
#: Requests one client address may have waiting or running at once (more are answered 429).
PER_CLIENT = 8
#: Room for the multipart headers around one upload, and for the JSON of an edit request.
REQUEST_OVERHEAD = 64 * 1024


@dataclass(frozen=True)
class UploadLimits:
    """What the server accepts and keeps of uploads (``fireflow serve --max-upload-mb ...``)."""

    max_bytes: int = MAX_UPLOAD_MB * MB  #: one upload, and one request body of any kind
    keep: int = KEEP_UPLOADS  #: uploads kept on disk, newest first
    space: int = UPLOAD_SPACE_MB * MB  #: bytes of uploads kept on disk
    per_client: int = PER_CLIENT  #: requests one client address may have waiting or running

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
        self.protected: set[str] | None = None  # files in Gradio's folder before the first upload
        self.by_hash: dict[str, str] = {}  # Gradio's hash of an upload's bytes -> where they are kept
        self.joining: dict[str, int] = {}  # client address -> its requests to queue an edit inside Gradio now

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
        path = scope["path"].rstrip("/")
        if path.endswith("/queue/join") or "/call/" in path:
            host = (scope.get("client") or ("",))[0]
            # Joins still inside Gradio count too: sent at once, all would pass before any is queued.
            busy = queued_by(self.blocks, host) + self.joining.get(host, 0)
            if busy >= self.limits.per_client:
                await _plain(
                    send,
                    429,
                    f"This client has {busy} edits waiting or running; this server takes at most "
                    f"{self.limits.per_client} at once from one client. Wait for one to finish.",
                )
                return
            self.joining[host] = self.joining.get(host, 0) + 1
            try:
                await self.app(scope, receive, _own_parse_error(send))
            finally:
                self.joining[host] -= 1
                if not self.joining[host]:
                    del self.joining[host]
            return
        if not path.endswith("/upload"):
            await self.app(scope, receive, send)
            return
        # Gradio stores an upload at <its folder>/<hash of the bytes>/<the client's file name>: the
        # very path of a cached example (or result) with the same bytes and name. Each upload is
        # moved to a folder of its own under a name this server makes; a file that was there
        # before (an example) is copied, never moved, so pruning never reaches it.
        if self.protected is None:
            self.protected = _files_now(self.blocks)
        held: list[dict] = []

        async def hold(message: dict) -> None:
            held.append(message)

        await self.app(scope, receive, hold)
        start = next((m for m in held if m["type"] == "http.response.start"), None)
        body = b"".join(m.get("body", b"") for m in held if m["type"] == "http.response.body")
        if start is not None and start["status"] == 200:
            try:
                paths = json.loads(body)
                moved = [relocate_upload(p, self.blocks.upload_file_set, self.protected, self.by_hash) for p in paths]
                body = json.dumps(moved).encode()
                headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                start = {**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
            except (ValueError, TypeError, OSError):  # not the list of paths Gradio answers: left as it was
                pass
        if start is not None:
            await send(start)
            await send({"type": "http.response.body", "body": body})
        prune_uploads(self.blocks.upload_file_set, self.limits.keep, self.limits.space)


def queued_by(blocks: Any, host: str) -> int:
    """Events from client address ``host`` waiting in Gradio's queue or running now."""
    queue = getattr(blocks, "_queue", None)
    if queue is None:
        return 0
    events = [e for q in list(queue.event_queue_per_concurrency_id.values()) for e in list(q.queue)]
    events += [e for job in list(queue.active_jobs) if job for e in job]
    n = 0
    for e in events:
        client = getattr(getattr(e, "request", None), "client", None)
        if client is not None and getattr(client, "host", None) == host:
            n += 1
    return n


#: In place of FastAPI's "There was an error parsing the body": what Python's JSON parser refuses
#: though the JSON is well formed.
UNREADABLE_REQUEST = "The edit request cannot be read: a number in it has more than 4300 digits, or it nests too deep."


def _own_parse_error(send: Any) -> Any:
    """``send``, with FastAPI's 400 for a body its JSON parser gave up on replaced by :data:`UNREADABLE_REQUEST`."""
    held: list[dict] = []

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start" and message["status"] == 400:
            held.append(message)  # until its body shows what it is
            return
        if held and message["type"] == "http.response.body":
            start = held.pop()
            if b"There was an error parsing the body" in message.get("body", b""):
                await _plain(send, 400, UNREADABLE_REQUEST)
                return
            await send(start)
        await send(message)

    return wrapped


async def _plain(send: Any, status: int, text: str) -> None:
    body = text.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


#: Uploads go to <Gradio's folder>/UPLOADS/<a random name>/upload<suffix>.
UPLOADS = "uploads"


def _gradio_folder() -> Path:
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder())


def _files_now(blocks: Any) -> set[str]:
    """Every file in Gradio's folder now (the examples, cached at startup), bar uploads."""
    root = _gradio_folder()
    uploads = set(getattr(blocks, "upload_file_set", ()))
    return {str(p) for p in root.glob("*/*") if p.is_file() and str(p) not in uploads}


def relocate_upload(path: str, uploads: set[str], protected: set[str], by_hash: dict[str, str] | None = None) -> str:
    """Move (or, for a protected file, copy) one stored upload to a fresh folder under a server-made
    name; ``uploads`` (Gradio's set of upload paths) follows. Returns the new path.

    ``by_hash`` maps Gradio's hash of the bytes (its folder's name) to where they were put: the same
    bytes again (the mask painter re-sends its background with every stroke) reuse that file, made
    newest, rather than push the source out of the uploads kept.
    """
    src = Path(path)
    key = src.parent.name
    if by_hash is not None:
        known = by_hash.get(key)
        if known and known in uploads and os.path.isfile(known):
            os.utime(known)
            uploads.discard(path)
            if path not in protected:
                try:
                    src.unlink()
                    src.parent.rmdir()
                except OSError:
                    pass
            return known
    root = _gradio_folder() / UPLOADS
    root.mkdir(parents=True, exist_ok=True)
    suffix = "".join(c for c in src.suffix.lower()[:8] if c.isalnum() or c == ".")
    folder = root / secrets.token_hex(16)
    folder.mkdir()
    dest = folder / f"upload{suffix}"
    uploads.discard(path)
    if path in protected:
        shutil.copyfile(src, dest)
    else:
        os.replace(src, dest)
        try:
            src.parent.rmdir()  # Gradio's per-hash folder, if nothing else is in it
        except OSError:
            pass
    uploads.add(str(dest))
    if by_hash is not None:
        by_hash[key] = str(dest)
    return str(dest)


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

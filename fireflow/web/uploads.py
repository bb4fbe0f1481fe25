"""What the server accepts and keeps of uploads: the limits, an ASGI guard on request bodies, pruning."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
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
#: Room for the multipart headers around one upload.
REQUEST_OVERHEAD = 64 * 1024
#: Largest request body that is not a file upload (an edit's JSON, a queue join), in MiB: parsed
#: whole in memory, a 40 MiB JSON array of numbers took 320 MB of it.
MAX_BODY_MB = 2
#: The routes whose multipart bodies are files (Gradio's upload route, the mask painter's images),
#: bounded by the upload limit; every other body (JSON to these routes too) is bounded by ``max_body``.
UPLOAD_ROUTES = ("/upload", "/component_server")


@dataclass(frozen=True)
class UploadLimits:
    """What the server accepts and keeps of uploads (``fireflow serve --max-upload-mb ...``)."""

    max_bytes: int = MAX_UPLOAD_MB * MB  #: one upload (a request body to an upload route)
    keep: int = KEEP_UPLOADS  #: uploads kept on disk, newest first
    space: int = UPLOAD_SPACE_MB * MB  #: bytes of uploads kept on disk
    per_client: int = PER_CLIENT  #: requests one client address may have waiting or running
    max_body: int = MAX_BODY_MB * MB  #: one request body that is not an upload

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.keep < 1 or self.max_body < 1 or self.space < self.max_bytes:
            raise ValueError(f"bad upload limits {self}: all positive, space >= max_bytes")


class RequestGuard:
    """ASGI middleware: every request body within its limit (the upload limit on the upload routes,
    ``max_body`` elsewhere; refused from its declared length, before a byte is read), and after each
    upload the stored uploads pruned to the limits, oldest first.

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
        path = scope["path"].rstrip("/")
        upload = path.endswith(UPLOAD_ROUTES) and headers.get(b"content-type", b"").startswith(b"multipart/form-data")
        limit = self.limits.max_bytes + REQUEST_OVERHEAD if upload else self.limits.max_body
        if length is None and b"transfer-encoding" in headers:
            await _plain(send, 411, "Send the request with a Content-Length header (chunked bodies are refused).")
            return
        try:
            n = int(length or 0)
        except ValueError:
            n = -1
        if n < 0:
            await _plain(send, 400, "Bad Content-Length header.")
            return
        if n > limit:
            if upload:
                text = f"The upload is {n / MB:.1f} MB; this server takes at most {self.limits.max_bytes / MB:g} MB."
            else:
                text = (
                    f"The request is {n / MB:.1f} MB; this server takes at most {self.limits.max_body / MB:g} MB "
                    "in a request that is not a file upload (send images through the upload route)."
                )
            await _plain(send, 413, text)
            return
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
            if path.endswith("/queue/join"):
                body = await _read_body(receive)
                refusal = join_refusal(body, self.blocks)
                if refusal:
                    await _plain(send, 400, refusal)
                    return
                receive = _replay(body, receive)
            self.joining[host] = self.joining.get(host, 0) + 1
            try:
                await self.app(scope, receive, _own_errors(send))
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


async def _read_body(receive: Any) -> bytes:
    """The whole request body (already bounded by its declared length)."""
    parts, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # the client left: nothing to answer
            break
        parts.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(parts)


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that hands ``body`` on in one message, then is the server's own again (which
    waits for the client to leave), so nothing downstream is told of a disconnect that did not happen."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


#: What a queue join holds, and of which type (Gradio's ``PredictBody``, the fields the page sends).
JOIN_FIELDS = {"fn_index": int, "data": list, "session_hash": str, "event_id": str, "trigger_id": int}
_KINDS = {int: "a whole number", list: "a list", str: "text", bool: "true/false", float: "a number", dict: "an object"}


def _kind(value: Any) -> str:
    return _KINDS.get(type(value), "nothing" if value is None else f"a {type(value).__name__}")


def join_refusal(body: bytes, blocks: Any) -> str | None:
    """One line saying why a queue join cannot be run, or ``None``. Gradio answers a made-up
    ``fn_index`` with a 500 and a traceback in the log, bad JSON or a mistyped field with pydantic's JSON."""
    try:
        job = json.loads(body)
    except json.JSONDecodeError as e:
        return f"The queue join is not JSON: {e.msg} at character {e.pos}."
    except (ValueError, RecursionError):
        return UNREADABLE_REQUEST
    if not isinstance(job, dict):
        return f"A queue join is a JSON object with {', '.join(JOIN_FIELDS)}; this one is {_kind(job)}."
    for name, kind in JOIN_FIELDS.items():
        value = job.get(name)
        if name in ("fn_index", "data") and value is None:
            return f"The queue join has no {name}; it takes {', '.join(JOIN_FIELDS)}."
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"The queue join's {name} is {_kind(value)}; accepted: {_KINDS[kind]}."
    events = sorted(getattr(blocks, "fns", None) or {})
    if events and job["fn_index"] not in events:  # no events known: Gradio's own answer
        shown = f"{events[0]} to {events[-1]}" if events == list(range(events[0], events[-1] + 1)) else str(events)
        return f"fn_index {job['fn_index']} is not an event of this page; its events are {shown}."
    return None


#: In place of FastAPI's "There was an error parsing the body": what Python's JSON parser refuses
#: though the JSON is well formed.
UNREADABLE_REQUEST = "The edit request cannot be read: a number in it has more than 4300 digits, or it nests too deep."


def _own_errors(send: Any) -> Any:
    """``send``, with two of Gradio's JSON answers to an edit request (a queue join, ``/call/``)
    replaced by one line: FastAPI's 400 for a body its JSON parser gave up on
    (:data:`UNREADABLE_REQUEST`), and the queue's 503 when it is full. The status stays, which is
    what the page and ``gradio_client`` act on."""
    held: list[dict] = []

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start" and message["status"] in (400, 503):
            held.append(message)  # until its body shows what it is
            return
        if held and message["type"] == "http.response.body":
            start, body = held.pop(), message.get("body", b"")
            if start["status"] == 400 and b"There was an error parsing the body" in body:
                await _plain(send, 400, UNREADABLE_REQUEST)
                return
            if start["status"] == 503 and b"Queue is full" in body:
                size = re.search(rb"Max size is (\d+)", body)
                most = f" (at most {int(size[1])} edits wait)" if size else ""
                text = f"The server is busy: its queue is full{most}. Try again when an edit has finished."
                await _plain(send, 503, text)
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


#: The mask painter's images sent ahead of an edit (Gradio's ``accept_blobs``) kept at once: the
#: images of at most this many paintings, and this many MiB of them, on disk; the oldest go first.
BLOB_VALUES = 8
BLOB_SPACE_MB = 256
#: What the painter sends with each image: its kind, and a layer's index as text ("null" for none).
BLOB_KINDS = ("background", "layer", "composite")
#: The message of an edit naming a painting dropped to keep to those bounds.
BLOB_DROPPED = "The painted mask is no longer on this server (it keeps only the latest paintings); paint it again."


@dataclass
class _Painting:
    """The files of one painting: its background, layers by index, composite; and their bytes in all."""

    background: str | None = None
    layers: list[str | None] = field(default_factory=list)
    composite: str | None = None
    size: int = 0

    def files(self) -> list[str]:
        return [f for f in [self.background, *self.layers, self.composite] if f is not None]


class PainterBlobs:
    """The mask painter's images sent ahead of the edit that uses them, on disk in ``folder``.

    Gradio keeps them in memory under any id the client makes until an edit names it, and grows a
    painting's layer list to any index sent (10**9: 8 GB). Here a layer index is below
    ``max_layers``, at most ``values`` paintings and ``space`` bytes are kept (the least recently
    sent go first, and an edit naming one is told so), and each is read back by its edit once.
    """

    def __init__(self, folder: Path, max_layers: int, values: int = BLOB_VALUES, space: int = BLOB_SPACE_MB * MB):
        self.folder, self.max_layers, self.values, self.space = Path(folder), max_layers, values, space
        self.kept: OrderedDict[str, _Painting] = OrderedDict()  # oldest first
        self.dropped: OrderedDict[str, None] = OrderedDict()  # ids dropped lately, to say so
        self.lock = threading.Lock()  # Gradio calls accept_blobs from worker threads

    def accept(self, data: Any) -> None:
        """Keep one image of Gradio's ``AcceptBlobs`` (``data.data``: type, index, id; ``data.files``:
        one (name, bytes)); an HTTP 400 for anything the page does not send."""
        from fastapi import HTTPException

        fields = getattr(data, "data", None)
        fields = fields if isinstance(fields, dict) else {}
        files = getattr(data, "files", None) or []
        kind, key, index = fields.get("type"), fields.get("id"), str(fields.get("index") or "null")
        blob = files[0][1] if len(files) == 1 and isinstance(files[0], tuple) and len(files[0]) == 2 else None
        ok = kind in BLOB_KINDS and isinstance(key, str) and 0 < len(key) <= 100 and isinstance(blob, bytes)
        ok = ok and (kind != "layer" or index == "null" or (index.isdigit() and int(index) < self.max_layers))
        if not ok:
            raise HTTPException(
                400, f"The painted mask's image is not one the page sends ({self.max_layers} layers at most)."
            )
        if kind == "layer" and index == "null":  # a layer with no place: Gradio drops it too
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{secrets.token_hex(16)}.img"
        path.write_bytes(blob)
        with self.lock:
            painting = self.kept.pop(key, None) or _Painting()
            self.kept[key] = painting  # the newest last
            self.dropped.pop(key, None)
            if kind == "layer":
                i = int(index)
                painting.layers += [None] * (i + 1 - len(painting.layers))
                old, painting.layers[i] = painting.layers[i], str(path)
            else:
                old = getattr(painting, kind)
                setattr(painting, kind, str(path))
            painting.size += len(blob) - _unlink(old)
            while len(self.kept) > 1 and (
                len(self.kept) > self.values or sum(p.size for p in self.kept.values()) > self.space
            ):
                gone_key, gone = self.kept.popitem(last=False)
                for f in gone.files():
                    _unlink(f)
                self.dropped[gone_key] = None
                while len(self.dropped) > 1024:
                    self.dropped.popitem(last=False)

    def take(self, key: str) -> _Painting | None:
        """The painting ``key``, no longer kept (the caller deletes its files with :meth:`discard`);
        None if it was never sent. Raises KeyError if it was dropped to keep to the bounds."""
        with self.lock:
            if key in self.dropped:
                raise KeyError(key)
            return self.kept.pop(key, None)

    @staticmethod
    def discard(painting: _Painting | None) -> None:
        for f in painting.files() if painting is not None else []:
            _unlink(f)


def _unlink(path: str | None) -> int:
    """Delete ``path`` if there is one; its size in bytes (0 if none)."""
    if path is None:
        return 0
    try:
        size = os.path.getsize(path)
        os.unlink(path)
    except OSError:
        return 0
    return size

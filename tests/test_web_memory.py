"""What bounds the memory of ``fireflow serve`` (issue 21): request bodies, the mask painter's blob
store, Gradio's session state, and the heap trimmer that gives freed memory back."""

from __future__ import annotations

import asyncio
import io
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from test_web import _png_claiming as png_claiming
from test_web import needs_gradio

from fireflow.web import heap
from fireflow.web.heap import THREAD_NAME, HeapTrimmer
from fireflow.web.uploads import MB, RequestGuard, UploadLimits

ROOT = Path(__file__).resolve().parent.parent


# ---- the heap trimmer --------------------------------------------------------------------------------
class FakeLibc:
    """glibc's two calls, with the free byte counts ``mallinfo2`` gives in turn."""

    def __init__(self, free: list[int]):
        self.free, self.trims = list(free), 0

    def mallinfo2(self) -> SimpleNamespace:
        return SimpleNamespace(fordblks=self.free.pop(0) if len(self.free) > 1 else self.free[0])

    def malloc_trim(self, pad: int) -> int:
        assert pad == 0
        self.trims += 1
        return 1


def test_heap_trimmer_trims_when_free_bytes_grew():
    """A trim when the free bytes grew by more than 32 MiB since the last trim or the lowest count
    after it (memory reused, then freed again), and only then."""
    # Looks: 100 (the base), 120 (+20), 140 (+40: trim, 5 after it), 30 (+25), 2 (lower: the base), 36 (+34: trim).
    libc = FakeLibc([m * MB for m in (100, 120, 140, 5, 30, 2, 36, 1)])
    t = HeapTrimmer(libc=libc, rss=lambda: None)
    assert [t.check() for _ in range(6)] == [False, False, True, False, False, True]
    assert libc.trims == t.trims == 2


def test_heap_trimmer_trims_when_rss_grew_over_free_memory():
    """Trimmed free pages reused and freed again between two looks leave the free count as it was:
    RSS growth of more than 32 MiB calls for a trim too, while more than 32 MiB of the heap is free."""
    rss = iter(m * MB for m in (700, 690, 720, 760, 710, 730, 750, 800, 900))
    libc = FakeLibc([100 * MB])
    t = HeapTrimmer(libc=libc, rss=lambda: next(rss))
    # RSS 700 (the base), 690 (lower: the base), 720 (+30), 760 (+70: trim, 710 after it), 730 (+20).
    assert [t.check() for _ in range(4)] == [False, False, False, True] and libc.trims == 1
    assert not t.check()
    libc.free = [10 * MB]  # little free: growth is live memory, a trim would give nothing back
    assert [t.check() for _ in range(3)] == [False, False, False] and libc.trims == 1


def test_heap_trimmer_is_harmless_without_glibc(monkeypatch):
    """No glibc (musl, macOS, Windows, glibc before mallinfo2): nothing starts, nothing is called."""
    monkeypatch.setattr(heap, "glibc", lambda: None)
    t = HeapTrimmer(every=0.01)
    assert t.libc is None and t.start() is None and not t.check()
    with HeapTrimmer(every=0.01) as running:
        assert running.start() is None
    assert not [th for th in threading.enumerate() if th.name == THREAD_NAME]
    assert heap.glibc is not None  # and the real look-up answers, whatever this machine has
    monkeypatch.undo()
    found = heap.glibc()
    assert found is None or (hasattr(found, "mallinfo2") and hasattr(found, "malloc_trim"))


TRIM_CODE = """
from fireflow.web.heap import HeapTrimmer

def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024

big = bytearray(16 << 20)  # freed: glibc's threshold for mmap rises to 16 MiB, so the blocks below come from the heap
del big
t = HeapTrimmer()
t.check()
blocks = [bytearray(500_000) for _ in range(400)]
del blocks[::2]  # 100 MB freed in holes between blocks kept: glibc cannot give it back by itself
before = rss()
print(t.check(), before - rss())
"""


@pytest.mark.skipif(heap.glibc() is None, reason="needs glibc 2.33+ (mallinfo2)")
def test_heap_trimmer_gives_freed_memory_back():
    """In a process of its own: 100 MB freed in holes of the heap stay in RSS until the trim (95 MB given back here)."""
    out = subprocess.run([sys.executable, "-c", TRIM_CODE], capture_output=True, text=True, cwd=ROOT, check=True)
    trimmed, given_back = out.stdout.split()
    assert trimmed == "True" and int(given_back) > 50, out.stdout


@needs_gradio
def test_only_serve_starts_the_trimmer(monkeypatch, tmp_path):
    """Importing fireflow or its web page starts no thread; ``fireflow serve`` runs one while it
    serves and stops it when it returns."""
    code = (
        "import threading, fireflow, fireflow.cli, fireflow.web, fireflow.web.server\n"
        "fireflow.cli.build_parser()\n"
        f"print([t.name for t in threading.enumerate() if t.name == {THREAD_NAME!r}])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"

    import fireflow.cli
    from fireflow.web import server

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # what serve would set for itself
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen: list[list[str]] = []
    editor = SimpleNamespace(adapter=SimpleNamespace(size_note=None), model_name="fake")
    monkeypatch.setattr(fireflow.cli, "load_editor", lambda args: editor)
    monkeypatch.setattr(server, "build_app", lambda *a, **k: SimpleNamespace(queue=lambda **kw: None))
    monkeypatch.setattr(server, "launch", lambda *a, **k: seen.append([t.name for t in threading.enumerate()]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = fireflow.cli.build_parser().parse_args(["serve", "--port", str(port)])
    args.func(args)
    running = THREAD_NAME in seen[0]
    assert running == (heap.glibc() is not None), seen
    assert THREAD_NAME not in [t.name for t in threading.enumerate()]


# ---- request bodies ---------------------------------------------------------------------------------
#: What each POST of :func:`_post` sends (whatever length it declares): a queue join the guard lets through.
JOIN = b'{"fn_index": 0, "data": []}'


def _post(guard: RequestGuard, path: str, length: int, content_type: bytes = b"application/json") -> tuple:
    """One POST through ``guard`` declaring ``length`` bytes (:data:`JOIN` sent); (status, body, reached the app)."""
    sent, reached = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": JOIN, "more_body": False}

    guard.app = app
    headers = [(b"content-length", str(length).encode()), (b"content-type", content_type)]
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers, "client": ("127.0.0.1", 1)}
    asyncio.run(guard(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()
    return sent[0]["status"], body, bool(reached)


def test_bodies_that_are_not_uploads_are_bounded(monkeypatch, tmp_path):
    """An edit's JSON, a queue join or any other body over 2 MiB is refused from its declared length
    with one line, JSON to the upload routes too; their multipart bodies (Gradio's uploads, the
    painter's images) take up to the upload limit."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # where the guard looks for uploads to prune
    blocks = SimpleNamespace(_queue=None, upload_file_set=set(), fns={0: None})
    guard = RequestGuard(None, blocks=blocks, limits=UploadLimits())
    refusal = (
        "The request is {} MB; this server takes at most 2 MB in a request that is not a file upload "
        "(send images through the upload route)."
    )
    for path in ("/gradio_api/call/edit", "/gradio_api/queue/join", "/gradio_api/run/predict", "/gradio_api/x"):
        assert _post(guard, path, 40 * MB) == (413, refusal.format("40.0"), False), path
        assert _post(guard, path, 2 * MB)[2], path  # at the limit: let through
    multipart = b"multipart/form-data; boundary=b"
    for path in ("/gradio_api/upload", "/gradio_api/component_server"):
        assert _post(guard, path, 40 * MB, multipart)[2], path
        upload = "The upload is 49.0 MB; this server takes at most 48 MB."
        assert _post(guard, path, 49 * MB, multipart) == (413, upload, False), path
        assert _post(guard, path, 3 * MB) == (413, refusal.format("3.0"), False), path


# ---- the painter's blob store -----------------------------------------------------------------------
def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def _blob(painter, id: str, data: bytes, kind: str = "background", index: str = "null") -> None:
    from gradio.data_classes import DataWithFiles

    fields = {"type": kind, "index": index, "id": id}
    painter.accept_blobs(DataWithFiles(data=fields, files=[("blob", data)]))


@needs_gradio
def test_painter_blob_store_is_bounded_and_on_disk(tmp_path):
    """Gradio keeps the painter's images in memory under any id sent until an edit names it, and
    grows a painting's layer list to any index. Here they are files in the server's folder, at most
    BLOB_VALUES paintings and so many bytes (the oldest go first, and an edit naming one is told to
    paint again), each read once by its edit; a layer index beyond MAX_LAYERS is refused."""
    import gradio as gr
    from fastapi import HTTPException
    from gradio.components.image_editor import EditorData

    from fireflow.web.checks import MAX_LAYERS, Refused
    from fireflow.web.page import _mask_painter
    from fireflow.web.uploads import BLOB_DROPPED, BLOB_VALUES, PainterBlobs

    blobs = PainterBlobs(tmp_path / "painter", MAX_LAYERS, space=2 * MB)
    painter = _mask_painter(gr, 256 * 256, blobs, type="numpy", image_mode="RGBA", sources=[], layers=False)
    assert painter.accept_blobs.__name__ == "accept_blobs" and painter.accept_blobs._is_server_fn
    for i in range(BLOB_VALUES + 4):
        _blob(painter, f"p{i}", _png((i, 0, 0, 255)))
    assert list(blobs.kept) == [f"p{i}" for i in range(4, BLOB_VALUES + 4)] and not painter.blob_storage
    assert len(list((tmp_path / "painter").iterdir())) == BLOB_VALUES  # one file each, the others deleted
    for i in range(3):  # 1 MiB each: two fit in 2 MiB with the small ones
        _blob(painter, f"big{i}", bytes(MB))
    assert sum(p.size for p in blobs.kept.values()) <= 2 * MB and "big2" in blobs.kept and "big0" not in blobs.kept
    for kind, index in (("layer", "1000000000"), ("layer", str(MAX_LAYERS)), ("layer", "-1"), ("x", "null")):
        with pytest.raises(HTTPException) as e:
            _blob(painter, "evil", _png((0, 0, 0, 0)), kind, index)
        assert e.value.status_code == 400 and "layers at most" in e.value.detail
    _blob(painter, "evil", _png((0, 0, 0, 0)), "layer", "null")  # a layer with no index: dropped, as Gradio does
    assert "evil" not in blobs.kept
    dropped = painter.preprocess(EditorData(id="p0"))
    assert isinstance(dropped, Refused) and dropped.message == BLOB_DROPPED
    _blob(painter, "mine", _png((255, 255, 255, 255)))
    _blob(painter, "mine", _png((255, 255, 255, 255)), "layer", "1")
    value = painter.preprocess(EditorData(id="mine"))
    assert value["background"].shape == (16, 16, 4) and len(value["layers"]) == 1
    assert "mine" not in blobs.kept  # read once by its edit, and its files deleted
    assert sum(p.size for p in blobs.kept.values()) == sum(f.stat().st_size for f in (tmp_path / "painter").iterdir())
    _blob(painter, "huge", png_claiming(9000, 9000), "layer", "0")  # refused from its header, files deleted too
    assert "9000x9000" in painter.preprocess(EditorData(id="huge")).message
    assert painter.preprocess(EditorData(id="never sent")) == {"background": None, "layers": [], "composite": None}


# ---- Gradio's session state ---------------------------------------------------------------------------
@needs_gradio
def test_session_state_is_bounded():
    """Gradio keeps state for up to 10000 sessions, one per session id a client makes up: 256 here."""
    from fireflow.web.server import STATE_SESSIONS, launch

    got = {}
    launch(SimpleNamespace(launch=lambda **kwargs: got.update(kwargs)), port=1)
    assert got["state_session_capacity"] == STATE_SESSIONS == 256


def test_join_refusal_names_the_pages_events():
    from fireflow.web.uploads import join_refusal

    page = SimpleNamespace(fns={0: None, 1: None, 5: None})
    assert join_refusal(b'{"fn_index": 5, "data": [1], "session_hash": "s", "trigger_id": null}', page) is None
    assert join_refusal(b'{"fn_index": 2, "data": []}', page) == (
        "fn_index 2 is not an event of this page; its events are [0, 1, 5]."
    )
    assert join_refusal(b'{"fn_index": 2, "data": []}', SimpleNamespace(fns={0: None, 1: None, 2: None})) is None
    assert join_refusal(b'{"fn_index": 0, "data": [], "session_hash": 7}', page) == (
        "The queue join's session_hash is a whole number; accepted: text."
    )


def test_gradios_queue_full_is_one_line_with_its_status():
    from fireflow.web.uploads import _own_errors

    def through(status: int, body: bytes) -> tuple[int, str]:
        sent = []

        async def send(message):
            sent.append(message)

        async def answer():
            wrapped = _own_errors(send)
            await wrapped({"type": "http.response.start", "status": status, "headers": []})
            await wrapped({"type": "http.response.body", "body": body})

        asyncio.run(answer())
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]).decode()

    full = b'{"detail":"Queue is full. Max size is 32 and size is 32."}'
    said = "The server is busy: its queue is full (at most 32 edits wait). Try again when an edit has finished."
    assert through(503, full) == (503, said)
    assert through(503, b'{"detail":"other"}') == (503, '{"detail":"other"}')  # not the queue's: as it was
    assert through(200, b"ok") == (200, "ok")

"""Replay a hostile request list against ``fireflow serve`` and measure its memory (issue 21).

    python scripts/hostile_web.py [--json report.json] [--model demo]

Starts ``python -m fireflow serve`` on a free loopback port with a temporary folder of its own and
sends every case below: image content, prompts, numeric and choice knobs, masks, paths and file
access, the HTTP level and concurrency. The server's RSS (with any child processes) is sampled every
0.1 s, ``GET /`` is timed after each case, and after the last one the script waits until the queue
has drained (a normal edit from a fresh client address completes). Then it prints a table (category,
cases, slowest case, peak RSS during it, slowest ``GET /``) and, with ``--json``, writes the figures.

Exits 1 when the peak RSS reaches ``--peak-mb`` (1500), the RSS once the last request has finished
reaches ``--after-mb`` (800), a response carries the text of a file outside the server's folder
(a canary this script writes, or /etc/passwd), an edit of such a file completes, or the server died.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import http.client
import io
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20
#: Seconds the server may take to load its model and answer ``GET /``.
START_TIMEOUT = 300
#: The edit API's inputs after the image, in order.
NAMES = "source target steps inject guidance solver strategy blocks inversion_guidance reconstruction".split()
NAMES += ["mask_paint", "mask_file", "paste", "auto"]
#: A valid, quick edit: each input as JSON text.
VALID = ["red heart", "blue heart", 4, 1, 2, "fireflow", "replace_v", "all", 1, False, None, None, False, False]
FIELDS = {name: json.dumps(value) for name, value in zip(NAMES, VALID)}
#: Text that must never come back: the first line of /etc/passwd.
PASSWD = "root:x:0:0"


# ---- the server and its memory ---------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` and its descendants, MB (0 once it is gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


class Sampler(threading.Thread):
    """The server's RSS every 0.1 s, with the peak of each case (``case`` names the one running)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True, name="rss-sampler")
        self.pid, self.case = pid, "start"
        self.peak_by_case: dict[str, float] = {}
        self.samples: list[tuple[float, float]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.1):
            mb = tree_rss_mb(self.pid)
            self.samples.append((time.monotonic(), mb))
            self.peak_by_case[self.case] = max(self.peak_by_case.get(self.case, 0.0), mb)

    def peak(self) -> float:
        return max((mb for _, mb in self.samples), default=0.0)

    def since(self, t: float) -> list[float]:
        return [mb for when, mb in self.samples if when >= t]


def start_server(model: str, folder: Path, launcher: Path | None = None) -> tuple[subprocess.Popen, str, Path]:
    """``python -m fireflow serve`` (or ``launcher serve``) with a TMPDIR of its own; returns
    (process, base URL, log)."""
    port = free_port()
    tmp = folder / "server-tmp"
    tmp.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "TMPDIR": str(tmp),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("GRADIO_TEMP_DIR", None)
    log = folder / "serve.log"
    run = [str(launcher)] if launcher else ["-m", "fireflow"]
    cmd = [sys.executable, *run, "serve", "--model", model, "--device", "cpu", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while get_root(url) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc, url, log


def get_root(url: str, timeout: float = 10) -> float | None:
    """Seconds ``GET /`` took, None if it failed."""
    t0 = time.monotonic()
    try:
        conn = http.client.HTTPConnection(url.removeprefix("http://").split(":")[0], int(url.rsplit(":", 1)[1]))
        conn.timeout = timeout
        conn.request("GET", "/")
        ok = conn.getresponse().status == 200
        conn.close()
    except OSError:
        return None
    return time.monotonic() - t0 if ok else None


# ---- requests --------------------------------------------------------------------------------------
@dataclass
class Context:
    """What the cases share: the server, the files outside its folder, and what came back."""

    url: str
    outside: Path  # a folder the server must never read: canaries in it
    token: str  # the canary's text
    requests: int = 0
    leaks: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)

    def seen(self, what: str, body: bytes | str) -> None:
        """Count one request, and note it if its answer carries a file from outside the server's folder."""
        text = body.decode("latin-1") if isinstance(body, bytes) else body
        with self.lock:
            self.requests += 1
            if self.token in text or PASSWD in text:
                self.leaks.append(what)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict | None = None,
        client: str = "127.0.0.1",
        timeout: float = 120,
    ) -> tuple[int, bytes]:
        """One HTTP request from client address ``client``: (status, body); (0, the error) if it failed."""
        conn = http.client.HTTPConnection(*self.address, timeout=timeout, source_address=(client, 0))
        try:
            conn.request(method, path, body, headers or {})
            r = conn.getresponse()
            status, data = r.status, r.read()
        except (OSError, http.client.HTTPException) as e:
            status, data = 0, repr(e).encode()
        finally:
            conn.close()
        self.seen(f"{method} {path[:80]}", data)
        return status, data

    def raw(self, data: bytes, client: str = "127.0.0.1", timeout: float = 10, pause: float = 0) -> bytes:
        """``data`` sent on a socket of its own (``pause`` s before reading); what came back until
        the server closed, the answer was complete, or ``timeout``."""
        got = b""
        try:
            with socket.create_connection(self.address, timeout=timeout, source_address=(client, 0)) as conn:
                try:
                    conn.sendall(data)
                except OSError:  # answered and closed before all was sent: read what it said
                    pass
                time.sleep(pause)
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                    head, sep, body = got.partition(b"\r\n\r\n")
                    length = [v for k, v in _headers(head) if k == b"content-length"]
                    if sep and length and len(body) >= int(length[0]):
                        break
        except OSError as e:
            got += f"<{type(e).__name__}>".encode()
        self.seen("raw " + data[:60].decode("latin-1"), got)
        return got

    def upload(self, name: str, data: bytes, client: str = "127.0.0.1") -> str | None:
        """One file to Gradio's upload route: its stored path, or None when refused."""
        body, content_type = multipart({}, [("files", name, data)])
        status, answer = self.request("POST", "/gradio_api/upload", body, {"Content-Type": content_type}, client)
        if status != 200:
            return None
        return json.loads(answer)[0]

    def edit(self, image: str, client: str = "127.0.0.1", **fields: str) -> str:
        """The edit API with ``image`` and ``fields`` as JSON text (others valid): 'complete',
        'error: <message>', or 'HTTP <status> <answer>'."""
        data = "[" + ", ".join([image, *{**FIELDS, **fields}.values()]) + "]"
        return self.call(('{"data": ' + data + "}").encode(), client)

    def call(self, body: bytes, client: str = "127.0.0.1") -> str:
        """POST ``body`` to the edit API and read its event stream: what it ended with."""
        headers = {"Content-Type": "application/json"}
        status, answer = self.request("POST", "/gradio_api/call/edit", body, headers, client)
        if status != 200:
            return f"HTTP {status} {answer[:200].decode('latin-1')}"
        event = json.loads(answer)["event_id"]
        status, stream = self.request("GET", f"/gradio_api/call/edit/{event}", client=client)
        return outcome(stream.decode("utf-8", "replace"))

    def idle(self, timeout: float = 300) -> None:
        """Wait until no edit is waiting in the queue."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = self.request("GET", "/gradio_api/queue/status")
            if status == 200 and json.loads(body).get("queue_size") == 0:
                return
            time.sleep(0.5)

    def image(self, data: bytes, name: str = "image.png") -> str:
        """``data`` uploaded, as the edit API's image (JSON text); a path that is not there if refused."""
        path = self.upload(name, data) or "/nonexistent/refused-upload.png"
        return file_json(path)


def file_json(path: str | None, url: str | None = None) -> str:
    return json.dumps({"path": path, "url": url, "meta": {"_type": "gradio.FileData"}})


def outcome(stream: str) -> str:
    """What an event stream ended with, in one line."""
    if "event: complete" in stream:
        return "complete"
    if "event: error" in stream:
        data = stream.split("event: error", 1)[1].split("data:", 1)[-1].strip()
        try:
            message = json.loads(data.splitlines()[0])
            data = message.get("error") if isinstance(message, dict) else message
        except (ValueError, IndexError):
            pass
        return f"error: {str(data)[:160]}"
    return f"stream: {stream[-160:]!r}"


def _headers(head: bytes) -> list[tuple[bytes, bytes]]:
    lines = head.split(b"\r\n")[1:]
    return [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(b":") for line in lines)]


def status_line(answer: bytes) -> str:
    first = answer.split(b"\r\n", 1)[0].decode("latin-1")
    body = answer.partition(b"\r\n\r\n")[2][:120].decode("latin-1")
    return f"{first} {body}".strip() or "<no answer>"


# ---- images ----------------------------------------------------------------------------------------
def png(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2).astype(np.uint8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(w: int, h: int, idat: bytes = b"\0" * 16) -> bytes:
    """A PNG header declaring ``w`` x ``h`` with a few bytes of data: a forged huge image."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(idat)) + _chunk(b"IEND", b"")


def bmp_claiming(w: int, h: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + 64, 0, 0, 54) + info + b"\0" * 64


def gif_claiming(w: int, h: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", w, h) + b"\x00\x00\x00" + b"\x2c" + struct.pack("<HHHH", 0, 0, w, h) + b"\0;"


def jpeg_claiming(w: int, h: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, h, w, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    sos = b"\xff\xda" + struct.pack(">H", 12) + b"\x03\x01\x00\x02\x11\x03\x11\x00\x3f\x00"
    return b"\xff\xd8" + sof + sos + b"\0" * 16 + b"\xff\xd9"


def tiff_claiming(w: int, h: int) -> bytes:
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 8)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def idat_bomb(side: int) -> bytes:
    """A valid PNG of ``side`` x ``side`` black pixels: a few KB that decode to side**2 x 3 bytes."""
    raw = (b"\0" + b"\0" * (3 * side)) * side
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def exif_rotated() -> bytes:
    im = gradient(64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(im, "JPEG", exif=exif.tobytes())


def animated_gif(frames: int) -> bytes:
    images = [Image.new("P", (64, 64), i % 256) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:])
    return buf.getvalue()


def float_tiff() -> bytes:
    return encoded(Image.fromarray(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64), "F"), "TIFF")


# ---- the cases -------------------------------------------------------------------------------------
@dataclass
class Case:
    category: str
    name: str
    run: Callable[[Context], str]


def image_cases() -> list[Case]:
    cat = "image content"
    made = {
        "text.png": lambda: b"this is not an image\n",
        "empty.png": lambda: b"",
        "truncated.png": lambda: png(noise(64, 64))[:2000],
        "script.svg": lambda: b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        "svg_as.png": lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="9000" height="9000"/>',
        "polyglot.gif": lambda: b"GIF89a<html><script>alert(1)</script></html>",
        "forged 60000x60000.png": lambda: png_claiming(60000, 60000),
        "forged 9000x9000.png": lambda: png_claiming(9000, 9000),
        "forged 1x2147483647.png": lambda: png_claiming(1, 2**31 - 1),
        "forged 60000x60000.bmp": lambda: bmp_claiming(60000, 60000),
        "forged 65535x65535.gif": lambda: gif_claiming(65535, 65535),
        "forged 65500x65500.jpg": lambda: jpeg_claiming(65500, 65500),
        "forged 100000x100000.tif": lambda: tiff_claiming(100000, 100000),
        "1x1.png": lambda: png(Image.new("RGB", (1, 1), "red")),
        "16000x16.png": lambda: png(gradient(16000, 16)),
        "16x16000.png": lambda: png(gradient(16, 16000)),
        "1x16384 strip.png": lambda: png(gradient(1, 16384)),
        "16384x1 strip.png": lambda: png(gradient(16384, 1)),
        "1x1000000 strip.png": lambda: png(Image.new("RGB", (1, 1_000_000), "blue")),
        "4096x4096 gradient.png": lambda: png(gradient(4096, 4096)),
        "4097x4096.png": lambda: png(Image.new("RGB", (4097, 4096))),
        "2048x2048 noise.png": lambda: png(noise(2048, 2048)),
        "4096x4096 noise.jpg": lambda: encoded(noise(4096, 4096), "JPEG", quality=90),
        "4096x4096 noise.png (over the upload limit)": lambda: png(noise(4096, 4096), compress_level=1),
        "4096x4096 idat bomb.png": lambda: idat_bomb(4096),
        "200-frame.gif": lambda: animated_gif(200),
        "16-bit.png": lambda: png(Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)),
        "cmyk.jpg": lambda: encoded(gradient(64, 64).convert("CMYK"), "JPEG"),
        "la.png": lambda: png(gradient(64, 64).convert("LA")),
        "palette+transparency.png": lambda: png(gradient(64, 64).convert("P"), transparency=0),
        "exif-rotated.jpg": exif_rotated,
        "x.webp": lambda: encoded(gradient(64, 64), "WEBP"),
        "float.tif": float_tiff,
    }

    def case(name: str, make: Callable[[], bytes]) -> Case:
        suffix = "." + name.split(".")[-1].split(" ")[0]
        return Case(cat, name, lambda ctx: ctx.edit(ctx.image(make(), "upload" + suffix)))

    return [case(name, make) for name, make in made.items()]


def _red(ctx: Context) -> str:
    """A small red image uploaded: the edit API's image (JSON text)."""
    return ctx.image(png(Image.new("RGB", (40, 40), (200, 30, 30))))


def prompt_cases() -> list[Case]:
    zalgo = "\u202eevil" + "a\u0301\u0302\u0303" * 50 + "\U0001f600"
    values = {
        "source 1 MiB 'a'": ("source", json.dumps("a" * MB)),
        "target 1 MiB of words": ("target", json.dumps(" ".join(["heart"] * (MB // 6)))),
        "target 20 MiB": ("target", json.dumps("x" * (20 * MB))),
        "target 2000 characters (the limit)": ("target", json.dumps("blue heart " * 181 + "x" * 9)),
        "target a list": ("target", '["blue", "heart"]'),
        "target a dict": ("target", '{"a": "blue heart"}'),
        "source a number": ("source", "12345"),
        "target null": ("target", "null"),
        "target whitespace": ("target", '" \\t\\n "'),
        "target zero-width only": ("target", '"\\u200b\\u200c\\u200d\\ufeff"'),
        "target lone surrogate": ("target", '"blue \\ud800 heart"'),
        "target control characters": ("target", json.dumps("".join(map(chr, range(32))) + "blue heart")),
        "target only NUL": ("target", '"\\u0000\\u0000"'),
        "target HTML and script": ("target", json.dumps("<img src=x onerror=alert(1)><script>alert(2)</script>")),
        "target RTL, zalgo, emoji": ("target", json.dumps(zalgo)),
        "target 2000 '|'-joined prompts": ("target", json.dumps("|".join(["blue heart"] * 2000))),
    }
    return [
        Case("prompts", name, lambda ctx, k=k, v=v: ctx.edit(_red(ctx), **{k: v})) for name, (k, v) in values.items()
    ]


def numeric_cases() -> list[Case]:
    huge = ["1e308", "-1e308", "9223372036854775808", "Infinity", "-Infinity", "NaN"]
    values = [("steps", v) for v in ["-1", "0", "-0.0", "1e-320", "3.5", '"8"', "true", "null", '"1e3"', *huge]]
    values += [("steps", "9" * 5000), ("steps", '"' + "9" * 5000 + '"')]
    values += [("inject", v) for v in ["-1", "1e308", "NaN", '"1"', "[1]", "0"]]
    values += [("guidance", v) for v in ["-1", "1e308", "NaN", "Infinity", '"2"', "[2]"]]
    values += [("inversion_guidance", v) for v in ["-1", "NaN", '{"a": 1}', "1e308"]]
    cases = [
        Case("numeric knobs", f"{k}={v[:20]}", lambda ctx, k=k, v=v: ctx.edit(_red(ctx), **{k: v})) for k, v in values
    ]
    most = {"steps": "100", "inject": "100", "reconstruction": "true"}  # the most work the page allows
    cases.append(
        Case("numeric knobs", "steps=100 inject=100 recon (most work)", lambda ctx: ctx.edit(_red(ctx), **most))
    )
    return cases


def choice_cases() -> list[Case]:
    values = [("solver", v) for v in ['"rm -rf /"', '""', '"FIREFLOW"', '["fireflow"]', '"midpoint"', '"euler"']]
    values += [("solver", json.dumps("x" * 300))]
    values += [("strategy", v) for v in [json.dumps("add_v " * 30), json.dumps("__import__('os').system('id')")]]
    values += [("strategy", v) for v in ['""', '"REPLACE_V"', '{"v": 1}', '"replace_v add_k add_q replace_q"']]
    values += [("blocks", v) for v in ['"-1"', '"7-0"', json.dumps("0-" + "9" * 60), '"all,all"', '"\\u0663"']]
    values += [("blocks", v) for v in [json.dumps("0," * 99 + "0"), '"none"', '"double:all"', '"0x1f"', '"   "']]
    values += [("reconstruction", '"yes"'), ("reconstruction", "1"), ("paste", '"false"'), ("auto", "1")]
    return [
        Case("choice knobs", f"{k}={v[:24]}", lambda ctx, k=k, v=v: ctx.edit(_red(ctx), **{k: v})) for k, v in values
    ]


def _painter(background: str, layers: list[str]) -> str:
    return '{"background": ' + background + ', "layers": [' + ", ".join(layers) + '], "composite": ' + background + "}"


def _component_id(ctx: Context, elem_id: str) -> int:
    status, body = ctx.request("GET", "/config")
    return next(c["id"] for c in json.loads(body)["components"] if c.get("props", {}).get("elem_id") == elem_id)


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body of ``fields`` and ``files`` (field name, file name, bytes), and its content type."""
    b = secrets.token_hex(8)
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    for name, filename, data in files:
        head = f'--{b}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        parts.append(f"{head}Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


def accept_blobs(ctx: Context, fields: dict, blob: bytes, session: str = "hostile") -> str:
    """The painter's images sent ahead of an edit (Gradio's component server route)."""
    form = {"component_id": str(_component_id(ctx, "mask-editor")), "fn_name": "accept_blobs", "session_hash": session}
    body, content_type = multipart({**form, **fields}, [("file", "blob", blob)])
    status, answer = ctx.request("POST", "/gradio_api/component_server", body, {"Content-Type": content_type})
    return f"HTTP {status} {answer[:120].decode('latin-1')}"


def mask_cases() -> list[Case]:
    cat = "masks"

    def with_mask(data: bytes, **fields: str) -> Callable[[Context], str]:
        return lambda ctx: ctx.edit(_red(ctx), mask_file=ctx.image(data, "mask.png"), **fields)

    def painted(layers: Callable[[Context], list[str]]) -> Callable[[Context], str]:
        def run(ctx: Context) -> str:
            image = _red(ctx)
            return ctx.edit(image, mask_paint=_painter(image, layers(ctx)))

        return run

    def blobs(ctx: Context) -> str:
        """20 paintings of 8 MB each sent ahead of any edit, then edits naming the first and the last."""
        for i in range(20):
            accept_blobs(ctx, {"type": "background", "index": "null", "id": f"blob{i}"}, os.urandom(8 * MB))
        first, last = (ctx.edit(_red(ctx), mask_paint=json.dumps({"id": f"blob{i}"})) for i in (0, 19))
        return f"first: {first[:80]}; last: {last[:80]}"

    cases = [
        ("mask_file text", with_mask(b"not an image")),
        ("mask_file forged 60000x60000.bmp", with_mask(bmp_claiming(60000, 60000))),
        ("mask_file all black + paste", with_mask(png(Image.new("L", (40, 40), 0)), paste="true")),
        ("mask_file all white + paste", with_mask(png(Image.new("L", (40, 40), 255)), paste="true")),
        ("mask_file 3x7 (other aspect)", with_mask(png(Image.new("L", (3, 7), 255)))),
        ("mask_file 4096x4096", with_mask(png(gradient(4096, 4096).convert("L")))),
        ("mask_paint a string", lambda ctx: ctx.edit(_red(ctx), mask_paint='"paint"')),
        ("mask_paint a list", lambda ctx: ctx.edit(_red(ctx), mask_paint="[1, 2, 3]")),
        ("painter layer: text", painted(lambda ctx: [ctx.image(b"text", "l.png")])),
        ("painter 3 layers declaring 9000x9000", painted(lambda ctx: [ctx.image(png_claiming(9000, 9000))] * 3)),
        ("painter 200 layers of 1x1", painted(lambda ctx: [ctx.image(png(Image.new("RGBA", (1, 1))))] * 200)),
        ("painter layer 4096x4096", painted(lambda ctx: [ctx.image(png(gradient(4096, 4096).convert("RGBA")))])),
        ("painter layer 16000x16", painted(lambda ctx: [ctx.image(png(gradient(16000, 16).convert("RGBA")))])),
        (
            "painter background /etc/passwd",
            lambda ctx: ctx.edit(_red(ctx), mask_paint=_painter(file_json("/etc/passwd"), [])),
        ),
        ("painter blobs: 20 x 8 MB", blobs),
        (
            "painter blob at layer 10**9",
            lambda ctx: accept_blobs(ctx, {"type": "layer", "index": "1000000000", "id": "x"}, b"x"),
        ),
        ("painter blob, junk form", lambda ctx: accept_blobs(ctx, {"type": "junk", "index": "abc"}, b"x")),
    ]
    return [Case(cat, name, run) for name, run in cases]


def path_cases() -> list[Case]:
    cat = "paths, file access"

    def get(path: Callable[[Context], str]) -> Callable[[Context], str]:
        def run(ctx: Context) -> str:
            status, body = ctx.request("GET", path(ctx))
            return f"HTTP {status} {body[:80].decode('latin-1')}"

        return run

    def outside_edit(image: Callable[[Context], str]) -> Callable[[Context], str]:
        def run(ctx: Context) -> str:
            got = ctx.edit(image(ctx))
            if got == "complete":  # an edit of a file outside the server's folder
                ctx.leaks.append(f"edited {image(ctx)[:80]}")
            return got

        return run

    canary = lambda ctx: str(ctx.outside / "canary.txt")  # noqa: E731 - a table of small lambdas
    canary_png = lambda ctx: str(ctx.outside / "canary.png")  # noqa: E731
    dots = "/..%2f..%2f..%2f..%2f..%2f..%2f..%2f.."
    cases = [
        ("GET file=/etc/passwd", get(lambda ctx: "/gradio_api/file=/etc/passwd")),
        ("GET file=<canary>", get(lambda ctx: f"/gradio_api/file={canary(ctx)}")),
        (
            "GET file=<canary> via ..",
            get(lambda ctx: f"/gradio_api/file={ctx.outside}/../{ctx.outside.name}/canary.txt"),
        ),
        ("GET file=%2e%2e traversal", get(lambda ctx: "/gradio_api/file=/tmp/%2e%2e/%2e%2e/%2e%2e/etc/passwd")),
        ("GET file=%2f.. traversal", get(lambda ctx: f"/gradio_api/file=/tmp{dots}{canary(ctx)}")),
        ("GET file=/proc/self/environ", get(lambda ctx: "/gradio_api/file=/proc/self/environ")),
        ("GET file=<repo>/pyproject.toml", get(lambda ctx: f"/gradio_api/file={ROOT}/pyproject.toml")),
        ("GET /static/../../etc/passwd", get(lambda ctx: "/static/../../../../etc/passwd")),
        ("GET /assets/..%2f traversal", get(lambda ctx: f"/assets{dots}/etc/passwd")),
        ("GET /file=/etc/passwd", get(lambda ctx: "/file=/etc/passwd")),
        ("edit image.path=<canary png>", outside_edit(lambda ctx: file_json(canary_png(ctx)))),
        ("edit image.path=/etc/passwd", outside_edit(lambda ctx: file_json("/etc/passwd"))),
        (
            "edit image.path=../../<canary png>",
            outside_edit(lambda ctx: file_json("../../../../../.." + canary_png(ctx))),
        ),
        ("edit image.url=file://<canary png>", outside_edit(lambda ctx: file_json(None, "file://" + canary_png(ctx)))),
        (
            "edit image.url=http://self/file=<canary png>",
            outside_edit(lambda ctx: file_json(None, f"{ctx.url}/gradio_api/file={canary_png(ctx)}")),
        ),
        (
            "edit image.url=data: truncated png",
            outside_edit(
                lambda ctx: file_json(None, "data:image/png;base64," + base64.b64encode(png(noise(8, 8))[:40]).decode())
            ),
        ),
        ("edit image.url=data:text/plain", outside_edit(lambda ctx: file_json(None, "data:text/plain,hello"))),
        ("edit image a plain string path", outside_edit(lambda ctx: json.dumps(canary_png(ctx)))),
        ("edit mask_file.path=<canary png>", lambda ctx: ctx.edit(_red(ctx), mask_file=file_json(canary_png(ctx)))),
        (
            "upload filename ../../<outside>/evil.png",
            lambda ctx: str(ctx.upload(f"../../../../..{ctx.outside}/evil.png", b"x")),
        ),
        ("upload filename /etc/cron.d/x.png", lambda ctx: str(ctx.upload("/etc/cron.d/x.png", b"x"))),
        ("upload filename of 2000 characters", lambda ctx: str(ctx.upload("a" * 2000 + ".png", b"x"))[-40:]),
        ("upload filename with NUL and newline", lambda ctx: str(ctx.upload("a\x00b\nc.png", b"x"))),
        ("upload filename ..", lambda ctx: str(ctx.upload("..", b"x"))),
    ]
    return [Case(cat, name, run) for name, run in cases]


def http_cases() -> list[Case]:
    cat = "HTTP level"

    def post_raw(path: str, body: bytes, content_type: str = "application/json", extra: str = "") -> Callable:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n{extra}"
        return lambda ctx: status_line(ctx.raw(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body))

    def headers_only(path: str, header: str) -> Callable:
        return lambda ctx: status_line(ctx.raw(f"POST {path} HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\n".encode()))

    def sessions(ctx: Context) -> str:
        """1000 queue joins under as many made-up session ids (each refused fast: no image)."""
        fn = next(
            d["id"] for d in json.loads(ctx.request("GET", "/config")[1])["dependencies"] if d.get("api_name") == "edit"
        )
        data = json.loads("[null, " + ", ".join(FIELDS.values()) + "]")
        statuses: dict[int, int] = {}

        def join(i: int) -> None:
            body = {
                "data": data,
                "fn_index": fn,
                "session_hash": secrets.token_hex(8),
                "event_data": None,
                "trigger_id": None,
            }
            status, _ = ctx.request(
                "POST",
                "/gradio_api/queue/join",
                json.dumps(body).encode(),
                {"Content-Type": "application/json"},
                client=f"127.0.2.{1 + i % 50}",
            )
            statuses[status] = statuses.get(status, 0) + 1

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(join, range(1000)))
        return f"statuses {statuses}"

    def multipart_upload(count: int) -> Callable:
        def run(ctx: Context) -> str:
            body, content_type = multipart({}, [("files", "a.png", png(Image.new("RGB", (1, 1))))] * count)
            status, answer = ctx.request("POST", "/gradio_api/upload", body, {"Content-Type": content_type})
            return f"HTTP {status} {answer[:60].decode('latin-1')}"

        return run

    numbers = b'{"data": [' + b"1," * (20 * MB - 6) + b"1]}"
    nested = b'{"data": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    cases = [
        ("40 MiB JSON array to call/edit", post_raw("/gradio_api/call/edit", numbers)),
        ("40 MiB JSON array to queue/join", post_raw("/gradio_api/queue/join", numbers)),
        ("40 MiB JSON array to component_server", post_raw("/gradio_api/component_server", numbers)),
        (
            "3 MiB JSON to call/edit (over 2 MiB)",
            post_raw("/gradio_api/call/edit", b'{"data": ["' + b"x" * (3 * MB) + b'"]}'),
        ),
        ("60 MiB declared to call/edit", headers_only("/gradio_api/call/edit", f"Content-Length: {60 * MB}")),
        ("60 MiB declared to upload", headers_only("/gradio_api/upload", f"Content-Length: {60 * MB}")),
        ("Content-Length: -5", headers_only("/gradio_api/upload", "Content-Length: -5")),
        ("Content-Length: abc", headers_only("/gradio_api/call/edit", "Content-Length: abc")),
        (
            "two Content-Length headers",
            headers_only("/gradio_api/upload", f"Content-Length: 10\r\nContent-Length: {60 * MB}"),
        ),
        ("chunked, no length, to upload", headers_only("/gradio_api/upload", "Transfer-Encoding: chunked")),
        ("chunked, no length, to call/edit", headers_only("/gradio_api/call/edit", "Transfer-Encoding: chunked")),
        ("invalid JSON", post_raw("/gradio_api/call/edit", b'{"data": [1, 2,')),
        ("JSON nested 100000 deep", post_raw("/gradio_api/call/edit", nested)),
        ("data with 3 items", lambda ctx: ctx.call(b'{"data": [null, "a", "b"]}')),
        ("data with 500 items", lambda ctx: ctx.call(b'{"data": [' + b"null," * 499 + b"null]}")),
        ("data not a list", lambda ctx: ctx.call(b'{"data": {"a": 1}}')),
        ("multipart without boundary", post_raw("/gradio_api/upload", b"--x\r\n\r\n", "multipart/form-data")),
        (
            "multipart, wrong boundary",
            post_raw("/gradio_api/upload", b"--a\r\nxx\r\n--a--", "multipart/form-data; boundary=b"),
        ),
        (
            "multipart, never closed",
            post_raw(
                "/gradio_api/upload",
                b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n' + b"x" * 1000,
                "multipart/form-data; boundary=b",
            ),
        ),
        (
            "multipart to call/edit",
            post_raw("/gradio_api/call/edit", b"--b\r\n\r\n--b--", "multipart/form-data; boundary=b"),
        ),
        ("a 60 KB header", headers_only("/gradio_api/call/edit", "X-Big: " + "a" * 60000)),
        ("a 1 MiB header", headers_only("/gradio_api/call/edit", "X-Big: " + "a" * MB)),
        ("500 headers", headers_only("/gradio_api/call/edit", "\r\n".join(f"X-{i}: {'a' * 100}" for i in range(500)))),
        ("upload of 1000 files", multipart_upload(1000)),
        ("upload of 1001 files", multipart_upload(1001)),
        (
            "body shorter than its Content-Length, then silence",
            lambda ctx: status_line(
                ctx.raw(
                    b"POST /gradio_api/upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                    b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n",
                    timeout=3,
                )
            ),
        ),
        (
            "body longer than its Content-Length",
            lambda ctx: status_line(
                ctx.raw(
                    b"POST /gradio_api/call/edit HTTP/1.1\r\nHost: x\r\nContent-Type: "
                    b'application/json\r\nContent-Length: 5\r\n\r\n{"data": [1, 2, 3]}'
                )
            ),
        ),
        ("1000 made-up sessions", sessions),
        (
            "component server, unknown function",
            lambda ctx: str(
                ctx.request(
                    "POST",
                    "/gradio_api/component_server",
                    b'{"component_id": 1, "fn_name": "__init__", "session_hash": "x", "data": null}',
                    {"Content-Type": "application/json"},
                )[0]
            ),
        ),
    ]
    return [Case(cat, name, run) for name, run in cases]


def concurrency_cases() -> list[Case]:
    cat = "concurrency"

    def at_once(n: int) -> Callable[[Context], str]:
        def run(ctx: Context) -> str:
            image = _red(ctx)
            ctx.idle()  # a queue full of earlier cases' edits would refuse these at once
            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                got = list(pool.map(lambda i: ctx.edit(image, client=f"127.0.1.{1 + i}")[:30], range(n)))
            return str({g: got.count(g) for g in set(got)})

        return run

    def join_body(ctx: Context, session: str, image: str, steps: int) -> bytes:
        fn = next(
            d["id"] for d in json.loads(ctx.request("GET", "/config")[1])["dependencies"] if d.get("api_name") == "edit"
        )
        fields = {**FIELDS, "steps": str(steps), "reconstruction": "true"}
        data = "[" + ", ".join([image, *fields.values()]) + "]"
        return f'{{"data": {data}, "fn_index": {fn}, "session_hash": "{session}"}}'.encode()

    def dropped(ctx: Context) -> str:
        """10 long edits queued the way the page does, their event streams opened and dropped."""
        image, sessions = _red(ctx), [secrets.token_hex(8) for _ in range(10)]
        for i, session in enumerate(sessions):
            ctx.request(
                "POST",
                "/gradio_api/queue/join",
                join_body(ctx, session, image, 100),
                {"Content-Type": "application/json"},
                client=f"127.0.3.{1 + i}",
            )
        for i, session in enumerate(sessions):
            with socket.create_connection(ctx.address, timeout=10, source_address=(f"127.0.3.{1 + i}", 0)) as conn:
                conn.sendall(f"GET /gradio_api/queue/data?session_hash={session} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                time.sleep(0.3)
        return "10 streams dropped"

    def never_read(ctx: Context) -> str:
        """30 edits posted whose results are never fetched."""
        image = _red(ctx)
        body = ('{"data": [' + ", ".join([image, *{**FIELDS, "steps": "20"}.values()]) + "]}").encode()
        got = [
            ctx.request(
                "POST",
                "/gradio_api/call/edit",
                body,
                {"Content-Type": "application/json"},
                client=f"127.0.4.{1 + i % 6}",
            )[0]
            for i in range(30)
        ]
        return str({s: got.count(s) for s in set(got)})

    def idle(ctx: Context) -> str:
        """100 connections opened and left idle for 5 s, then closed."""
        conns = [socket.create_connection(ctx.address, timeout=10) for _ in range(100)]
        time.sleep(5)
        for c in conns:
            c.close()
        return "100 idle"

    def trickle(ctx: Context) -> str:
        """20 uploads sending their body one byte every 0.5 s for 5 s, then dropped."""
        conns = []
        for _ in range(20):
            c = socket.create_connection(ctx.address, timeout=10)
            c.sendall(
                b"POST /gradio_api/upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 100000\r\n\r\n"
            )
            conns.append(c)
        for _ in range(10):
            for c in conns:
                try:
                    c.sendall(b"x")
                except OSError:
                    pass
            time.sleep(0.5)
        for c in conns:
            c.close()
        return "20 trickled"

    cases = [
        ("20 edits at once", at_once(20)),
        ("100 edits at once (queue of 32)", at_once(100)),
        ("10 long edits, streams dropped", dropped),
        ("30 edits posted, never read", never_read),
        ("100 idle connections", idle),
        ("20 uploads trickling", trickle),
    ]
    return [Case(cat, name, run) for name, run in cases]


def all_cases() -> list[Case]:
    return (
        image_cases()
        + prompt_cases()
        + numeric_cases()
        + choice_cases()
        + mask_cases()
        + path_cases()
        + (http_cases() + concurrency_cases())
    )


# ---- the run ---------------------------------------------------------------------------------------
def drain(ctx: Context, timeout: float = 600) -> float:
    """Wait until the queue is empty and a normal edit from a fresh client address completes (the
    queue runs in order, so every edit left before it has run or been dropped). Returns the seconds."""
    t0 = time.monotonic()
    ctx.idle(timeout)
    while time.monotonic() - t0 < timeout:
        if ctx.edit(_red(ctx), client="127.0.9.9") == "complete":
            break
        time.sleep(1)
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="the model to serve (default demo)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--peak-mb", type=float, default=1500, help="fail at this peak RSS (default 1500)")
    p.add_argument("--after-mb", type=float, default=800, help="fail at this RSS after the last request (default 800)")
    p.add_argument("--only", default="", help="run only the cases whose category or name contains this")
    p.add_argument("--launcher", type=Path, help="a script run in place of '-m fireflow' (to instrument the server)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="hostile-web-") as tmp:
        folder = Path(tmp)
        outside = folder / "outside"
        outside.mkdir()
        token = "canary-" + secrets.token_hex(16)
        (outside / "canary.txt").write_text(token + "\n")
        Image.new("RGB", (40, 40), (10, 200, 10)).save(outside / "canary.png")
        proc, url, log = start_server(args.model, folder, args.launcher)
        sampler = Sampler(proc.pid)
        sampler.start()
        ctx = Context(url, outside, token)
        time.sleep(1)
        start_mb = tree_rss_mb(proc.pid)
        rows: list[dict] = []
        try:
            for case in all_cases():
                if args.only and args.only not in f"{case.category} {case.name}":
                    continue
                sampler.case = f"{case.category}: {case.name}"
                t0 = time.monotonic()
                try:
                    got = case.run(ctx)
                except Exception as e:  # noqa: BLE001 - a case that fails on the client side is still a row
                    got = f"client error {type(e).__name__}: {e}"
                seconds = time.monotonic() - t0
                root = get_root(url)
                alive = proc.poll() is None
                rows.append(
                    {
                        "category": case.category,
                        "name": case.name,
                        "seconds": round(seconds, 2),
                        "got": got[:200],
                        "get_root_s": None if root is None else round(root, 3),
                        "peak_mb": round(sampler.peak_by_case.get(sampler.case, tree_rss_mb(proc.pid)), 1),
                        "rss_after_mb": round(tree_rss_mb(proc.pid), 1),
                    }
                )
                print(
                    f"{case.category:>18} | {case.name[:48]:48} | {seconds:6.2f} s | {rows[-1]['peak_mb']:7.1f} MB | "
                    f"{got[:70]}",
                    file=sys.stderr,
                    flush=True,
                )
                if not alive:
                    break
            sampler.case = "drain"
            drain_s = drain(ctx) if proc.poll() is None else 0.0
            finished = time.monotonic()
            time.sleep(3)  # the heap trimmer looks every second
            after = sampler.since(finished + 2)
            after_mb = max(after) if after else tree_rss_mb(proc.pid)
            alive = proc.poll() is None
        finally:
            sampler.stopped.set()
            sampler.join()
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        peak = sampler.peak()
        roots = [r["get_root_s"] for r in rows]
        worst_root = None if None in roots else max(roots, default=0.0)
        categories: dict[str, dict] = {}
        for r in rows:
            c = categories.setdefault(
                r["category"], {"count": 0, "max_s": 0.0, "peak_mb": 0.0, "worst_get_root_s": 0.0}
            )
            c["count"] += 1
            c["max_s"] = max(c["max_s"], r["seconds"])
            c["peak_mb"] = max(c["peak_mb"], r["peak_mb"])
            c["worst_get_root_s"] = (
                None
                if r["get_root_s"] is None or c["worst_get_root_s"] is None
                else max(c["worst_get_root_s"], r["get_root_s"])
            )
        ok = peak < args.peak_mb and after_mb < args.after_mb and alive and not ctx.leaks and worst_root is not None
        report = {
            "model": args.model,
            "start_rss_mb": round(start_mb, 1),
            "peak_rss_mb": round(peak, 1),
            "after_finish_rss_mb": round(after_mb, 1),
            "worst_get_root_s": worst_root,
            "drain_s": round(drain_s, 1),
            "server_alive": alive,
            "leaks": ctx.leaks,
            "counts": {"cases": len(rows), "requests": ctx.requests, "samples": len(sampler.samples)},
            "bars": {"peak_mb": args.peak_mb, "after_finish_mb": args.after_mb},
            "ok": ok,
            "categories": categories,
            "cases": rows,
        }
        if not alive:
            report["server_log_tail"] = log.read_text()[-3000:]
    print(f"{'category':20} {'cases':>5} {'max s':>7} {'peak RSS MB':>12} {'worst GET / s':>14}")
    for name, c in categories.items():
        root = "failed" if c["worst_get_root_s"] is None else f"{c['worst_get_root_s']:.3f}"
        print(f"{name:20} {c['count']:5d} {c['max_s']:7.2f} {c['peak_mb']:12.1f} {root:>14}")
    print(
        f"RSS at start {start_mb:.0f} MB, peak {peak:.0f} MB (bar {args.peak_mb:.0f}), after the last request "
        f"{after_mb:.0f} MB (bar {args.after_mb:.0f}); worst GET / {worst_root} s; {ctx.requests} requests in "
        f"{len(rows)} cases; drained in {drain_s:.1f} s; server {'alive' if alive else 'DIED'}; "
        f"leaks: {ctx.leaks or 'none'}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

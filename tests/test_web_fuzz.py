"""A seeded fuzz test of ``fireflow serve`` (issue 21): random and malformed requests, for about
:data:`FUZZ_S` seconds and at most :data:`MAX_REQUESTS` of them, to a real demo server on loopback.

The requests: edits whose inputs are random JSON (wrong types, huge and non-finite numbers, lone
surrogates, long and invisible text) or byte-mutated valid ones; images named by paths outside the
server's folder, traversals, ``file://`` and ``data:`` URLs; uploads of broken, forged and random
files under hostile names; queue joins and dropped event streams; the mask painter's image route;
bodies around the 2 MiB limit; raw malformed HTTP; ``GET`` of random and traversing paths.

Checked throughout: ``GET /`` answers within :data:`ROOT_S` (timed every 0.5 s from another
thread), the server's RSS stays under :data:`RSS_MB` (sampled every 0.1 s), and the server never
exits.

Checked for files outside the server's folder: the server runs with HOME, TMPDIR and the cache
folders inside its own temporary folder, and with ``PYTHONDONTWRITEBYTECODE``. Canary files (a text
with a secret token, a PNG) sit in a folder beside it, and the requests name them every way they can.
At the end: the canaries and their folder are unchanged (names, sizes, times, bytes); no response
ever carried the token or /etc/passwd's first line; no edit of an outside image completed; the
canaries' access times were never updated (where the file system updates them on reads, as relatime
does: probed first, and said in the test's output if not); no file in this checkout changed; and the
server's files are in its own TMPDIR. Not checked: the files the server reads for itself (its code,
Python's libraries, the model's weights), which no request names.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import time
from pathlib import Path

from PIL import Image
from test_web import _get_root_seconds, _start_server, _stop, _wait_until_up, needs_gradio

from scripts import hostile_web as hw

ROOT = Path(__file__).resolve().parent.parent
SEED = 21
#: Bounds of the fuzzing itself: seconds, requests (whichever comes first).
FUZZ_S = 50
MAX_REQUESTS = 1200
#: What the server must keep to throughout.
ROOT_S = 2.0
RSS_MB = 1200


def _snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` (bar folders named in ``skip``): (size, modification time)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:  # gone meanwhile
                continue
            found[path] = (st.st_size, st.st_mtime_ns)
    return found


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _atime_works(folder: Path) -> bool:
    """Whether reading a file in ``folder`` updates its access time (relatime: when it is older than the mtime)."""
    probe = folder / "probe"
    probe.write_text("probe")
    os.utime(probe, ns=(0, time.time_ns()))
    probe.read_text()
    works = probe.stat().st_atime_ns != 0
    probe.unlink()
    return works


class Fuzzer:
    """Random requests from a seeded generator; what each got is checked by the Context (leaks)."""

    def __init__(self, rng: random.Random, ctx: hw.Context):
        self.rng, self.ctx = rng, ctx
        self.uploads: list[str] = []  # paths of images this server stored for us
        self.outside_edits: list[str] = []  # edits of an outside image that completed: must stay empty
        self.canary_png = str(ctx.outside / "canary.png")
        self.canary_txt = str(ctx.outside / "canary.txt")

    # ---- values ----------------------------------------------------------------------------------
    def text(self) -> str:
        r = self.rng
        pool = [
            "",
            " \t\n",
            "\u200b\u200d\ufeff",
            "red heart",
            "blue heart",
            "<script>alert(1)</script>",
            "\x00" * r.randint(1, 5),
            "".join(chr(r.randint(1, 0x2FFFF)) for _ in range(r.randint(1, 40))),
            "x" * r.choice([199, 200, 201, 1999, 2000, 2001, 3000]),
            "../" * r.randint(1, 8) + "etc/passwd",
            self.canary_txt,
        ]
        return r.choice(pool)

    def json_value(self, depth: int = 0) -> str:
        """One JSON value as text, including what ``json.dumps`` would not write (NaN, lone surrogates)."""
        r = self.rng
        kind = r.randrange(7 if depth < 2 else 5)
        if kind == 0:
            return r.choice(["0", "-1", "1", "3.5", "-0.0", "1e308", "-1e308", "1e-320", "NaN", "Infinity"])
        if kind == 1:
            return r.choice([str(r.randint(-(10**6), 10**6)), "9" * r.randint(15, 60), "-Infinity"])
        if kind == 2:
            return json.dumps(self.text())
        if kind == 3:
            return r.choice(['"\\ud800"', '"a\\udfffb"', '"\\u0000"', "true", "false", "null"])
        if kind == 4:
            return json.dumps(r.choice(["fireflow", "euler", "midpoint", "replace_v", "add_k", "all", "none", "0-3"]))
        if kind == 5:
            return "[" + ", ".join(self.json_value(depth + 1) for _ in range(r.randint(0, 4))) + "]"
        items = (f"{json.dumps(self.text())}: {self.json_value(depth + 1)}" for _ in range(r.randint(0, 3)))
        return "{" + ", ".join(items) + "}"

    def image(self) -> tuple[str, bool]:
        """The edit's image as JSON text, and whether it names a file outside the server's folder."""
        r = self.rng
        choice = r.randrange(10)
        if choice <= 3 and self.uploads:
            return hw.file_json(r.choice(self.uploads)), False
        outside = [
            hw.file_json(self.canary_png),
            hw.file_json("../" * r.randint(1, 9) + self.canary_png.lstrip("/")),
            hw.file_json(None, "file://" + self.canary_png),
            hw.file_json(None, f"{self.ctx.url}/gradio_api/file={self.canary_png}"),
            hw.file_json(self.canary_txt),
            json.dumps(self.canary_png),
        ]
        if choice <= 6:
            return r.choice(outside), True
        if choice == 7:
            return hw.file_json(None, "data:image/png;base64,iVBORw0KGgo" + "A" * r.randint(0, 50)), False
        return self.json_value(), False

    def client(self) -> str:
        return f"127.0.0.{self.rng.randint(1, 30)}"

    # ---- requests --------------------------------------------------------------------------------
    def edit(self) -> None:
        r = self.rng
        fields = {**hw.FIELDS, "steps": str(r.randint(1, 4))}
        for name in r.sample(hw.NAMES, r.randint(0, 4)):
            fields[name] = self.json_value()
        image, outside = self.image()
        body = ('{"data": [' + ", ".join([image, *fields.values()]) + "]}").encode()
        client = self.client()
        status, answer = self.ctx.request(
            "POST", "/gradio_api/call/edit", body, {"Content-Type": "application/json"}, client, timeout=30
        )
        if status != 200 or r.random() < 0.15:  # refused, or its result never read
            return
        event = json.loads(answer)["event_id"]
        _, stream = self.ctx.request("GET", f"/gradio_api/call/edit/{event}", client=client, timeout=60)
        if outside and b"event: complete" in stream:
            self.outside_edits.append(image)

    def mutated(self) -> None:
        """A valid edit's JSON with a few bytes flipped, inserted or deleted."""
        r = self.rng
        image = hw.file_json(r.choice(self.uploads)) if self.uploads else "null"
        body = bytearray(('{"data": [' + ", ".join([image, *hw.FIELDS.values()]) + "]}").encode())
        for _ in range(r.randint(1, 6)):
            i = r.randrange(len(body))
            op = r.randrange(3)
            if op == 0:
                body[i] = r.randrange(256)
            elif op == 1:
                body.insert(i, r.choice(b'[]{}",:\\0-9eE.\x00\xff'))
            else:
                del body[i]
        path = r.choice(["/gradio_api/call/edit", "/gradio_api/queue/join", "/gradio_api/run/edit"])
        self.ctx.request("POST", path, bytes(body), {"Content-Type": "application/json"}, self.client(), timeout=30)

    def upload(self) -> None:
        r = self.rng
        contents = [
            lambda: hw.png(hw.gradient(r.randint(1, 300), r.randint(1, 300))),
            lambda: hw.png(hw.noise(64, 64, r.randrange(100)))[: r.randint(0, 3000)],
            lambda: hw.png_claiming(r.randint(1, 70000), r.randint(1, 70000)),
            lambda: hw.bmp_claiming(r.randint(1, 70000), r.randint(1, 70000)),
            lambda: hw.gif_claiming(65535, 65535),
            lambda: hw.tiff_claiming(100000, 100000),
            lambda: r.randbytes(r.randint(0, 65536)),
            lambda: b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        ]
        names = [
            "a.png",
            f"../../../../..{self.ctx.outside}/evil.png",
            f"{self.ctx.outside}/evil2.png",
            "a\x00b\nc.png",
            "x" * r.randint(100, 3000) + ".png",
            "..",
            "\u202egnp.exe",
            "canary.png",
        ]
        kind = r.randrange(len(contents))
        path = self.ctx.upload(r.choice(names), contents[kind](), self.client())
        if path and kind == 0:
            self.uploads = [*self.uploads[-20:], path]

    def get(self) -> None:
        r = self.rng
        junk = "".join(r.choice("abc/.%2e%2f?=&#:;~ \\\x7f") for _ in range(r.randint(1, 40)))
        paths = [
            "/",
            "/config",
            "/gradio_api/info",
            "/gradio_api/queue/status",
            f"/gradio_api/file={self.canary_txt}",
            f"/gradio_api/file={self.canary_png}",
            f"/gradio_api/file=/tmp/{'..%2f' * r.randint(1, 9)}{self.canary_txt.lstrip('/')}",
            f"/gradio_api/file={self.ctx.outside}/../{self.ctx.outside.name}/canary.txt",
            "/gradio_api/file=/etc/passwd",
            f"/gradio_api/file={r.choice(self.uploads) if self.uploads else '/'}",
            "/static/../../../../etc/passwd",
            f"/assets/{'..%2f' * 6}etc/passwd",
            "/" + junk.replace(" ", "%20"),
        ]
        self.ctx.request("GET", r.choice(paths), client=self.client(), timeout=30)

    def raw(self) -> None:
        """Malformed HTTP on a socket of its own."""
        r = self.rng
        path = r.choice(["/gradio_api/call/edit", "/gradio_api/upload", "/gradio_api/queue/join", "/", "/x"])
        method = r.choice(["POST", "PUT", "DELETE", "PATCH", "TRACE", "GE T", "POST"])
        header = r.choice(
            [
                f"Content-Length: {r.choice([-5, 0, 10, 2 * hw.MB + 1, 60 * hw.MB, 10**30])}",
                "Content-Length: abc",
                "Content-Length: 10\r\nContent-Length: 99999999",
                "Transfer-Encoding: chunked",
                "X-Big: " + "a" * r.choice([100, 20000, 70000]),
                "Content-Type: multipart/form-data; boundary=" + "b" * r.randint(0, 80),
                "",
            ]
        )
        body = r.choice([b"", b"{", b"--b\r\n\r\n", r.randbytes(r.randint(0, 2000)), b"0\r\n\r\n", b"zz\r\n"])
        data = f"{method} {path} HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\n".encode() + body
        if r.random() < 0.2:
            data = r.randbytes(r.randint(1, 300))
        self.ctx.raw(data, self.client(), timeout=1.5)

    def join(self) -> None:
        """A queue join the way the page makes it, random in part; its event stream sometimes opened and dropped."""
        r = self.rng
        session = r.choice(["x", "a" * 200, os.urandom(8).hex(), "../../etc"])
        fields = {**hw.FIELDS, "steps": str(r.randint(1, 30))}
        image, _ = self.image()
        data = "[" + ", ".join([image, *fields.values()]) + "]"
        fn = r.choice(["0", "1", "2", "3", "-1", "999999", self.json_value()])
        body = f'{{"data": {data}, "fn_index": {fn}, "session_hash": {json.dumps(session)}}}'.encode()
        client = self.client()
        self.ctx.request("POST", "/gradio_api/queue/join", body, {"Content-Type": "application/json"}, client, 30)
        if r.random() < 0.5:
            try:
                with socket.create_connection(self.ctx.address, timeout=5, source_address=(client, 0)) as conn:
                    conn.sendall(
                        f"GET /gradio_api/queue/data?session_hash={session} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                    )
                    time.sleep(r.choice([0, 0.1, 0.3]))
            except OSError:
                pass

    def blob(self) -> None:
        """The mask painter's image route, random fields; sometimes an edit naming the painting."""
        r = self.rng
        key = r.choice(["p1", "p2", os.urandom(4).hex(), "x" * 200])
        fields = {
            "type": r.choice(["background", "layer", "composite", "junk"]),
            "index": r.choice(["null", "0", "3", "4", "1000000000", "-1", "abc"]),
            "id": key,
        }
        blob = r.choice([hw.png(hw.gradient(40, 40)), hw.png_claiming(9000, 9000), r.randbytes(r.randint(0, 200_000))])
        hw.accept_blobs(self.ctx, fields, blob, session=os.urandom(4).hex())
        if r.random() < 0.5 and self.uploads:
            fields = {**hw.FIELDS, "mask_paint": json.dumps({"id": key})}
            body = ('{"data": [' + ", ".join([hw.file_json(r.choice(self.uploads)), *fields.values()]) + "]}").encode()
            self.ctx.request("POST", "/gradio_api/call/edit", body, {"Content-Type": "application/json"}, self.client())

    def big(self) -> None:
        """A JSON body around the 2 MiB limit for bodies that are not uploads."""
        n = self.rng.choice([2 * hw.MB - 200, 2 * hw.MB + 10, 3 * hw.MB])
        body = ('{"data": [null, "' + "x" * n + '"]}').encode()
        self.ctx.request("POST", "/gradio_api/call/edit", body, {"Content-Type": "application/json"}, self.client(), 30)

    def step(self) -> None:
        kinds = [self.edit] * 6 + [self.mutated] * 3 + [self.upload] * 4 + [self.get] * 4 + [self.raw] * 3
        kinds += [self.join] * 2 + [self.blob] * 2 + [self.big]
        self.rng.choice(kinds)()


@needs_gradio
def test_fuzz_the_server_for_a_minute(tmp_path):
    # The server's own folder, with its HOME and caches; the canaries beside it.
    own, outside = tmp_path / "server", tmp_path / "outside"
    own.mkdir()
    outside.mkdir()
    home = own / "home"
    home.mkdir()
    token = "canary-" + os.urandom(16).hex()
    (outside / "canary.txt").write_text(token + "\n")
    Image.new("RGB", (40, 40), (10, 200, 10)).save(outside / "canary.png")
    atime_checked = _atime_works(outside)
    digests = _digest(outside)
    for f in outside.iterdir():
        os.utime(f, ns=(0, f.stat().st_mtime_ns))  # a read would now update the access time
    before_outside = _snapshot(outside)
    skip = (".git", "__pycache__", ".pytest_cache", ".ruff_cache")
    before_repo = _snapshot(ROOT, skip)

    env = {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    server = _start_server("demo", own, env=env)
    stop = threading.Event()
    slow_roots: list[float] = []
    try:
        _wait_until_up(server)
        assert (server.workdir() / "gradio").is_dir(), "the server's files are not in its own TMPDIR"
        sampler = hw.Sampler(server.proc.pid)
        sampler.start()

        def watch_root() -> None:
            while not stop.wait(0.5):
                try:
                    seconds = _get_root_seconds(server.url)
                except OSError:
                    seconds = float("inf")
                if seconds >= ROOT_S:
                    slow_roots.append(seconds)

        watcher = threading.Thread(target=watch_root, daemon=True)
        watcher.start()
        ctx = hw.Context(server.url, outside, token)
        fuzz = Fuzzer(random.Random(SEED), ctx)
        fuzz.uploads.append(ctx.upload("seed.png", hw.png(hw.gradient(64, 48))))  # a good image from the start
        t0, n = time.monotonic(), 0
        while n < MAX_REQUESTS and time.monotonic() - t0 < FUZZ_S:
            fuzz.step()
            n += 1
            assert server.proc.poll() is None, f"the server died after {n} requests:\n{server.log.read_text()[-3000:]}"
        fuzz_s = time.monotonic() - t0
        hw.drain(ctx, timeout=60)
        stop.set()
        watcher.join()
        sampler.stopped.set()
        sampler.join()
        assert server.proc.poll() is None, server.log.read_text()[-3000:]
        print(
            f"fuzz: {n} steps, {ctx.requests} requests in {fuzz_s:.1f} s; peak RSS {sampler.peak():.0f} MB; "
            f"access times {'checked' if atime_checked else 'not recorded by this file system: not checked'}"
        )
    finally:
        stop.set()
        _stop(server)

    assert not slow_roots, f"GET / took {slow_roots} s (bound {ROOT_S} s)"
    assert sampler.peak() < RSS_MB, f"peak RSS {sampler.peak():.0f} MB (bound {RSS_MB} MB)"
    assert not ctx.leaks, f"responses carried an outside file: {ctx.leaks}"
    assert not fuzz.outside_edits, f"edits of outside images completed: {fuzz.outside_edits}"
    if atime_checked:
        read = [f.name for f in outside.iterdir() if f.stat().st_atime_ns != 0]
        assert not read, f"outside files were read: {read}"
    assert _snapshot(outside) == before_outside, "the canaries' folder changed"
    assert _digest(outside) == digests
    assert _snapshot(ROOT, skip) == before_repo, "files in the checkout changed"

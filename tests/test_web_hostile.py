"""Hostile and careless requests to ``fireflow serve`` (issue 21), through the HTTP API of a real server."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import re
import secrets
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_web import (
    MAX_PIXELS,
    Server,
    _api_edit,
    _file,
    _get_root_seconds,
    _png_bytes,
    _png_claiming,
    _read_response,
    _start_server,
    _stop,
    _upload,
    _wait_until_up,
    needs_gradio,
)

from fireflow.web.uploads import PER_CLIENT, UNREADABLE_REQUEST

ROOT = Path(__file__).resolve().parent.parent


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    s = _start_server("demo", tmp_path_factory.mktemp("hostile"), "--keep-uploads", "6", "--max-upload-mb", "1")
    try:
        _wait_until_up(s)
        yield s
    finally:
        _stop(s)


def _error(stream: str) -> str:
    assert "event: error" in stream and "event: complete" not in stream, stream
    return json.loads(stream.split("data:", 1)[1].strip())["error"]


def _uploaded(server: str) -> dict:
    """A small red image uploaded to ``server``, as the edit API takes it."""
    status, body = _upload(server, "c.png", _png_bytes(40, (200, 30, 30)))
    assert status == 200, body
    return _file(json.loads(body)[0])


#: The edit API's inputs in order, each as JSON text: a valid edit but for the image.
FIELDS = {
    "source": '"a red circle"',
    "target": '"a yellow circle"',
    "steps": "8",
    "inject": "1",
    "guidance": "2",
    "solver": '"fireflow"',
    "strategy": '"replace_v"',
    "blocks": '"all"',
    "inversion_guidance": "1",
    "reconstruction": "false",
    "mask_paint": "null",
    "mask_file": "null",
    "paste": "false",
    "auto": "false",
}


def _raw_edit(server: str, image: dict, **fields: str) -> str:
    """The edit API with ``fields`` written as JSON text (a lone surrogate, NaN, a 5000-digit number:
    what json.dumps would not send), the others valid; returns the event stream."""
    data_json = "[" + ", ".join([json.dumps(image), *{**FIELDS, **fields}.values()]) + "]"
    req = urllib.request.Request(
        f"{server}/gradio_api/call/edit", data=('{"data": ' + data_json + "}").encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        event = json.load(r)["event_id"]
    with urllib.request.urlopen(f"{server}/gradio_api/call/edit/{event}", timeout=60) as r:
        return r.read().decode()


@needs_gradio
def test_gallery_survives_uploads_named_like_its_examples(hostile):
    """500 uploads of the examples' own bytes under their names: each stored under a server-made name,
    and every example still served afterwards."""
    gradio = hostile.workdir() / "gradio"
    examples = {p.name: p for p in (ROOT / "examples").glob("*.png")}
    cached = [p for p in gradio.glob("*/*") if p.name in examples]
    assert cached, "the gallery's examples are not in Gradio's folder"
    names = sorted(examples)
    for i in range(500):
        name = names[i % len(names)]
        status, body = _upload(hostile.url, name, examples[name].read_bytes())
        assert status == 200, body
        stored = Path(json.loads(body)[0])
        assert stored.name == "upload.png" and stored.parent.parent.name == "uploads", stored
    for p in cached:
        assert p.is_file(), f"example {p} was deleted"
        with urllib.request.urlopen(f"{hostile.url}/gradio_api/file={p}", timeout=10) as r:
            assert r.status == 200
    assert len(list((gradio / "uploads").glob("*/*"))) <= 6


@needs_gradio
def test_painter_layers_are_refused_before_decoding(hostile):
    """Three layers declaring 9000x9000 (a few bytes each): refused from their headers, no memory taken."""
    status, body = _upload(hostile.url, "c.png", _png_bytes(40, (200, 30, 30)))
    image = _file(json.loads(body)[0])
    layers = [_file(json.loads(_upload(hostile.url, f"l{i}.png", _png_claiming(9000, 9000))[1])[0]) for i in range(3)]
    before = _rss_mb(hostile.proc.pid)
    t0 = time.monotonic()
    paint = {"background": image, "layers": layers, "composite": image, "id": None}
    error = _error(_api_edit(hostile.url, image, "a", "b", 8, 1, 2, "fireflow", "replace_v", "all", 1, False, paint))
    assert time.monotonic() - t0 < 10
    assert error == (
        f"The painted mask is 9000x9000 = 81000000 pixels, more than this server's limit of {MAX_PIXELS}; "
        "use a smaller image"
    ), error
    assert _rss_mb(hostile.proc.pid) - before < 100
    # Each under the limit, too many pixels in all: refused too.
    small = [_file(json.loads(_upload(hostile.url, f"s{i}.png", _png_claiming(256, 256))[1])[0]) for i in range(4)]
    paint = {"background": image, "layers": small, "composite": image, "id": None}
    error = _error(_api_edit(hostile.url, image, "a", "b", 8, 1, 2, "fireflow", "replace_v", "all", 1, False, paint))
    assert "The painted mask is" in error and "pixels in all" in error, error


#: Every text, number and checkbox input of the edit API given what the page never sends (as JSON
#: text), and the start of the one-line message each gets.
HOSTILE_FIELDS = (
    ({"source": '["a list"]'}, "The source prompt must be text, got list."),
    ({"target": '{"x": 1}'}, "The target prompt must be text, got dict."),
    ({"source": "5"}, "The source prompt must be text, got int."),
    ({"target": "1.5"}, "The target prompt must be text, got float."),
    ({"source": "true"}, "The source prompt must be text, got bool."),
    ({"source": "null"}, "The source prompt is empty: describe what the image shows."),
    ({"source": '"\\u200b\\u200d\\ufeff"'}, "The source prompt is empty: describe what the image shows."),
    ({"target": '"b\\ud800"'}, "The target prompt contains an invalid character (a lone surrogate)."),
    ({"target": '"' + "x" * 3000 + '"'}, "The target prompt is 3000 characters; this server takes at most 2000."),
    ({"steps": '"8"'}, "Steps must be a number, got str."),
    ({"steps": "[8]"}, "Steps must be a number, got list."),
    ({"steps": "true"}, "Steps must be a number, got bool."),
    ({"steps": "NaN"}, "Steps must be a whole number between 1 and 100 on this server, got nan."),
    ({"steps": "1e300"}, "Steps must be a whole number between 1 and 100 on this server, got 1e+300."),
    ({"inject": '"1"'}, "Injected steps must be a number, got str."),
    ({"guidance": "[2]"}, "Guidance must be a number, got list."),
    ({"guidance": "Infinity"}, "Guidance must be a finite number between 0 and 100, got inf"),
    ({"inversion_guidance": '{"a": 1}'}, "Inversion guidance must be a number, got dict."),
    ({"solver": '["fireflow"]'}, "Solver must be text, got list."),
    ({"solver": "5"}, "Solver must be text, got int."),
    ({"solver": '"\\ud800"'}, "Solver contains an invalid character (a lone surrogate)."),
    ({"solver": '"mid\\npoint"'}, "Solver: unknown solver 'mid\\npoint'; accepted: euler, midpoint, fireflow"),
    ({"strategy": '{"v": "replace"}'}, "Strategy must be text, got dict."),
    ({"strategy": '"' + "x" * 300 + '"'}, "Strategy is 300 characters; this server takes at most 200."),
    ({"strategy": '"replace_v\\u0000"'}, "Strategy: unknown strategy 'replace_v\\x00'"),
    ({"blocks": "[1]"}, "Blocks must be text, got list."),
    ({"blocks": "9" * 40}, "Blocks is out of range"),
    ({"blocks": "9" * 5000}, f"HTTP 400: {UNREADABLE_REQUEST}"),  # beyond Python's JSON parser
    ({"blocks": '"' + "9" * 5000 + '"'}, "Blocks is 5000 characters; this server takes at most 200."),
    ({"blocks": '"0,\\n1"'}, "Blocks '0,\\n1': bad item"),
    ({"reconstruction": '"true"'}, "Show reconstruction must be true or false, got str."),
    ({"paste": '"false"'}, "Paste the source pixels must be true or false, got str."),
    ({"auto": "1"}, "Auto must be true or false, got int."),
)


@needs_gradio
def test_text_fields_are_checked_for_type_and_length(hostile):
    """Each input given a wrong type, an empty or invisible text, a lone surrogate, a huge number or
    text: an error event with the page's one-line message, fast, nothing of the framework's."""
    image = _uploaded(hostile.url)
    wrong = []
    for fields, message in HOSTILE_FIELDS:
        t0 = time.monotonic()
        try:
            error = _error(_raw_edit(hostile.url, image, **fields))
        except urllib.error.HTTPError as e:
            error = f"HTTP {e.code}: {e.read().decode()}"
        seconds = time.monotonic() - t0
        if not error.startswith(message) or "\n" in error or len(error) > 300 or seconds > 10:
            wrong.append(f"{str(fields)[:60]}: {error[:300]!r} in {seconds:.1f} s")
    assert not wrong, "\n".join(wrong)


@needs_gradio
def test_bad_mask_upload_is_the_pages_error(hostile):
    status, body = _upload(hostile.url, "c.png", _png_bytes(40, (200, 30, 30)))
    image = _file(json.loads(body)[0])
    mask = _file(json.loads(_upload(hostile.url, "m.png", b"not an image at all")[1])[0])
    stream = _api_edit(hostile.url, image, "a", "b", 8, 1, 2, "fireflow", "replace_v", "all", 1, False, None, mask)
    assert _error(stream) == "The mask upload cannot be used: it is not an image this server can read.", stream


def test_client_gone_reads_gradios_queue():
    """A job is given up once Gradio marks it dead (its stream dropped) or drops it from the active
    jobs (a cancel); outside Gradio (no queue, no event id) nothing is ever given up."""
    from types import SimpleNamespace

    from fireflow.web.handlers import client_gone

    job = SimpleNamespace(_id="e1", alive=True)
    blocks = SimpleNamespace(_queue=SimpleNamespace(active_jobs=[None, [job]]))
    assert not client_gone(blocks, "e1")
    job.alive = False
    assert client_gone(blocks, "e1")
    job.alive = True
    blocks._queue.active_jobs[1] = None
    assert client_gone(blocks, "e1")
    assert not client_gone(None, "e1") and not client_gone(blocks, None)


# ---- a server whose model calls are slow and logged: edits that run long enough to leave ---------
#: Run in place of ``-m fireflow``: the CLI, each demo model call taking CALL_S more and appending
#: its start time to a log, so that a test can tell which calls ran after the client left.
SLOW_LAUNCHER = """
import sys
import time

from fireflow.cli import main
from fireflow.models.demo import DemoAdapter

velocity = DemoAdapter.velocity


def slow(self, *args, **kwargs):
    with open(@LOG@, "a") as log:
        log.write(f"{time.time()}\\n")
    time.sleep(@PAUSE@)
    return velocity(self, *args, **kwargs)


DemoAdapter.velocity = slow
sys.exit(main())
"""
CALL_S = 0.1
#: Steps of an edit meant to be left: 3 x 101 model calls, about 40 s here.
LONG = 100


@dataclass
class Slow:
    server: Server
    calls: Path  # one line per model call: its start time

    def made(self) -> list[float]:
        return [float(t) for t in self.calls.read_text().split()] if self.calls.exists() else []


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slow")
    script = folder / "slow_serve.py"
    script.write_text(SLOW_LAUNCHER.replace("@LOG@", repr(str(folder / "calls.log"))).replace("@PAUSE@", str(CALL_S)))
    s = _start_server("demo", folder, launcher=(str(script),))
    try:
        _wait_until_up(s)
        yield Slow(s, folder / "calls.log")
    finally:
        _stop(s)


def _address(server: str) -> tuple[str, int]:
    host, port = server.removeprefix("http://").split(":")
    return host, int(port)


def _post(server: str, path: str, body: dict, source: str = "127.0.0.1") -> tuple[int, str]:
    """POST JSON from the client address ``source`` (any of 127.0.0.0/8: another client of the server)."""
    conn = http.client.HTTPConnection(*_address(server), timeout=10, source_address=(source, 0))
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def _edit_fn(server: str) -> int:
    """The queue's number of the ``edit`` endpoint, as the page and gradio_client find it."""
    with urllib.request.urlopen(f"{server}/config", timeout=10) as r:
        return next(d["id"] for d in json.load(r)["dependencies"] if d.get("api_name") == "edit")


def _join(server: str, session: str, image: dict, steps: int, source: str = "127.0.0.1") -> tuple[int, str]:
    """Queue an edit the way the page does (its stream is read with :func:`_listen`)."""
    data = [image, "a red circle", "a yellow circle", steps, 1, 2, "fireflow", "replace_v", "all", 1, True]
    body = {"data": [*data, None, None, False, False], "fn_index": _edit_fn(server), "session_hash": session}
    return _post(server, "/gradio_api/queue/join", {**body, "event_data": None, "trigger_id": None}, source)


def _listen(server: str, session: str, source: str = "127.0.0.1") -> socket.socket:
    """The session's event stream, opened as the page opens it; closing it is closing the tab."""
    conn = socket.create_connection(_address(server), timeout=30, source_address=(source, 0))
    conn.sendall(f"GET /gradio_api/queue/data?session_hash={session} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return conn


def _read_until(conn: socket.socket, text: str) -> str:
    data = b""
    while text.encode() not in data:
        chunk = conn.recv(65536)
        assert chunk, f"the stream ended before {text!r}: {data.decode()[-2000:]}"
        data += chunk
    return data.decode()


def _wait_for(check, what: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.02)
    return found


STOPPED = re.compile(r"an edit stopped after (\d+) model calls: its client has gone")


@needs_gradio
@pytest.mark.parametrize("how", ["stream closed", "cancelled"])
def test_a_dropped_edit_stops_within_one_model_call(slow, how):
    """A client that closes its tab (drops the event stream) or cancels (gradio_client's
    ``job.cancel()``) mid-edit: no model call of that edit starts after one that was running,
    the server says how many ran, and the next edit starts at once."""
    url = slow.server.url
    image = _uploaded(url)
    session, before, stops = secrets.token_hex(8), len(slow.made()), len(STOPPED.findall(slow.server.log.read_text()))
    status, body = _join(url, session, image, LONG)
    assert status == 200, body
    stream = _listen(url, session)
    try:
        _read_until(stream, "process_starts")
        _wait_for(lambda: len(slow.made()) >= before + 3, "model calls")  # inverting by now
        dropped = time.time()
        if how == "stream closed":
            stream.close()
        else:  # what gradio_client's job.cancel() sends
            event = json.loads(body)["event_id"]
            cancel = {"session_hash": session, "fn_index": _edit_fn(url), "event_id": event}
            assert _post(url, "/gradio_api/cancel", cancel)[0] == 200
        found = _wait_for(lambda: STOPPED.findall(slow.server.log.read_text())[stops:], "stop in the log", 10)
    finally:
        stream.close()
    made = slow.made()[before:]
    assert int(found[0]) == len(made) < 3 * (LONG + 1), (found, len(made))
    late = [t - dropped for t in made if t > dropped]
    assert len(late) <= 1, f"{len(late)} model calls started after the client left: {late}"
    t0 = time.monotonic()  # the worker is free: another edit (4 calls) runs now, not after this one
    assert "event: complete" in _api_edit(url, image, "a red circle", "a yellow circle", 1, 0)
    assert time.monotonic() - t0 < 10
    assert len(slow.made()) == before + len(made) + 4, "the dropped edit went on"


@needs_gradio
def test_one_client_has_at_most_per_client_edits_queued(slow):
    """Joins sent at once from one address: PER_CLIENT are queued, the rest answered 429 with the
    reason; GET / stays fast, another address is not limited by this one, and when the first client
    leaves its edits go and the other's runs."""
    url = slow.server.url
    image = _uploaded(url)
    session, other = secrets.token_hex(8), secrets.token_hex(8)
    with concurrent.futures.ThreadPoolExecutor(PER_CLIENT + 4) as pool:
        answers = list(pool.map(lambda _: _join(url, session, image, LONG), range(PER_CLIENT + 4)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] * PER_CLIENT + [429] * 4, answers
    refusal = next(body for status, body in answers if status == 429)
    assert f"this server takes at most {PER_CLIENT} at once from one client" in refusal, refusal
    assert _get_root_seconds(url) < 2
    status, body = _join(url, other, image, 1, source="127.0.0.2")
    assert status == 200, body
    mine, theirs = _listen(url, session), _listen(url, other, source="127.0.0.2")
    try:
        _read_until(mine, "process_starts")
        mine.close()  # the first client leaves: its running edit stops, its queued ones are dropped
        t0 = time.monotonic()
        assert '"success":true' in _read_until(theirs, "process_completed").replace(" ", "")
        assert time.monotonic() - t0 < 15
    finally:
        mine.close()
        theirs.close()


@needs_gradio
def test_a_huge_prompt_is_refused_by_its_length(slow, hostile):
    """A 1 MiB prompt: refused from its length at once, before the text encoder or any model call,
    and not echoed back. A 20 MiB one, like any request body over 2 MiB that is not an upload, is
    refused (413, one line) from its declared length before it is read, whatever --max-upload-mb."""
    big = json.dumps("x" * (1 << 20))
    url = slow.server.url  # the default limits
    before = len(slow.made())
    t0 = time.monotonic()
    stream = _raw_edit(url, _uploaded(url), target=big)
    assert time.monotonic() - t0 < 10
    assert _error(stream) == f"The target prompt is {1 << 20} characters; this server takes at most 2000.", stream
    assert len(stream) < 1000 and len(slow.made()) == before
    huge = len(json.dumps("x" * (20 << 20))) + 40
    for server, path in ((url, "call/edit"), (url, "queue/join"), (hostile.url, "call/edit")):
        with socket.create_connection(_address(server), timeout=10) as conn:
            conn.sendall(  # the headers only: the answer comes from the declared length
                f"POST /gradio_api/{path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
                + f"Content-Length: {huge}\r\n\r\n".encode()
            )
            reply = _read_response(conn)
        assert reply.startswith("HTTP/1.1 413") and len(reply) < 1000, reply
        assert reply.endswith(
            "The request is 20.0 MB; this server takes at most 2 MB in a request that is not a file upload "
            "(send images through the upload route)."
        ), reply


@needs_gradio
def test_inputs_gradio_cannot_read_get_one_line_naming_the_input(hostile):
    """What the page never sends fails in Gradio's own checks, before the edit: the client gets one line
    naming the page's input (not pydantic's text, not Gradio's "Cannot move ... to the gradio cache dir")."""
    image = _uploaded(hostile.url)
    passwd = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}
    upload_first = "not a file this server received as an upload; upload it, then send the returned path."
    for img, fields, want in (
        ("abc", {}, "“Image (upload or paste)”: text is not accepted; send an upload as the page does."),
        ([1, 2], {}, "“Image (upload or paste)”: a list is not accepted; send an upload as the page does."),
        (5, {}, "“Image (upload or paste)”: a number is not accepted; send an upload as the page does."),
        (passwd, {}, f"“Image (upload or paste)”: {upload_first}"),
        (image, {"mask_file": json.dumps(passwd)},
         f"“...or upload a mask image (white = edit, any size)”: {upload_first}"),
        (image, {"mask_paint": '"zzz"'}, "“Paint the region to edit (white), over the source”: text is not accepted; "
         "send an upload as the page does."),
    ):  # fmt: skip
        assert _error(_raw_edit(hostile.url, img, **fields)) == want
    req = urllib.request.Request(
        f"{hostile.url}/gradio_api/call/edit", data=json.dumps({"data": [image]}).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        event = json.load(r)["event_id"]
    with urllib.request.urlopen(f"{hostile.url}/gradio_api/call/edit/{event}", timeout=60) as r:
        stream = r.read().decode()
    assert _error(stream) == "The request has 1 inputs; this endpoint takes 15, in the page's order."


@needs_gradio
def test_a_chunked_body_is_refused_in_one_line(hostile):
    host, port = hostile.url.removeprefix("http://").split(":")
    for path in ("/gradio_api/call/edit", "/gradio_api/upload"):
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        conn.send(b"2\r\n{}\r\n0\r\n\r\n")
        r = conn.getresponse()
        assert (r.status, r.read().decode().strip()) == (
            411,
            "Send the request with a Content-Length header (chunked bodies are refused).",
        )
        conn.close()


#: Queue joins Gradio answers with a 500 (a traceback in the log) or with pydantic's JSON, and what this server says.
J = "The queue join"
BAD_JOINS = [  # (body, what the answer starts with)
    (b'{"fn_index": 9999, "data": [], "session_hash": "s"}', "fn_index 9999 is not an event of this page; its"),
    (b'{"fn_index": -1, "data": [], "session_hash": "s"}', "fn_index -1 is not an event of this page; its"),
    (b'{"fn_index": "x", "data": [], "session_hash": "s"}', f"{J}'s fn_index is text; accepted: a whole number."),
    (b'{"fn_index": true, "data": []}', f"{J}'s fn_index is true/false; accepted: a whole number."),
    (b'{"data": [], "session_hash": "s"}', f"{J} has no fn_index; it takes fn_index, data, session_hash"),
    (b'{"fn_index": 0, "data": "zz"}', f"{J}'s data is text; accepted: a list."),
    (b'{"fn_index": 0, "data": [], "trigger_id": 1.5}', f"{J}'s trigger_id is a number; accepted: a whole number."),
    (b"[1, 2]", "A queue join is a JSON object with fn_index, data, session_hash, event_id, trigger_id; this one is"),
    (b'{"fn_index": 0,', f"{J} is not JSON: Expecting property name enclosed in double quotes at character 15."),
    (b'{"fn_index": 0, "data": [' + b"9" * 5000 + b"]}", UNREADABLE_REQUEST),
]


@needs_gradio
def test_malformed_queue_joins_get_one_line_and_no_traceback(hostile):
    host, port = _address(hostile.url)
    for body, said in BAD_JOINS:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("POST", "/gradio_api/queue/join", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        status, text = r.status, r.read().decode()
        conn.close()
        assert status == 400 and text.startswith(said) and "\n" not in text.strip(), (body[:60], status, text)
    assert "Traceback" not in hostile.log.read_text()
    # a well-formed join still reaches Gradio's queue (its event id back)
    status, text = _post(hostile.url, "/gradio_api/queue/join", {"fn_index": _edit_fn(hostile.url), "data": [],
                                                                "session_hash": "ok"})  # fmt: skip
    assert status == 200 and "event_id" in json.loads(text), text

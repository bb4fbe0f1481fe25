"""Hostile and careless requests to ``fireflow serve`` (issue 21), through the HTTP API of a real server."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_web import (
    MAX_PIXELS,
    _api_edit,
    _file,
    _png_bytes,
    _png_claiming,
    _start_server,
    _stop,
    _upload,
    _wait_until_up,
    needs_gradio,
)

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


DEFAULTS = ['"a red circle"', '"a yellow circle"', "8", "1", "2", '"fireflow"', '"replace_v"', '"all"', "1", "false"]
DEFAULTS += ["null", "null", "false", "false"]


def _raw_edit(server: str, items: list[str]) -> str:
    """The edit API with its first values written as JSON text (a lone surrogate, a 5000-digit
    number: what json.dumps would not send), the rest the defaults."""
    data_json = "[" + ", ".join([*items, *DEFAULTS[len(items) - 1 :]]) + "]"
    req = urllib.request.Request(
        f"{server}/gradio_api/call/edit", data=('{"data": ' + data_json + "}").encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as r:
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


@needs_gradio
def test_text_fields_are_checked_for_type_and_length(hostile):
    status, body = _upload(hostile.url, "c.png", _png_bytes(40, (200, 30, 30)))
    img = json.dumps(_file(json.loads(body)[0]))
    knobs = ["8", "1", "2", '"fireflow"', '"replace_v"', '"all"', "1"]
    big = "9" * 40  # 5000 digits are refused by the JSON parser itself (HTTP 400, below)
    for data, message in (
        ([img, '["a list"]', '"b"'], "The source prompt must be text, got list."),
        ([img, '"a"', '{"x": 1}'], "The target prompt must be text, got dict."),
        ([img, "5", '"b"'], "The source prompt must be text, got int."),
        ([img, '"\\u200b\\u200d\\ufeff"', '"b"'], "The source prompt is empty"),
        ([img, '"a"', '"b\\ud800"'], "The target prompt contains an invalid character (a lone surrogate)."),
        ([img, '"a"', '"' + "x" * 3000 + '"'], "The target prompt is 3000 characters; this server takes at most 2000."),
        ([img, '"a"', '"b"', "8", "1", "2", '"fireflow"', '"replace_v"', big], "Blocks is out of range"),
        ([img, '"a"', '"b"', "8", "1", "2", '["fireflow"]'], "Solver must be text, got list."),
        ([img, '"a"', '"b"', '"8"'], "Steps must be a number, got str."),
        (
            [img, '"a"', '"b"', *knobs, "false", "null", "null", '"false"'],
            "Paste the source pixels must be true or false",
        ),
    ):
        t0 = time.monotonic()
        error = _error(_raw_edit(hostile.url, data))
        assert message in error, (data[1:], error)
        assert "\n" not in error and "Traceback" not in error
        assert time.monotonic() - t0 < 10
    with pytest.raises(urllib.error.HTTPError) as e:
        _raw_edit(hostile.url, [img, '"a"', '"b"', "8", "1", "2", '"fireflow"', '"replace_v"', "9" * 5000])
    assert e.value.code == 400


@needs_gradio
def test_bad_mask_upload_is_the_pages_error(hostile):
    status, body = _upload(hostile.url, "c.png", _png_bytes(40, (200, 30, 30)))
    image = _file(json.loads(body)[0])
    mask = _file(json.loads(_upload(hostile.url, "m.png", b"not an image at all")[1])[0])
    stream = _api_edit(hostile.url, image, "a", "b", 8, 1, 2, "fireflow", "replace_v", "all", 1, False, None, mask)
    assert _error(stream) == "The mask upload cannot be used: it is not an image this server can read.", stream


@needs_gradio
def test_an_abandoned_edit_stops_between_model_calls(tmp_path):
    """The handler's step callback stops the edit once Gradio marks its job as abandoned."""
    from types import SimpleNamespace

    from fireflow.web.handlers import client_gone

    job = SimpleNamespace(session_hash="s1", alive=True)
    app = SimpleNamespace(_queue=SimpleNamespace(active_jobs=[None, [job]]))
    assert not client_gone(app, SimpleNamespace(session_hash="s1"))
    job.alive = False
    assert client_gone(app, SimpleNamespace(session_hash="s1"))
    assert not client_gone(app, SimpleNamespace(session_hash="other"))

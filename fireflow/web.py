"""``fireflow serve``: a web page to edit images by hand, one knob at a time (Gradio).

The page is a thin front end over :meth:`fireflow.FireFlowEditor.edit`: every request makes its
own edit, and the editor keeps no per-edit state, so two users never see each other's features.
Gradio is imported only when the page is built, so the CLI works without it installed.
"""

from __future__ import annotations

import argparse
import atexit
import html
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fireflow.image import MAX_PIXELS

if TYPE_CHECKING:  # only for annotations: importing gradio costs seconds
    import gradio as gr

    from fireflow.editor import FireFlowEditor
    from fireflow.settings import EditSettings

#: Upper bound on steps per pass accepted from the page (fireflow.settings allows more), so one request
#: cannot hold the queue for hours.
MAX_STEPS = 100
MB = 1 << 20
#: Largest upload accepted, in MiB: a 4096x4096 photo is 5-15 MB as JPEG, up to ~40 MB as PNG.
MAX_UPLOAD_MB = 48
#: Uploads kept on disk: the most recent ones, at most this many and this many MiB; older ones are deleted.
KEEP_UPLOADS = 64
UPLOAD_SPACE_MB = 1024
#: Room for the multipart headers around one upload, and for the JSON of an edit request.
REQUEST_OVERHEAD = 64 * 1024
#: Seconds requests in flight get to finish when the server is stopped by a signal.
SHUTDOWN_GRACE_S = 1.0
#: Result files older than this are deleted from the app's folder on the next request.
KEEP_RESULTS_S = 3600

#: Nearest-neighbour scaling: the demo model works at 32x32, and blurred pixels would hide what it did.
CSS = """
.fireflow-result .image-frame { width: 100%; height: 100%; }
.fireflow-result .image-frame img {
    width: 100% !important; height: 100% !important; object-fit: contain; image-rendering: pixelated;
}
#edit-info { min-height: 1.5em; }
.fireflow-error { color: var(--error-text-color, #b91c1c); font-weight: 600; }
"""


@dataclass(frozen=True)
class Example:
    """One row of the examples gallery: an image file and its two prompts."""

    image: str
    source: str
    target: str


@dataclass(frozen=True)
class UploadLimits:
    """What the server accepts and keeps of uploads (``fireflow serve --max-upload-mb ...``)."""

    max_bytes: int = MAX_UPLOAD_MB * MB  #: one upload, and one request body of any kind
    keep: int = KEEP_UPLOADS  #: uploads kept on disk, newest first
    space: int = UPLOAD_SPACE_MB * MB  #: bytes of uploads kept on disk

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.keep < 1 or self.space < self.max_bytes:
            raise ValueError(f"bad upload limits {self}: all positive, space >= max_bytes")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``fireflow serve`` (called by :func:`fireflow.cli.build_parser`)."""
    from fireflow.cli import add_model_options

    p = subparsers.add_parser("serve", help="a web page to edit images interactively (needs gradio)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument(
        "--concurrency", type=int, default=1, help="edits run at once; the rest wait in the queue (default 1)"
    )
    p.add_argument("--queue-size", type=int, default=32, help="requests allowed to wait (default 32)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help=f"refuse larger images (default {MAX_PIXELS})")
    p.add_argument(
        "--max-upload-mb", type=float, default=MAX_UPLOAD_MB, help=f"largest upload, MiB (default {MAX_UPLOAD_MB})"
    )
    p.add_argument(
        "--keep-uploads",
        type=int,
        default=KEEP_UPLOADS,
        help=f"uploads kept on disk; older ones are deleted (default {KEEP_UPLOADS})",
    )
    p.add_argument(
        "--upload-space-mb",
        type=float,
        default=UPLOAD_SPACE_MB,
        help=f"MiB of uploads kept on disk; older ones are deleted (default {UPLOAD_SPACE_MB})",
    )
    add_model_options(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> None:
    """Check the options and the port, load the model, build the page and serve it until stopped.

    SIGTERM and SIGINT stop the server and delete its temporary folder (uploads, results).
    """
    from fireflow.cli import UsageError

    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
    for flag, value in (
        ("--concurrency", args.concurrency),
        ("--queue-size", args.queue_size),
        ("--max-pixels", args.max_pixels),
        ("--max-upload-mb", args.max_upload_mb),
        ("--keep-uploads", args.keep_uploads),
        ("--upload-space-mb", args.upload_space_mb),
    ):
        if not (isinstance(value, int) or math.isfinite(value)) or value <= 0:
            raise UsageError(f"{flag} must be a positive number, got {value}")
    if args.upload_space_mb < args.max_upload_mb:
        raise UsageError(
            f"--upload-space-mb ({args.upload_space_mb:g}) must be at least --max-upload-mb ({args.max_upload_mb:g})"
        )
    limits = UploadLimits(int(args.max_upload_mb * MB), args.keep_uploads, int(args.upload_space_mb * MB))
    check_port(args.host, args.port)  # before the model: loading FLUX takes minutes
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"fireflow serve: listening on {args.host}: anyone who can reach it can run edits", file=sys.stderr)
    if importlib.util.find_spec("gradio") is None:
        raise UsageError("the web page needs gradio: pip install 'fireflow[web]'")
    from fireflow.cli import load_editor

    workdir = Path(tempfile.mkdtemp(prefix="fireflow-web-"))
    # Uploads and Gradio's copies of results go to a folder this server owns and deletes when it stops;
    # Gradio reads the variable when it is imported, so it is set first.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(workdir / "gradio"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home
    # Threads still finishing an edit at exit may write once more: delete again at the very end.
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    stopped: list[int] = []
    apps: list[Any] = []
    restore = _stop_on_signals(stopped, apps)
    try:
        import gradio  # noqa: F401

        editor = load_editor(args)
        note = getattr(editor.adapter, "size_note", None)
        if note:
            print(note, file=sys.stderr)
        app = build_app(editor, max_pixels=args.max_pixels, concurrency=args.concurrency, workdir=workdir / "results")
        app.queue(max_size=args.queue_size)
        apps.append(app)
        print(f"fireflow serve: {editor.model_name} model on http://{args.host}:{args.port}", file=sys.stderr)
        try:
            launch(app, host=args.host, port=args.port, limits=limits)
        except OSError:  # taken since the check above; Gradio's message talks about launch() arguments
            raise UsageError(_port_message(args.host, args.port)) from None
    finally:
        restore()
        shutil.rmtree(workdir, ignore_errors=True)
    if stopped:
        print(f"fireflow serve: stopped by {signal.Signals(stopped[0]).name}; removed {workdir}", file=sys.stderr)
        # Everything of ours is cleaned up. The interpreter's own teardown of torch and Gradio takes
        # seconds on a busy machine, and `docker stop` sends SIGKILL 10 s after SIGTERM: skip it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _stop_on_signals(stopped: list[int], apps: list[Any]):
    """Turn SIGTERM (systemd, docker stop, kill) into what Ctrl-C does: Gradio closes the server and
    the ``finally`` of :func:`cmd_serve` runs. Requests still in flight (a slow upload) get
    :data:`SHUTDOWN_GRACE_S` to finish. Returns a function restoring the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_signal(signum: int, frame: Any) -> None:
        if not stopped:
            stopped.append(signum)
            for app in apps:  # uvicorn would otherwise wait on open requests until Gradio's 5 s join gives up
                server = getattr(app, "server", None)
                if server is not None and hasattr(server, "config"):
                    server.config.timeout_graceful_shutdown = SHUTDOWN_GRACE_S
            raise KeyboardInterrupt  # Gradio's main-thread loop closes the server on it

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _port_message(host: str, port: int) -> str:
    return (
        f"cannot listen on {host}:{port}: the port is taken or the address is not this machine's; "
        "choose another --port or --host"
    )


def check_port(host: str, port: int) -> None:
    """Raise UsageError unless ``host:port`` can be listened on now (the server binds it moments later)."""
    from fireflow.cli import UsageError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no conflict
            s.bind(address)
            s.listen(1)
    except OSError:  # socket.gaierror included
        raise UsageError(_port_message(host, port)) from None


def launch(
    app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, limits: UploadLimits | None = None, **kwargs: Any
) -> None:
    """Serve ``app`` with settings that keep it local: no share link, no extra readable paths, bounded uploads."""
    import gradio as gr
    from starlette.middleware import Middleware

    limits = limits or UploadLimits()
    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        allowed_paths=[],  # the page serves only what it made or what was uploaded to it
        max_file_size=limits.max_bytes,
        app_kwargs={"middleware": [Middleware(RequestGuard, blocks=app, limits=limits)]},
        ssr_mode=False,  # no Node server
        mcp_server=False,
        pwa=False,
        show_error=True,  # unexpected errors show their message; the expected ones use gr.Error anyway
        theme=gr.themes.Default(),
        css=CSS,
        **kwargs,
    )


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


def build_app(
    editor: FireFlowEditor,
    *,
    max_pixels: int | None = MAX_PIXELS,
    concurrency: int = 1,
    examples: Sequence[Example] | None = None,
    workdir: str | os.PathLike | None = None,
    title: str = "FireFlow image editing",
) -> gr.Blocks:
    """The page: inputs and knobs on the left, source / edit / reconstruction side by side.

    ``concurrency`` bounds the edits running at once (the queue holds the rest). Default 1: on a
    CPU one edit already uses every core through torch's threads, so a second one would only
    halve the speed of both; on a GPU, FLUX fills the card, and two edits double the memory of
    the stored features. Raise it on a big GPU with a small model. ``examples`` defaults to the
    bundled ones (:func:`default_examples`). Result files go to ``workdir`` (default: a new
    temporary folder), so no page action touches any other server path.
    """
    import gradio as gr

    from fireflow.features import STRATEGIES
    from fireflow.settings import KNOBS, EditSettings, describe_blocks

    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="fireflow-web-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if examples is None:
        examples = default_examples(workdir / "examples", getattr(editor, "model_name", "demo"))
    page_fn, api_fn = make_edit_fn(editor, max_pixels=max_pixels, workdir=workdir)
    size_note = getattr(editor.adapter, "size_note", None)
    # The demo model has no guidance input: say so next to the knob rather than let it look broken.
    has_guidance = editor.adapter.guidance_kind != "none"
    guidance_info = "while editing" if has_guidance else "unused by this model"
    defaults = editor.resolve(EditSettings())  # this model's values of the knobs the table leaves to it

    def knob(name: str, elem_id: str, info: str | None = None) -> Any:
        """The control of one knob of fireflow.settings.KNOBS: its label, its default for this model."""
        k = KNOBS[name]
        value = getattr(defaults, name) if k.default is None else k.default
        if name == "strategy":  # any space-separated mix may be typed; fireflow.settings checks it
            return gr.Dropdown(
                [*STRATEGIES, "replace_v add_k"], value=value, label=k.label, allow_custom_value=True, elem_id=elem_id
            )
        if k.choices:
            return gr.Dropdown(list(k.choices), value=value, label=k.label, elem_id=elem_id)
        if isinstance(value, str):
            return gr.Textbox(value, label=k.label, elem_id=elem_id, info=info)
        # No precision: a step count of 2.5 must reach the check and be refused, not be rounded to 2.
        return gr.Number(value, label=k.label, min_width=90, elem_id=elem_id, info=info)

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, KEEP_RESULTS_S)) as app:
        gr.Markdown(
            f"## {html.escape(title)}\n"
            "Invert the image with the **source** prompt, then sample it back with the **target** prompt, "
            "reusing the attention values of the inversion "
            "([FireFlow](https://arxiv.org/abs/2412.07517), Deng et al., ICML 2025). "
            f"Model: `{editor.model_name}`." + (f"\n\n*Note: {html.escape(size_note)}.*" if size_note else "")
        )
        with gr.Row():
            with gr.Column(scale=2):
                image = _image_input(gr)
                with gr.Accordion("Mask: edit one region only (optional)", open=False, elem_id="mask-panel"):
                    mask_paint = gr.ImageEditor(
                        label="Paint the region to edit (white), over the source",
                        type="numpy",
                        image_mode="RGBA",
                        sources=[],  # the background is the uploaded image, set below
                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=8),
                        transforms=[],
                        layers=False,
                        height=320,
                        elem_id="mask-editor",
                    )
                    mask_file = gr.Image(
                        type="filepath",
                        image_mode=None,
                        sources=["upload"],
                        label="...or upload a mask image (white = edit, any size)",
                        height=160,
                        elem_id="mask-upload",
                    )
                    paste = gr.Checkbox(
                        False, label="Paste the source pixels outside the mask (exact background)", elem_id="paste"
                    )
                source = gr.Textbox(label="Source prompt", placeholder="what the image shows", elem_id="source")
                target = gr.Textbox(label="Target prompt", placeholder="what it should show", elem_id="target")
                with gr.Row():
                    steps = knob("num_steps", "steps", "per pass")
                    inject = knob("inject", "inject", "steps reusing V")
                    guidance = knob("guidance", "guidance", guidance_info)
                with gr.Row():
                    solver = knob("solver", "solver")
                    strategy = knob("strategy", "strategy")
                    blocks = knob("blocks", "blocks", f"default ({describe_blocks(defaults.blocks)}), all, 0-3, 0,5,9")
                with gr.Accordion("More", open=False, elem_id="more"):
                    inv_info = "paper: 1" if has_guidance else "unused by this model"
                    inversion_guidance = knob("inversion_guidance", "inversion-guidance", inv_info)
                recon = gr.Checkbox(False, label="Show reconstruction (source prompt, no injection)", elem_id="recon")
                run = gr.Button("Edit", variant="primary", elem_id="edit-button")
            with gr.Column(scale=3):
                with gr.Row():
                    out_source = _result_image(gr, "Source (as the model saw it)", "out-source")
                    out_edit = _result_image(gr, "Edit", "out-edit")
                    out_recon = _result_image(gr, "Reconstruction", "out-recon", visible=False)
                info = gr.HTML(elem_id="edit-info")
                download = gr.DownloadButton("Download edit (PNG)", interactive=False, elem_id="download")
                gallery = None
                if examples:  # under the results, where the page has room for it
                    gallery = gr.Examples(
                        [[e.image, e.source, e.target] for e in examples],
                        inputs=[image, source, target],
                        label="Examples: click one to run it with the knobs as set",
                        examples_per_page=12,
                    )
        # The painter shows the uploaded source underneath the strokes.
        image.change(lambda path: mask_background(path, max_pixels), image, mask_paint, api_visibility="private")
        inputs = [image, source, target, steps, inject, guidance, solver, strategy, blocks, inversion_guidance, recon]
        inputs += [mask_paint, mask_file, paste]
        outputs = [out_source, out_edit, out_recon, info, download]
        # One concurrency_id: the button, Enter, the gallery and the API share one bounded pool of workers.
        # The page's events report bad input in the page; the API endpoint, on a button never shown,
        # raises it as an error event for API clients.
        api_button = gr.Button("edit", visible=False, elem_id="api-edit")
        api_button.click(api_fn, inputs, outputs, api_name="edit", concurrency_limit=concurrency, concurrency_id="edit")
        for event in (run.click, target.submit, *([gallery.load_input_event.then] if gallery else [])):
            event(
                page_fn, inputs, outputs, api_visibility="private", concurrency_limit=concurrency, concurrency_id="edit"
            )
    return app


def _image_input(gr: Any) -> gr.Image:
    """An image upload (or paste) handed to the edit as its file path, undecoded.

    ``fireflow.image.load_image`` reads it later, sizing it from its header first; Gradio's own
    preprocessing would open it with Pillow and fail on a decompression bomb with an exception.
    """
    image = gr.Image(
        type="filepath",
        image_mode=None,  # keep the file as uploaded; fireflow.image does the conversion
        sources=["upload", "clipboard"],
        label="Image (upload or paste)",
        elem_id="input-image",
        height=320,
    )
    stock = image.preprocess

    def preprocess(payload: Any) -> str | Unreadable | None:
        if payload is None:
            return None
        if getattr(payload, "path", None) and not str(getattr(payload, "url", None) or "").startswith("data:"):
            return str(payload.path)  # Gradio has checked it is an upload of this server
        try:
            return stock(payload)
        except gr.Error:
            raise
        except Exception:  # noqa: BLE001 - a pasted data URL that is not an image
            return Unreadable()

    # Wrapped on this one instance, not by subclassing: Gradio writes a .pyi file next to the
    # module of every Component subclass, and a package must not write into itself.
    image.preprocess = preprocess
    return image


class Unreadable:
    """What the image input hands on for an upload it cannot read (the edit reports it)."""


def _result_image(gr: Any, label: str, elem_id: str, visible: bool = True) -> gr.Image:
    return gr.Image(
        label=label,
        type="pil",
        format="png",  # lossless: the page shows exactly what the editor returned
        interactive=False,
        buttons=["download", "fullscreen"],
        height=256,
        elem_id=elem_id,
        elem_classes=["fireflow-result"],
        visible=visible,
    )


NOT_AN_IMAGE = "The upload is not an image this server can read; use PNG, JPEG, WebP, GIF, BMP or TIFF."
UPLOAD_GONE = "The uploaded image is no longer on this server (it keeps only the latest uploads); upload it again."


class EditError(ValueError):
    """Bad input to the page's edit: one line, plain text, naming the page's own labels."""


def error_html(message: str) -> str:
    """The error line shown in the page in place of the result line (escaped: it may echo user text)."""
    return f'<div class="fireflow-error" role="alert">Cannot edit: {html.escape(message)}</div>'


def make_edit_fn(editor: FireFlowEditor, *, max_pixels: int | None, workdir: Path):
    """The request handlers ``(page, api)``: check the inputs, run one edit, return what the page shows.

    Both run the same edit. On bad input ``page`` returns the message in place of the result line and
    clears every result and the download (so nothing stale stays on screen); ``api`` raises
    ``gr.Error`` with the plain-text message, for API clients. Errors nobody expected are reported
    the same way, with their traceback on the server's stderr.
    """
    import gradio as gr

    from fireflow.image import ImageError, ImageTooLarge, load_image
    from fireflow.settings import SettingError

    def run(
        image: str | Unreadable | None,
        source: str,
        target: str,
        steps: float | None,
        inject: float | None,
        guidance: float | None,
        solver: str,
        strategy: str,
        blocks: str,
        inversion_guidance: float | None,
        reconstruction: bool,
        mask_paint: Any = None,
        mask_file: str | None = None,
        paste: bool = False,
    ) -> tuple:
        if not image:
            raise EditError("Upload or paste an image first.")
        if isinstance(image, Unreadable):
            raise EditError(NOT_AN_IMAGE)
        if not Path(image).is_file():
            raise EditError(UPLOAD_GONE)
        try:
            pil = load_image(image, max_pixels, name="The image")  # sized from the header, then decoded
        except ImageTooLarge as e:
            raise EditError(f"{e}".replace("the limit of", "this server's limit of")) from None
        except ImageError:
            raise EditError(NOT_AN_IMAGE) from None
        if not (source or "").strip():
            raise EditError("The source prompt is empty: describe what the image shows.")
        if not (target or "").strip():
            raise EditError("The target prompt is empty: describe what the edit should show.")
        settings = check_knobs(
            editor,
            num_steps=steps,
            inject=inject,
            guidance=guidance,
            inversion_guidance=inversion_guidance,
            solver=solver,
            strategy=strategy,
            blocks=blocks,
        )
        mask = page_mask(mask_paint, mask_file, max_pixels)
        if paste and mask is None:
            raise EditError("Paste the source pixels needs a mask: paint the region to edit or upload a mask.")
        try:
            out = editor.edit(
                pil,
                source.strip(),
                target.strip(),
                settings,
                mask=mask,
                paste_pixels=bool(paste),
                reconstruction=bool(reconstruction),
                max_pixels=max_pixels,
            )
        except SettingError as e:
            raise EditError(e.worded("label")) from None
        except ValueError as e:  # the editor's messages name the bad value and what is accepted
            raise EditError(str(e)) from None
        path = _save_result(out.image, workdir)
        s = out.source
        text = (
            f"<b>{out.nfe} NFE</b> · {out.seconds:.2f} s · {s.width}×{s.height} · {html.escape(describe(out.settings))}"
        )
        text += f" · target: “{html.escape(target.strip())}”"
        if mask is not None:
            text += f" · masked: {int(out.mask.mean() * 100)}% of the image edited" + (
                " (pixels pasted)" if paste else ""
            )
        return (
            s,
            out.image,
            gr.Image(value=out.reconstruction, visible=out.reconstruction is not None),
            text,
            gr.DownloadButton(value=str(path), interactive=True),
        )

    def page(*inputs: Any) -> tuple:
        try:
            return run(*inputs)
        except EditError as e:
            message = str(e)
        except Exception as e:  # noqa: BLE001 - the page must say something, and keep serving
            traceback.print_exc()
            message = f"the edit failed on the server: {type(e).__name__}: {e}"
        return (
            None,
            None,
            gr.Image(value=None, visible=False),
            error_html(message),
            gr.DownloadButton(value=None, interactive=False),
        )

    def api(*inputs: Any) -> tuple:
        try:
            return run(*inputs)
        except EditError as e:  # plain text: an API client gets the message as written, no HTML entities
            raise gr.Error(str(e), title="Cannot edit", print_exception=False) from None

    return page, api


def mask_background(path: Any, max_pixels: int | None) -> dict | None:
    """The painter's value for a new upload: the image, no strokes (None for what cannot be read)."""
    from fireflow.image import ImageError, load_image

    if not path or isinstance(path, Unreadable):
        return None
    try:
        background = np.asarray(load_image(path, max_pixels).convert("RGBA"))
    except (ImageError, OSError):
        return None
    return {"background": background, "layers": [], "composite": background}


def page_mask(painted: Any, uploaded: str | None, max_pixels: int | None) -> np.ndarray | None:
    """The edit mask from the page: an uploaded mask image, else the painted strokes (any pixel a
    stroke covers), else None (an unmasked edit)."""
    from fireflow.image import ImageError, load_image

    if uploaded:
        try:
            return np.asarray(load_image(uploaded, max_pixels, name="The mask").convert("L")) >= 128
        except ImageError as e:
            raise EditError(f"The mask upload cannot be used: {e}") from None
    layers = (painted or {}).get("layers") or [] if isinstance(painted, dict) else []
    strokes = [np.asarray(layer)[..., 3] > 0 for layer in layers if layer is not None and np.asarray(layer).ndim == 3]
    if not strokes or not np.logical_or.reduce(strokes).any():
        return None
    return np.logical_or.reduce(strokes)


def check_knobs(editor: FireFlowEditor, **values: Any) -> EditSettings:
    """The page's knob values (by API name) as checked settings for ``editor``'s model, or an
    :class:`EditError` naming the page's label. fireflow.settings does the checking, against this
    model's blocks too, before anything is expanded or run; the page adds that no field may be left
    empty (an empty field is not "the default" here) and this server's bound on Steps."""
    from fireflow.settings import KNOBS, EditSettings, SettingError

    for name, value in values.items():
        if value is None or (isinstance(value, str) and not value.strip() and name != "blocks"):
            raise EditError(f"{KNOBS[name].label} is empty: enter a value.")
    n = values["num_steps"]
    if isinstance(n, (int, float)) and not (math.isfinite(n) and n == int(n) and 1 <= n <= MAX_STEPS):
        shown = int(n) if math.isfinite(n) and n == int(n) else n
        label = KNOBS["num_steps"].label
        raise EditError(f"{label} must be a whole number between 1 and {MAX_STEPS} on this server, got {shown}.")
    settings = EditSettings.from_values(values, ignore_none=False)
    try:
        return editor.resolve(settings)
    except SettingError as e:
        raise EditError(e.worded("label")) from None


def describe(s) -> str:
    """The knobs an edit actually ran with (the editor's record, not the form's), in one line."""
    from fireflow.settings import describe_blocks

    span = describe_blocks(s.blocks)
    return f"{s.solver}, {s.num_steps} steps, inject {s.inject}, {s.strategy} in blocks {span}, guidance {s.guidance:g}"


def _save_result(image: Any, workdir: Path) -> Path:
    """Write the edit to a fresh folder of its own (one per request, so concurrent edits never collide)."""
    from fireflow.image import save_image_atomic

    _prune(workdir)
    folder = Path(tempfile.mkdtemp(dir=workdir, prefix="edit-"))
    path = folder / "fireflow-edit.png"
    save_image_atomic(image, path)
    return path


def _prune(workdir: Path, max_age_s: float = KEEP_RESULTS_S) -> None:
    """Delete result folders older than ``max_age_s``: a long-running server does not fill the disk."""
    cutoff = time.time() - max_age_s
    for folder in workdir.glob("edit-*"):
        try:
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
        except FileNotFoundError:  # another request pruned it first
            pass


#: The gallery's edits of the bundled example emoji (``examples/<source prompt>.png``); the demo
#: model knows these names, and FLUX reads them as plain English.
EXAMPLE_EDITS = (
    ("red heart", "blue heart"),
    ("cat face", "tiger face"),
    ("grinning face", "smiling face with sunglasses"),
    ("red apple", "green apple"),
    ("cloud", "cloud with snow"),
    ("yellow heart", "green heart"),
)


#: The gallery of the scenes model (``--model scenes``): files in ``examples/scenes/`` whose edit
#: keeps the layout (measured by ``python -m fireflow.demo.scenes_eval table``; docs/scenes.md).
SCENE_GALLERY = (
    "lemon_gray",
    "frog_white",
    "strawberry_sky_blue",
    "red_apple_beige",
    "yellow_heart_black",
    "red_heart_white",
)


def scene_examples() -> list[Example]:
    """The scenes model's gallery from ``examples/scenes/prompts.json``; empty where not bundled."""
    here = Path(__file__).resolve().parent
    for folder in (here / "examples" / "scenes", here.parent / "examples" / "scenes"):
        if (folder / "prompts.json").is_file():
            prompts = json.loads((folder / "prompts.json").read_text())
            return [
                Example(str(folder / f"{stem}.png"), prompts[f"{stem}.png"]["source"], prompts[f"{stem}.png"]["target"])
                for stem in SCENE_GALLERY
                if f"{stem}.png" in prompts and (folder / f"{stem}.png").is_file()
            ]
    return []


def default_examples(folder: Path, model: str = "demo") -> list[Example]:
    """The gallery: the bundled example images if present, else two pictures drawn into ``folder``.
    With the scenes model (``model == "scenes"``), its scene edits."""
    if model == "scenes":
        found = scene_examples()
        if found:
            return found
    here = Path(__file__).resolve().parent
    for examples in (here / "examples", here.parent / "examples"):  # installed package data, or a checkout
        found = [
            Example(str(examples / f"{source.replace(' ', '_')}.png"), source, target)
            for source, target in EXAMPLE_EDITS
            if (examples / f"{source.replace(' ', '_')}.png").is_file()
        ]
        if found:
            return found
    return _drawn_examples(folder)


def _drawn_examples(folder: Path) -> list[Example]:
    """Two simple pictures drawn with Pillow, for when no examples are bundled."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, bg, fg, shape, source, target in (
        ("red-circle", (40, 90, 200), (220, 40, 40), "ellipse", "a red circle on blue", "a yellow circle on blue"),
        ("green-square", (250, 250, 240), (40, 160, 60), "rectangle", "a green square", "a green triangle"),
    ):
        im = Image.new("RGB", (64, 64), bg)
        getattr(ImageDraw.Draw(im), shape)((14, 14, 50, 50), fill=fg)
        path = folder / f"{name}.png"
        im.save(path)
        out.append(Example(str(path), source, target))
    return out

"""``fireflow serve``: a web page to edit images by hand, one knob at a time (Gradio).

The page is a thin front end over :meth:`fireflow.FireFlowEditor.edit`: every request makes its
own edit, and the editor keeps no per-edit state, so two users never see each other's features.
Gradio is imported only when the page is built, so the CLI works without it installed.
"""

from __future__ import annotations

import argparse
import html
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fireflow.image import MAX_PIXELS

if TYPE_CHECKING:  # only for annotations: importing gradio costs seconds
    import gradio as gr

    from fireflow.editor import FireFlowEditor

#: Upper bound on steps per pass accepted from the page, so one request cannot hold the queue for hours.
MAX_STEPS = 100
#: Largest upload accepted, in bytes (Gradio refuses bigger ones before they reach us).
MAX_UPLOAD = "64mb"
#: Result files older than this are deleted from the app's folder on the next request.
KEEP_RESULTS_S = 3600

#: Nearest-neighbour scaling: the demo model works at 32x32, and blurred pixels would hide what it did.
CSS = """
.fireflow-result .image-frame { width: 100%; height: 100%; }
.fireflow-result .image-frame img {
    width: 100% !important; height: 100% !important; object-fit: contain; image-rendering: pixelated;
}
#edit-info { min-height: 1.5em; }
"""


@dataclass(frozen=True)
class Example:
    """One row of the examples gallery: an image file and its two prompts."""

    image: str
    source: str
    target: str


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
    add_model_options(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> None:
    """Load the model, build the page and serve it until interrupted."""
    from fireflow.cli import UsageError

    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
    if args.concurrency < 1 or args.queue_size < 1 or args.max_pixels < 1:
        raise UsageError("--concurrency, --queue-size and --max-pixels must be positive")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"fireflow serve: listening on {args.host}: anyone who can reach it can run edits", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="fireflow-web-"))
    # Uploads and Gradio's copies of results go to a folder this server owns and deletes at exit.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(workdir / "gradio"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError:
        raise UsageError("the web page needs gradio: pip install 'fireflow[web]'") from None
    from fireflow.cli import load_editor

    try:
        editor = load_editor(args)
        note = getattr(editor.adapter, "size_note", None)
        if note:
            print(note, file=sys.stderr)
        app = build_app(editor, max_pixels=args.max_pixels, concurrency=args.concurrency, workdir=workdir / "results")
        app.queue(max_size=args.queue_size)
        print(f"fireflow serve: {editor.model_name} model on http://{args.host}:{args.port}", file=sys.stderr)
        try:
            launch(app, host=args.host, port=args.port)
        except OSError:  # Gradio's own message talks about launch() arguments; speak in CLI options
            raise UsageError(
                f"cannot listen on {args.host}:{args.port}: the port is taken or the address is not this "
                "machine's; choose another --port or --host"
            ) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, **kwargs: Any) -> None:
    """Serve ``app`` with settings that keep it local: no share link, no extra readable paths."""
    import gradio as gr

    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        allowed_paths=[],  # the page serves only what it made or what was uploaded to it
        max_file_size=MAX_UPLOAD,
        ssr_mode=False,  # no Node server
        mcp_server=False,
        pwa=False,
        show_error=True,  # unexpected errors show their message; the expected ones use gr.Error anyway
        theme=gr.themes.Default(),
        css=CSS,
        **kwargs,
    )


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

    from fireflow import solvers
    from fireflow.features import STRATEGIES

    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="fireflow-web-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if examples is None:
        examples = default_examples(workdir / "examples")
    edit_fn = make_edit_fn(editor, max_pixels=max_pixels, workdir=workdir)
    size_note = getattr(editor.adapter, "size_note", None)
    # The demo model has no guidance input: say so next to the knob rather than let it look broken.
    has_guidance = editor.adapter.guidance_kind != "none"
    guidance_info = "while editing" if has_guidance else "unused by this model"

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
                source = gr.Textbox(label="Source prompt", placeholder="what the image shows", elem_id="source")
                target = gr.Textbox(label="Target prompt", placeholder="what it should show", elem_id="target")
                with gr.Row():
                    steps = gr.Number(8, label="Steps", min_width=90, precision=0, elem_id="steps", info="per pass")
                    inject = gr.Number(
                        1, label="Inject", min_width=90, precision=0, elem_id="inject", info="steps reusing V"
                    )
                    guidance = gr.Number(
                        editor.adapter.defaults.get("guidance", 2.0),
                        label="Guidance",
                        min_width=90,
                        elem_id="guidance",
                        info=guidance_info,
                    )
                with gr.Row():
                    solver = gr.Dropdown(list(solvers.SOLVERS), value="fireflow", label="Solver", elem_id="solver")
                    strategy = gr.Dropdown(
                        [*STRATEGIES, "replace_v add_k"],
                        value="replace_v",
                        label="Strategy",
                        allow_custom_value=True,  # any space-separated mix; the editor checks it
                        elem_id="strategy",
                    )
                    blocks = gr.Textbox(
                        "default", label="Blocks", elem_id="blocks", info="default, all, 20-37, single:all,double:0-3"
                    )
                with gr.Accordion("More", open=False, elem_id="more"):
                    inversion_guidance = gr.Number(
                        1.0,
                        label="Inversion guidance",
                        elem_id="inversion-guidance",
                        info="paper: 1" if has_guidance else "unused by this model",
                    )
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
        inputs = [image, source, target, steps, inject, guidance, solver, strategy, blocks, inversion_guidance, recon]
        outputs = [out_source, out_edit, out_recon, info, download]
        # One concurrency_id: the button, Enter and the gallery share one bounded pool of workers.
        run.click(edit_fn, inputs, outputs, api_name="edit", concurrency_limit=concurrency, concurrency_id="edit")
        for event in (target.submit, *([gallery.load_input_event.then] if gallery else [])):
            event(
                edit_fn, inputs, outputs, api_visibility="private", concurrency_limit=concurrency, concurrency_id="edit"
            )
    return app


def _image_input(gr: Any) -> gr.Image:
    """An image upload (or paste) that turns an unreadable file into a clear message in the page."""
    image = gr.Image(
        type="filepath",
        image_mode=None,  # keep the file as uploaded; fireflow.image does the conversion
        sources=["upload", "clipboard"],
        label="Image (upload or paste)",
        elem_id="input-image",
        height=320,
    )
    stock = image.preprocess

    def preprocess(payload: Any) -> str | None:
        try:
            return stock(payload)
        except gr.Error:
            raise
        except Exception:  # noqa: BLE001 - Pillow raises several types for a non-image
            raise gr.Error(NOT_AN_IMAGE, title="Not an image", print_exception=False) from None

    # Wrapped on this one instance, not by subclassing: Gradio writes a .pyi file next to the
    # module of every Component subclass, and a package must not write into itself.
    image.preprocess = preprocess
    return image


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


def make_edit_fn(editor: FireFlowEditor, *, max_pixels: int | None, workdir: Path):
    """The request handler: check the inputs, run one edit, return what the page shows.

    Bad input raises ``gr.Error`` with a one-line message (HTML-escaped: it may echo user text).
    """
    import gradio as gr
    from PIL import Image, UnidentifiedImageError

    from fireflow.image import load_image

    def fail(message: str) -> gr.Error:
        return gr.Error(html.escape(message), title="Cannot edit", print_exception=False)

    def edit(
        image: str | None,
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
    ) -> tuple:
        if not image:
            raise fail("Upload or paste an image first.")
        try:
            with Image.open(image) as im:
                w, h = im.size  # from the header: refuse a huge image before decoding it
                if max_pixels is not None and w * h > max_pixels:
                    raise fail(f"The image is {w}x{h} = {w * h} pixels, more than this server's limit of {max_pixels}.")
                pil = load_image(im, max_pixels)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
            raise fail(NOT_AN_IMAGE) from None
        if not (source or "").strip():
            raise fail("The source prompt is empty: describe what the image shows.")
        if not (target or "").strip():
            raise fail("The target prompt is empty: describe what the edit should show.")
        n = _whole(steps, "Steps")
        if not 1 <= n <= MAX_STEPS:
            raise fail(f"Steps must be between 1 and {MAX_STEPS}, got {n}.")
        k = _whole(inject, "Inject")
        g = _finite(guidance, "Guidance")
        g_inv = _finite(inversion_guidance, "Inversion guidance")
        try:
            out = editor.edit(
                pil,
                source.strip(),
                target.strip(),
                num_steps=n,
                inject=k,
                guidance=g,
                inversion_guidance=g_inv,
                solver=solver,
                strategy=strategy,
                blocks=blocks,
                reconstruction=bool(reconstruction),
                max_pixels=max_pixels,
            )
        except ValueError as e:  # the editor's messages name the bad value and what is accepted
            raise fail(str(e)) from None
        path = _save_result(out.image, workdir)
        s = out.source
        text = (
            f"<b>{out.nfe} NFE</b> · {out.seconds:.2f} s · {s.width}×{s.height} · {html.escape(describe(out.settings))}"
        )
        text += f" · target: “{html.escape(target.strip())}”"
        return (
            s,
            out.image,
            gr.Image(value=out.reconstruction, visible=out.reconstruction is not None),
            text,
            gr.DownloadButton(value=str(path), interactive=True),
        )

    def _whole(value: float | None, name: str) -> int:
        if value is None or not math.isfinite(value) or value != int(value):
            raise fail(f"{name} must be a whole number, got {value!r}.")
        return int(value)

    def _finite(value: float | None, name: str) -> float:
        if value is None or not math.isfinite(value):
            raise fail(f"{name} must be a number, got {value!r}.")
        return float(value)

    return edit


def describe(settings: dict) -> str:
    """The knobs an edit actually ran with (the editor's record, not the form's), in one line."""
    from fireflow.settings import describe_blocks

    span = describe_blocks(settings["blocks"])
    return (
        f"{settings['solver']}, {settings['num_steps']} steps, inject {settings['inject']}, "
        f"{settings['strategy']} in blocks {span}, guidance {settings['guidance']:g}"
    )


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


def default_examples(folder: Path) -> list[Example]:
    """The gallery: the bundled example images if present, else two pictures drawn into ``folder``."""
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

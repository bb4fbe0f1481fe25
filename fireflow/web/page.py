"""The page's layout: inputs and knobs on the left, source / edit / reconstruction side by side."""

from __future__ import annotations

import functools
import html
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fireflow.image import MAX_PIXELS
from fireflow.web.checks import MAX_LAYERS
from fireflow.web.handlers import Refused, Unreadable, make_edit_fn, mask_background, painter_refusal
from fireflow.web.results import KEEP_RESULTS_S, Example, default_examples
from fireflow.web.uploads import BLOB_DROPPED, PainterBlobs

if TYPE_CHECKING:  # only for annotations: importing gradio costs seconds
    import gradio as gr

    from fireflow.editor import FireFlowEditor

#: Shown on every page: why the page takes images only (issue 22, item 5).
VIDEO_NOTE = (
    "*Video is CLI-only:* `fireflow edit clip.mp4 -s ... -t ... -o out.mp4 --model <a Wan folder>` "
    "(README: Video). An 81-frame 480p Wan edit is minutes of GPU time and gigabytes of stored features; "
    "the page's queue runs one edit at a time (`--concurrency 1`), so one video would hold every visitor "
    "for those minutes, and 81 frames are beyond the page's upload and preview."
)

#: What each bundled model draws and which prompts it knows (from its model card,
#: fireflow/models/demo/*/README.md): a prompt outside them gets a picture of something else.
MODEL_NOTES = {
    "demo": (
        "The emoji model knows 233 emoji by name (“red heart”, “cat face”, “cloud”, ...), "
        "each drawn once, centred on white."
    ),
    "scenes": (
        "The scenes model draws one of 20 emoji (7 coloured hearts, 6 animal faces, 7 fruit) anywhere "
        "on a plain background: white, black, gray, beige, sky blue or mint green. Its prompts read "
        "`<object>, <background> background`, such as `lemon, gray background`."
    ),
}

#: Nearest-neighbour scaling: the demo model works at 32x32, and blurred pixels would hide what it did.
CSS = """
.fireflow-result .image-frame { width: 100%; height: 100%; }
.fireflow-result .image-frame img {
    width: 100% !important; height: 100% !important; object-fit: contain; image-rendering: pixelated;
}
#edit-info { min-height: 1.5em; }
.fireflow-error { color: var(--error-text-color, #b91c1c); font-weight: 600; }
"""


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
    bundled ones (:func:`default_examples`). Result files and the mask painter's images go to
    ``workdir`` (default: a new temporary folder), so no page action touches any other server path.
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
            return _raw_text(gr.Dropdown(list(k.choices), value=value, label=k.label, elem_id=elem_id))
        if isinstance(value, str):
            return _raw_text(gr.Textbox(value, label=k.label, elem_id=elem_id, info=info))
        # No precision: a step count of 2.5 must reach the check and be refused, not be rounded to 2.
        return gr.Number(value, label=k.label, min_width=90, elem_id=elem_id, info=info)

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, KEEP_RESULTS_S)) as app:
        gr.Markdown(
            f"## {html.escape(title)}\n"
            "Invert the image with the **source** prompt, then sample it back with the **target** prompt, "
            "reusing the attention values of the inversion "
            "([FireFlow](https://arxiv.org/abs/2412.07517), Deng et al., ICML 2025). "
            f"Model: `{editor.model_name}`. {MODEL_NOTES.get(editor.model_name, '')}"
            + (f"\n\n*Note: {html.escape(size_note)}.*" if size_note else "")
        )
        gr.Markdown(VIDEO_NOTE, elem_id="video-note")
        with gr.Row():
            with gr.Column(scale=2):
                image = _image_input(gr)
                with gr.Accordion("Mask: edit one region only (optional)", open=False, elem_id="mask-panel"):
                    mask_paint = _mask_painter(
                        gr,
                        max_pixels,
                        PainterBlobs(workdir / "painter", MAX_LAYERS),
                        label="Paint the region to edit (white), over the source",
                        type="numpy",
                        image_mode="RGBA",
                        sources=[],  # the background is the uploaded image, set below
                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=brush_size(editor)),
                        transforms=[],
                        layers=False,
                        height=320,
                        elem_id="mask-editor",
                    )
                    mask_file = _undecoded(
                        gr,
                        gr.Image(
                            type="filepath",
                            image_mode=None,
                            sources=["upload"],
                            label="...or upload a mask image (white = edit, any size)",
                            height=160,
                            elem_id="mask-upload",
                        ),
                    )
                    paste = gr.Checkbox(
                        False, label="Paste the source pixels outside the mask (exact background)", elem_id="paste"
                    )
                    auto = gr.Checkbox(
                        False,
                        label="Auto: find the region from the prompts (no painting; 4 more model calls)",
                        elem_id="mask-auto",
                    )
                first = examples[0] if examples else None  # its prompts show the form this model knows
                source = _raw_text(
                    gr.Textbox(
                        label="Source prompt",
                        placeholder=_hint("what the image shows", first and first.source),
                        elem_id="source",
                    )
                )
                target = _raw_text(
                    gr.Textbox(
                        label="Target prompt",
                        placeholder=_hint("what it should show", first and first.target),
                        elem_id="target",
                    )
                )
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
                    out_mask = _result_image(gr, "Auto mask (red: edited)", "out-mask", visible=False)
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
        inputs += [mask_paint, mask_file, paste, auto]
        outputs = [out_source, out_edit, out_recon, info, download, out_mask]
        # One concurrency_id: the button, Enter, the gallery and the API share one bounded pool of workers.
        # The page's events report bad input in the page; the API endpoint, on a button never shown,
        # raises it as an error event for API clients.
        api_button = gr.Button("edit", visible=False, elem_id="api-edit")
        api_button.click(api_fn, inputs, outputs, api_name="edit", concurrency_limit=concurrency, concurrency_id="edit")
        for event in (run.click, target.submit, *([gallery.load_input_event.then] if gallery else [])):
            event(
                page_fn, inputs, outputs, api_visibility="private", concurrency_limit=concurrency, concurrency_id="edit"
            )
    _plain_input_errors(gr, app)
    return app


def _plain_input_errors(gr: Any, app: gr.Blocks) -> None:
    """Inputs the page never sends (an image given as text, a file path that was not uploaded, too
    few inputs) fail in Gradio's own checks before any handler, with Gradio's multi-line internal
    text; on ``app`` (this instance only) they are refused with one line naming the page's input."""
    from gradio.exceptions import Error

    stock = app.preprocess_data

    async def preprocess_data(block_fn: Any, inputs: list[Any], state: Any, explicit_call: bool = False) -> Any:
        try:
            return await stock(block_fn, inputs, state, explicit_call)
        except Error:
            raise
        except Exception as e:  # noqa: BLE001 - whatever Gradio raised, the client gets one line
            line = await _unaccepted_input(block_fn, inputs, explicit_call, e)
            raise gr.Error(line, title="Cannot edit", print_exception=False) from None

    app.preprocess_data = preprocess_data


async def _unaccepted_input(block_fn: Any, inputs: list[Any], explicit_call: bool, error: Exception) -> str:
    """The one line for a request Gradio could not read: which input, and what it accepts. Found by
    checking each input again as Gradio does (a file must be one of this server's uploads, then fit
    the component's data model); only on this failure path."""
    from gradio import processing_utils
    from gradio.exceptions import InvalidPathError

    if len(inputs) != len(block_fn.inputs):
        return f"The request has {len(inputs)} inputs; this endpoint takes {len(block_fn.inputs)}, in the page's order."
    for i, (block, value) in enumerate(zip(block_fn.inputs, inputs, strict=True)):
        if getattr(block, "stateful", False):
            continue
        label = getattr(block, "label", None) or f"input {i + 1}"
        try:
            cached = await processing_utils.async_move_files_to_cache(
                value, block, check_in_upload_folder=not explicit_call
            )
            model = getattr(block, "data_model", None)
            if model is not None and cached is not None:
                model.model_validate(cached, context={"validate_meta": True})
        except InvalidPathError:
            return f"“{label}”: not a file this server received as an upload; upload it, then send the returned path."
        except Exception:  # noqa: BLE001 - the model's own reasons are Gradio's internals
            got = {str: "text", int: "a number", float: "a number", bool: "true/false", list: "a list"}
            return f"“{label}”: {got.get(type(value), 'this value')} is not accepted; send an upload as the page does."
    return f"The request could not be read ({type(error).__name__}); send its inputs as the page does."


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
    return _undecoded(gr, image)


def _undecoded(gr: Any, image: gr.Image) -> gr.Image:
    """``image`` handing on its upload's path undecoded (or :class:`Unreadable`), never failing in Gradio."""
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


def _raw_text(box: Any) -> Any:
    """``box`` (a Textbox, a Dropdown) handing on what was sent when it is not text (a list, a number)
    or not among the choices, for the edit to refuse with its own message naming the page's label:
    a Textbox would turn it into text, a Dropdown refuse it with Gradio's message."""
    from gradio.exceptions import Error

    stock = box.preprocess

    def preprocess(payload: Any) -> Any:
        if not isinstance(payload, str):
            return None if payload is None else payload
        try:
            return stock(payload)
        except Error:
            return payload

    box.preprocess = preprocess
    return box


def _hint(text: str, example: str | None) -> str:
    """A prompt box's placeholder: ``text``, and an example's prompt if there is one."""
    return f"{text}, e.g. “{example}”" if example else text


def brush_size(editor: Any) -> int:
    """The painter's brush radius in image pixels: 8 on a photo (and the 128-pixel emoji examples),
    2 on the scenes model's 32x32 scenes; either way a stroke an eighth of the gallery's images wide."""
    name = str(getattr(editor, "model_name", ""))
    return 2 if name.startswith("scenes") else 8


def _mask_painter(gr: Any, max_pixels: int | None, blobs: PainterBlobs, **kwargs: Any) -> gr.ImageEditor:
    """The mask painter, whose every image (background, each layer, composite) is sized from its
    header and refused (a :class:`Refused` for the edit to report) before Gradio decodes any. The
    images the page sends ahead of the edit are kept in ``blobs`` (on disk, bounded), not by Gradio."""
    from gradio.data_classes import FileData

    painter = gr.ImageEditor(**kwargs)
    stock, stock_accept = painter.preprocess, painter.accept_blobs

    @functools.wraps(stock_accept)  # its name and mark make it callable from the page
    def accept_blobs(data: Any) -> None:
        blobs.accept(data)

    painter.accept_blobs = accept_blobs

    def preprocess(payload: Any) -> Any:
        if payload is None:
            return None
        painting = None
        if getattr(payload, "id", None) is not None:  # images sent ahead, by accept_blobs
            try:
                painting = blobs.take(payload.id)
            except KeyError:
                return Refused(BLOB_DROPPED)
            if painting is not None:
                background, composite = (
                    None if p is None else FileData(path=p) for p in (painting.background, painting.composite)
                )
                layers = [FileData(path=p) for p in painting.layers if p is not None]
                payload = type(payload)(background=background, layers=layers, composite=composite)
        try:
            return _checked(stock, payload, max_pixels)
        finally:
            blobs.discard(painting)

    painter.preprocess = preprocess
    return painter


def _checked(stock: Any, payload: Any, max_pixels: int | None) -> Any:
    """``stock(payload)`` (the painter's own decoding) when every image passes :func:`painter_refusal`;
    otherwise, or if decoding fails, a :class:`Refused`."""
    import gradio as gr

    images = [getattr(i, "path", i) for i in [payload.background, *(payload.layers or []), payload.composite]]
    message = painter_refusal(images, max_pixels)
    if message:
        return Refused(message)
    try:
        return stock(payload)
    except gr.Error:
        raise
    except Exception:  # noqa: BLE001 - a layer that is not an image after all
        return Refused("The painted mask is not an image this server can read; paint it again.")


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

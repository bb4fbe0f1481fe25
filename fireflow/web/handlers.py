"""The page's edit requests: check every input, run one edit, say what it did or what was wrong."""

from __future__ import annotations

import html
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fireflow.web.checks import (  # noqa: F401 - re-exported: the page and tests import them from here
    MAX_STEPS,
    NOT_AN_IMAGE,
    UPLOAD_GONE,
    EditError,
    Refused,
    Unreadable,
    check_flag,
    check_knobs,
    check_prompts,
    check_text,
    error_html,
    mask_background,
    page_mask,
    painter_refusal,
    source_image,
)
from fireflow.web.results import save_result

if TYPE_CHECKING:
    from fireflow.editor import FireFlowEditor

class EditCancelled(Exception):
    """The client of an edit has gone: raised between model calls, the edit stops there."""


def client_gone(app: Any, request: Any) -> bool:
    """Whether Gradio has marked every running job of this request's session as abandoned (its
    client closed the tab or dropped the event stream: Gradio sets ``alive`` False on them)."""
    queue = getattr(app, "_queue", None)
    session = getattr(request, "session_hash", None)
    if queue is None or session is None:
        return False
    mine = [e for job in list(queue.active_jobs) if job for e in job if e.session_hash == session]
    return bool(mine) and not any(e.alive for e in mine)


def make_edit_fn(editor: FireFlowEditor, *, max_pixels: int | None, workdir: Path, app: list | None = None):
    """The request handlers ``(page, api)``: check the inputs, run one edit, return what the page shows.

    Both run the same edit. On bad input ``page`` returns the message in place of the result line and
    clears every result and the download (so nothing stale stays on screen); ``api`` raises
    ``gr.Error`` with the plain-text message, for API clients. Errors nobody expected are reported
    the same way, with their traceback on the server's stderr.
    """
    import gradio as gr

    from fireflow.settings import SettingError

    app = app if app is not None else []  # build_app puts the Blocks here once made

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
        auto: bool = False,
        request: Any = None,
    ) -> tuple:
        pil = source_image(image, max_pixels)

        def stop_if_gone(*_: Any) -> None:  # after every denoising step
            if app and client_gone(app[0], request):
                raise EditCancelled

        source, target = check_prompts(source, target)
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
        paste = check_flag(paste, "Paste the source pixels")
        auto = check_flag(auto, "Auto")
        reconstruction = check_flag(reconstruction, "Show reconstruction")
        if auto and mask is not None:
            raise EditError("Auto finds the mask itself: clear the painted or uploaded mask, or untick Auto.")
        if auto:
            mask = "auto"
        if paste and mask is None:
            raise EditError("Paste the source pixels needs a mask: paint the region to edit or upload a mask.")
        try:
            out = editor.edit(
                pil,
                source,
                target,
                settings,
                mask=mask,
                paste_pixels=bool(paste),
                reconstruction=bool(reconstruction),
                max_pixels=max_pixels,
                callback=stop_if_gone,
            )
        except SettingError as e:
            raise EditError(e.worded("label")) from None
        except ValueError as e:  # the editor's messages name the bad value and what is accepted
            raise EditError(str(e)) from None
        path = save_result(out.image, workdir)
        return (
            out.source,
            out.image,
            gr.Image(value=out.reconstruction, visible=out.reconstruction is not None),
            result_line(out, target, mask is not None, paste),
            gr.DownloadButton(value=str(path), interactive=True),
            gr.Image(value=mask_overlay(out.source, out.mask) if auto else None, visible=bool(auto)),
        )

    cleared = (
        None,
        None,
        gr.Image(value=None, visible=False),
        "",
        gr.DownloadButton(value=None, interactive=False),
        gr.Image(value=None, visible=False),
    )

    def page(*inputs: Any, request: Any = None) -> tuple:
        try:
            return run(*inputs, request=request)
        except EditCancelled:
            print("fireflow serve: an edit stopped: its client has gone", file=sys.stderr)
            return cleared
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
            gr.Image(value=None, visible=False),
        )

    def api(*inputs: Any, request: Any = None) -> tuple:
        try:
            return run(*inputs, request=request)
        except EditCancelled:
            print("fireflow serve: an edit stopped: its client has gone", file=sys.stderr)
            return cleared
        except EditError as e:  # plain text: an API client gets the message as written, no HTML entities
            raise gr.Error(str(e), title="Cannot edit", print_exception=False) from None

    # Gradio hands a handler its request when a parameter is annotated with gr.Request.
    page.__annotations__["request"] = api.__annotations__["request"] = gr.Request
    return page, api


def result_line(out: Any, target: str, masked: bool, paste: bool) -> str:
    """The line under the results: calls, time, size, the knobs the edit ran with, the target, the mask."""
    s = out.source
    text = f"<b>{out.nfe} NFE</b> · {out.seconds:.2f} s · {s.width}×{s.height} · {html.escape(describe(out.settings))}"
    text += f" · target: “{html.escape(target)}”"
    if masked:
        text += f" · masked: {int(out.mask.mean() * 100)}% of the image edited" + (" (pixels pasted)" if paste else "")
    return text


def mask_overlay(source: Any, mask: np.ndarray) -> Any:
    """The source with the (found) mask tinted red over it: what the edit was allowed to change."""
    from PIL import Image

    px = np.asarray(source.convert("RGB"), dtype=np.float32)
    m = np.asarray(mask).any(axis=0)[..., None] if np.asarray(mask).ndim == 3 else np.asarray(mask)[..., None]
    tinted = np.where(m, 0.5 * px + 0.5 * np.array([255.0, 0.0, 0.0]), 0.6 * px)
    return Image.fromarray(np.clip(tinted + 0.5, 0, 255).astype(np.uint8))


def describe(s) -> str:
    """The knobs an edit actually ran with (the editor's record, not the form's), in one line."""
    from fireflow.settings import describe_blocks

    span = describe_blocks(s.blocks)
    return f"{s.solver}, {s.num_steps} steps, inject {s.inject}, {s.strategy} in blocks {span}, guidance {s.guidance:g}"

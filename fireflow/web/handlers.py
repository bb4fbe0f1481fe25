"""The page's edit requests: check every input, run one edit, say what it did or what was wrong."""

from __future__ import annotations

import copy
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
    """The client of an edit has gone: raised before the next model call, the edit stops there."""


def client_gone(blocks: Any, event_id: str | None) -> bool:
    """Whether Gradio has given up the running job ``event_id``, which it never stops itself.

    A dropped event stream (a closed tab, a killed client): Gradio's stream route sees the
    disconnect at once (Starlette cancels the stream) and sets ``alive`` False on the session's
    events. A cancel (``POST /cancel``, gradio_client's ``job.cancel()``): Gradio cancels the job's
    task, which frees its worker slot and leaves the handler's thread running, so the job is no
    longer among the active ones (and the next job may already be running in its place).
    """
    queue = getattr(blocks, "_queue", None)
    if queue is None or event_id is None:
        return False
    mine = [e for job in list(queue.active_jobs) if job for e in job if getattr(e, "_id", None) == event_id]
    return not mine or not any(e.alive for e in mine)


def _current_event() -> tuple[Any, str | None]:
    """The Blocks and the queue's id of the event this handler runs for (None, None outside Gradio).
    Gradio puts both in context variables for the handler's thread, as gr.Progress and gr.Info use them."""
    try:
        from gradio.context import LocalContext
    except ImportError:
        return None, None
    return LocalContext.blocks.get(None), LocalContext.event_id.get(None)


class _Watched:
    """``adapter`` for one edit: before every model call (inversion, edit, reconstruction, Auto's
    mask) ``check()`` may stop the edit; ``calls`` counts the calls made. Everything else is the
    adapter's own, so the editor it is given to runs the edit unchanged."""

    def __init__(self, adapter: Any, check: Any):
        self._adapter, self._check, self.calls = adapter, check, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)

    def velocity(self, *args: Any, **kwargs: Any) -> Any:
        self._check(self.calls)
        self.calls += 1
        return self._adapter.velocity(*args, **kwargs)


def make_edit_fn(editor: FireFlowEditor, *, max_pixels: int | None, workdir: Path):
    """The request handlers ``(page, api)``: check the inputs, run one edit, return what the page shows.

    Both run the same edit. On bad input ``page`` returns the message in place of the result line and
    clears every result and the download (so nothing stale stays on screen); ``api`` raises
    ``gr.Error`` with the plain-text message, for API clients. Errors nobody expected are reported
    the same way, with their traceback on the server's stderr. An edit whose client has gone stops
    before its next model call.
    """
    import gradio as gr

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
        auto: bool = False,
    ) -> tuple:
        pil = source_image(image, max_pixels)
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
        blocks_app, event_id = _current_event()

        def stop_if_gone(calls: int) -> None:
            if client_gone(blocks_app, event_id):
                raise EditCancelled(f"an edit stopped after {calls} model calls: its client has gone")

        watched = copy.copy(editor)  # this edit's own: the shared editor is left as it is
        watched.adapter = _Watched(getattr(editor, "adapter", None), stop_if_gone)
        try:
            out = watched.edit(
                pil,
                source,
                target,
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
        path = save_result(out.image, workdir)
        return (
            out.source,
            out.image,
            gr.Image(value=out.reconstruction, visible=out.reconstruction is not None),
            result_line(out, target, mask is not None, paste),
            gr.DownloadButton(value=str(path), interactive=True),
            gr.Image(value=mask_overlay(out.source, out.mask) if auto else None, visible=bool(auto)),
        )

    def cleared(line: str) -> tuple:
        """No result, no download, ``line`` where the result line goes: nothing stale stays on screen."""
        return (
            None,
            None,
            gr.Image(value=None, visible=False),
            line,
            gr.DownloadButton(value=None, interactive=False),
            gr.Image(value=None, visible=False),
        )

    def edit(*inputs: Any) -> tuple:
        """``run``, or nothing once the client has gone (nobody is there to see it)."""
        try:
            return run(*inputs)
        except EditCancelled as e:
            print(f"fireflow serve: {e}", file=sys.stderr)
            return cleared("")

    def page(*inputs: Any) -> tuple:
        try:
            return edit(*inputs)
        except EditError as e:
            return cleared(error_html(str(e)))
        except Exception as e:  # noqa: BLE001 - the page must say something, and keep serving
            traceback.print_exc()
            return cleared(error_html(f"the edit failed on the server: {type(e).__name__}: {e}"))

    def api(*inputs: Any) -> tuple:
        try:
            return edit(*inputs)
        except EditError as e:  # plain text: an API client gets the message as written, no HTML entities
            raise gr.Error(str(e), title="Cannot edit", print_exception=False) from None

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

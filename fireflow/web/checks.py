"""Checking what the page sends before any work: the upload, the prompts, the flags, the knobs
(through fireflow.settings) and the mask (painted or uploaded). Every refusal is an :class:`EditError`:
one line, plain text, naming the page's own labels."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fireflow.settings import PAGE_MAX_STEPS

if TYPE_CHECKING:
    from fireflow.editor import FireFlowEditor
    from fireflow.settings import ResolvedSettings

#: Upper bound on steps per pass accepted from the page (the settings table's page limit).
MAX_STEPS = PAGE_MAX_STEPS


class Unreadable:
    """What the image input hands on for an upload it cannot read (the edit reports it)."""


class Refused(Unreadable):
    """What an image input hands on for an upload refused before decoding (the edit reports ``message``)."""

    def __init__(self, message: str):
        self.message = message


#: Most layers the mask painter may send, and its pixels in all (background, layers, composite)
#: in units of the server's ``max_pixels``. With the source and an uploaded mask (each at most
#: ``max_pixels``), one request decodes at most ``REQUEST_PIXELS`` x ``max_pixels`` pixels.
MAX_LAYERS = 4
PAINTER_PIXELS = 4
REQUEST_PIXELS = PAINTER_PIXELS + 2


def painter_refusal(images: list[Any], max_pixels: int | None) -> str | None:
    """Why the painter's images (paths or bytes: background, layers..., composite; None skipped)
    cannot be decoded, from their headers alone; None when they can."""
    from fireflow.image import header_size

    images = [i for i in images if i is not None]
    if len(images) > MAX_LAYERS + 2:
        return f"The painted mask has {len(images) - 2} layers; this server takes at most {MAX_LAYERS}."
    total = 0
    for image in images:
        try:
            size = header_size(image)
        except OSError:
            size = None
        if size is None:
            return "The painted mask is not an image this server can read; paint it again."
        w, h = size
        total += w * h
        if max_pixels is not None and w * h > max_pixels:
            return (
                f"The painted mask is {w}x{h} = {w * h} pixels, more than this server's limit of {max_pixels}; "
                "use a smaller image"
            )
    if max_pixels is not None and total > PAINTER_PIXELS * max_pixels:
        return (
            f"The painted mask is {total} pixels in all (background, layers, composite), more than this "
            f"server's limit of {PAINTER_PIXELS * max_pixels}; use fewer layers or a smaller image"
        )
    return None


NOT_AN_IMAGE = "The upload is not an image this server can read; use PNG, JPEG, WebP, GIF, BMP or TIFF."
UPLOAD_GONE = "The uploaded image is no longer on this server (it keeps only the latest uploads); upload it again."


class EditError(ValueError):
    """Bad input to the page's edit: one line, plain text, naming the page's own labels."""


def error_html(message: str) -> str:
    """The error line shown in the page in place of the result line (escaped: it may echo user text)."""
    return f'<div class="fireflow-error" role="alert">Cannot edit: {html.escape(message)}</div>'


def source_image(image: str | Unreadable | None, max_pixels: int | None) -> Any:
    """The uploaded source as a PIL image, or an :class:`EditError` saying what is wrong with the upload."""
    from fireflow.image import ImageError, ImageTooLarge, load_image

    if not image:
        raise EditError("Upload or paste an image first.")
    if isinstance(image, Unreadable):
        raise EditError(NOT_AN_IMAGE)
    if not Path(image).is_file():
        raise EditError(UPLOAD_GONE)
    try:
        return load_image(image, max_pixels, name="The image")  # sized from the header, then decoded
    except ImageTooLarge as e:
        raise EditError(f"{e}".replace("the limit of", "this server's limit of")) from None
    except ImageError:
        raise EditError(NOT_AN_IMAGE) from None


#: Longest prompt accepted, in characters (the text encoders read far fewer tokens than this).
MAX_PROMPT_CHARS = 2000
#: Longest value of a text knob (solver, strategy, blocks), in characters.
MAX_TEXT_CHARS = 200
#: Characters that show nothing: a prompt of only these is empty.
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e"


def check_text(value: Any, label: str, limit: int) -> str:
    """A text field's value as sent: a string of at most ``limit`` characters, no lone surrogates,
    or an :class:`EditError` naming the field."""
    if not isinstance(value, str):
        raise EditError(f"{label} must be text, got {type(value).__name__}.")
    if len(value) > limit:
        raise EditError(f"{label} is {len(value)} characters; this server takes at most {limit}.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise EditError(f"{label} contains an invalid character (a lone surrogate).") from None
    return value


def check_prompts(source: Any, target: Any) -> tuple[str, str]:
    """Both prompts, stripped, or an :class:`EditError` naming the empty, too long or non-text one."""
    out = []
    for value, label, what in (
        (source, "The source prompt", "describe what the image shows"),
        (target, "The target prompt", "describe what the edit should show"),
    ):
        if value is None or value == "":
            raise EditError(f"{label} is empty: {what}.")
        text = check_text(value, label, MAX_PROMPT_CHARS).strip()
        if not text.strip(_INVISIBLE + " \t\n\r\x00"):
            raise EditError(f"{label} is empty: {what}.")
        out.append(text)
    return out[0], out[1]


def check_flag(value: Any, label: str) -> bool:
    """A checkbox's value: True or False only (the text "false" is not true)."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise EditError(f"{label} must be true or false, got {type(value).__name__}.")
    return value


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
    from fireflow.image import ImageError, ImageTooLarge, load_image

    if isinstance(uploaded, Refused) or isinstance(painted, Refused):
        raise EditError((uploaded if isinstance(uploaded, Refused) else painted).message)
    if isinstance(uploaded, Unreadable):
        raise EditError("The mask upload cannot be used: it is not an image this server can read.")
    if uploaded:
        if not Path(uploaded).is_file():
            raise EditError(UPLOAD_GONE.replace("uploaded image", "uploaded mask"))
        try:
            return np.asarray(load_image(uploaded, max_pixels, name="The mask").convert("L")) >= 128
        except ImageTooLarge as e:
            raise EditError(
                f"The mask upload cannot be used: {e}".replace("the limit of", "this server's limit of")
            ) from None
        except ImageError:  # its message names the server's path
            raise EditError("The mask upload cannot be used: it is not an image this server can read.") from None
    layers = (painted or {}).get("layers") or [] if isinstance(painted, dict) else []
    strokes = [np.asarray(layer)[..., 3] > 0 for layer in layers if layer is not None and np.asarray(layer).ndim == 3]
    if not strokes or not np.logical_or.reduce(strokes).any():
        return None
    return np.logical_or.reduce(strokes)


def check_knobs(editor: FireFlowEditor, **values: Any) -> ResolvedSettings:
    """The page's knob values (by API name) as checked settings for ``editor``'s model, or an
    :class:`EditError` naming the page's label. fireflow.settings does the checking, against this
    model's blocks too, before anything is expanded or run; the page adds that no field may be left
    empty (an empty field is not "the default" here) and this server's bound on Steps."""
    from fireflow.settings import KNOBS, EditSettings, SettingError

    for name, value in values.items():
        label = KNOBS[name].label
        if value is None or (isinstance(value, str) and not value.strip() and name != "blocks"):
            raise EditError(f"{label} is empty: enter a value.")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
            raise EditError(f"{label} is out of range: a number with {len(hex(value)) * 6 // 5} or so digits.")
        if name in ("solver", "strategy", "blocks"):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name == "blocks":
                value = values[name] = str(value)
            check_text(value, label, MAX_TEXT_CHARS)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EditError(f"{label} must be a number, got {type(value).__name__}.")
    n = values["num_steps"]
    if isinstance(n, (int, float)) and not (math.isfinite(n) and n == int(n) and 1 <= n <= MAX_STEPS):
        shown = int(n) if math.isfinite(n) and n == int(n) and abs(n) < 1e15 else n  # 1e+300, not 301 digits
        label = KNOBS["num_steps"].label
        raise EditError(f"{label} must be a whole number between 1 and {MAX_STEPS} on this server, got {shown}.")
    settings = EditSettings.from_values(values, ignore_none=False)
    try:
        return editor.resolve(settings)
    except SettingError as e:
        raise EditError(e.worded("label")) from None

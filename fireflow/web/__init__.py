"""``fireflow serve``: a web page to edit images by hand, one knob at a time (Gradio).

The page is a thin front end over :meth:`fireflow.FireFlowEditor.edit`: every request makes its
own edit, and the editor keeps no per-edit state, so two users never see each other's features.
Gradio is imported only when the page is built, so the CLI works without it installed.

By job: :mod:`~fireflow.web.server` (the command's options, the port, signals, launch),
:mod:`~fireflow.web.uploads` (request and upload limits), :mod:`~fireflow.web.page` (the layout),
:mod:`~fireflow.web.handlers` (checking the inputs and running the edit) and
:mod:`~fireflow.web.results` (result files and the examples galleries).
"""

from fireflow.web.handlers import MAX_STEPS, EditError, check_knobs, describe, make_edit_fn, mask_background, page_mask
from fireflow.web.page import build_app
from fireflow.web.results import EXAMPLE_EDITS, SCENE_GALLERY, Example, default_examples, scene_examples
from fireflow.web.server import add_parser, check_port, cmd_serve, launch
from fireflow.web.uploads import RequestGuard, UploadLimits, prune_uploads

__all__ = [
    "EXAMPLE_EDITS",
    "MAX_STEPS",
    "SCENE_GALLERY",
    "EditError",
    "Example",
    "RequestGuard",
    "UploadLimits",
    "add_parser",
    "build_app",
    "check_knobs",
    "check_port",
    "cmd_serve",
    "default_examples",
    "describe",
    "launch",
    "make_edit_fn",
    "mask_background",
    "page_mask",
    "prune_uploads",
    "scene_examples",
]

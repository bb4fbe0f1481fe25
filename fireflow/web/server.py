"""``fireflow serve``: its options, the port check, signals and the launch of the page."""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fireflow.image import MAX_PIXELS
from fireflow.web.heap import HeapTrimmer
from fireflow.web.page import CSS, build_app
from fireflow.web.uploads import KEEP_UPLOADS, MAX_UPLOAD_MB, MB, UPLOAD_SPACE_MB, RequestGuard, UploadLimits

if TYPE_CHECKING:  # only for annotations: importing gradio costs seconds
    import gradio as gr

#: Seconds requests in flight get to finish when the server is stopped by a signal.
SHUTDOWN_GRACE_S = 1.0
#: Sessions whose state Gradio keeps (Gradio's default: 10000): any client may start one per request.
STATE_SESSIONS = 256


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
            with HeapTrimmer():  # big uploads and requests come and go: give their memory back
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
    """Serve ``app`` with settings that keep it local: no share link, no extra readable paths, bounded
    uploads, request bodies and session state."""
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
        state_session_capacity=STATE_SESSIONS,
        ssr_mode=False,  # no Node server
        mcp_server=False,
        pwa=False,
        show_error=True,  # unexpected errors show their message; the expected ones use gr.Error anyway
        theme=gr.themes.Default(),
        css=CSS,
        **kwargs,
    )

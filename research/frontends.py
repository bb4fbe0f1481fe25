"""The same demo edit through the Python API and through the CLI, timed in one run.

    python -m research.frontends --out runs/frontends

Each front end runs in a fresh interpreter, as a user would start it: the API with plain
``FireFlowEditor.from_pretrained("demo").edit(...)`` and no thread setting of its own, the CLI as
``fireflow edit``. The figure compared is the edit's own time (``FireFlowOutput.seconds``, which
the CLI prints), median over the repeats; model loading is reported apart. Prints a table and
writes ``OUT/frontends.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fireflow.bench import _io
from fireflow.bench._main import run_main

IMAGE = Path(__file__).resolve().parents[1] / "examples" / "red_heart.png"
SOURCE, TARGET = "red heart", "blue heart"

_API = """
import json, sys, time
t0 = time.perf_counter()
from fireflow import FireFlowEditor
editor = FireFlowEditor.from_pretrained("demo")
load = time.perf_counter() - t0
times = [editor.edit(sys.argv[1], sys.argv[2], sys.argv[3]).seconds for _ in range(int(sys.argv[4]))]
print(json.dumps({"load": load, "edits": times}))
"""


def run_api(image: Path, repeats: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _API, str(image), SOURCE, TARGET, str(repeats)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_cli(image: Path, repeats: int) -> dict:
    edits, walls = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-m", "fireflow", "edit", str(image), "-s", SOURCE, "-t", TARGET, "-q"]
                + ["-o", str(Path(tmp) / "out.png")],
                capture_output=True,
                text=True,
                check=True,
            )
            walls.append(time.perf_counter() - t0)
            edits.append(float(re.search(r"NFE, ([0-9.]+) s", out.stdout).group(1)))
    return {"walls": walls, "edits": edits}


def run(out: Path | None, repeats: int = 5, image: Path = IMAGE) -> dict:
    api, cli = run_api(image, repeats), run_cli(image, repeats)
    api_s, cli_s = statistics.median(api["edits"]), statistics.median(cli["edits"])
    result = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "repeats": repeats,
        "api_edit_s": api_s,
        "cli_edit_s": cli_s,
        "api_over_cli": api_s / cli_s,
        "api_load_s": api["load"],
        "cli_wall_s": statistics.median(cli["walls"]),
        "raw": {"api": api, "cli": cli},
    }
    print("| front end | edit, median s | other |")
    print("|---|---:|---|")
    print(f"| Python API | {api_s:.3f} | load {api['load']:.2f} s |")
    print(f"| CLI | {cli_s:.3f} | whole command {result['cli_wall_s']:.2f} s |")
    print(f"API / CLI edit time: {result['api_over_cli']:.2f}x ({repeats} edits each, demo model, 18 NFE)")
    if out is not None:
        _io.write_json(Path(out) / "frontends.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m research.frontends", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for frontends.json")
    parser.add_argument("--repeats", type=int, default=5, help="edits per front end (default 5)")
    parser.set_defaults(func=lambda a: run(a.out, a.repeats))
    return run_main(parser, argv)


if __name__ == "__main__":
    sys.exit(main())

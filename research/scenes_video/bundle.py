"""Bundle a scenes-video run's latest EMA export into the package, and refresh its model card.

    python -m research.scenes_video.bundle --run /work/runs/scenes_video

Copies ``RUN/weights`` (config, safetensors, ``fireflow_demo.json``) into
``fireflow/models/demo/scenes_video_weights/``; copies ``RUN/log.jsonl`` and ``RUN/probes.jsonl``
to ``research/scenes_video/runs/`` and plots ``training_curve.png`` there (the repository only,
not installed); rewrites the checkpoint block of the model card ``research/scenes_video/README.md``
(the step, the training time from ``log.jsonl``, the loss and the probes) and installs that card as
the weights folder's ``README.md``. Re-run it on the final checkpoint; it changes nothing else.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from fireflow._io import atomic_write

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PACKAGE = ROOT / "fireflow" / "models" / "demo" / "scenes_video_weights"
RUNS = HERE / "runs"
CARD = HERE / "README.md"
WEIGHT_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "fireflow_demo.json")
START, END = "<!-- bundle:start -->", "<!-- bundle:end -->"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_time(log: list[dict], step: int) -> tuple[float, int]:
    """Seconds of training up to ``step`` and the number of invocations: ``elapsed_s`` restarts
    at every resume, so each invocation's last time before ``step`` is summed."""
    total, segments, last = 0.0, 1, None
    for r in log:
        if r["step"] > step:
            break
        if last is not None and r["elapsed_s"] < last["elapsed_s"]:  # a resumed invocation
            total += last["elapsed_s"]
            segments += 1
        last = r
    return total + (last["elapsed_s"] if last else 0.0), segments


def checkpoint_step(run: Path, tries: int = 30) -> int:
    """The step of ``RUN/weights``: the last probe's, written just after each export (waits out
    an export in progress: the probe line follows the weights by a few seconds)."""
    for _ in range(tries):
        probes = _jsonl(run / "probes.jsonl")
        w = max((run / "weights" / f).stat().st_mtime for f in WEIGHT_FILES)
        if probes and (run / "probes.jsonl").stat().st_mtime >= w:
            return int(probes[-1]["step"])
        time.sleep(2)
    raise SystemExit(f"{run}: the weights are newer than the last probe; run again in a minute")


def plot(log: list[dict], probes: list[dict], out: Path) -> None:
    from fireflow.bench._io import pyplot

    plt = pyplot()
    if plt is None:
        raise SystemExit("the training curve needs matplotlib: pip install matplotlib")
    by_step = {r["step"]: r for r in log}
    steps = sorted(by_step)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.2))
    ax = axes[0]
    ax.plot(steps, [by_step[s]["loss"] for s in steps], lw=0.8)
    ax.plot([p["step"] for p in probes], [p["heldout_loss"] for p in probes], "o-", ms=3, label="held-out loss (EMA)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (training: mean of 10 batches)")
    ax.legend(fontsize=7)
    lr = ax.twinx()
    lr.plot(steps, [by_step[s]["lr"] for s in steps], color="gray", lw=0.8, ls="--")
    lr.set_ylabel("learning rate", color="gray")
    xs = [p["step"] for p in probes]
    ax2 = axes[1]
    for key, label in [
        ("gen_object", "object hit (per frame)"),
        ("gen_background", "background hit"),
        ("gen_same_object_all_frames", "same object in all frames"),
        ("gen_same_size_all_frames", "same size in all frames"),
    ]:
        ax2.plot(xs, [p[key] for p in probes], "o-", ms=3, label=label)
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_xlabel("step")
    ax2.set_title("4 generated clips (Euler 8)", fontsize=8)
    ax2.legend(fontsize=7)
    ax3 = axes[2]
    ax3.plot(xs, [p["gen_track_rms_px"] for p in probes], "o-", ms=3)
    ax3.set_xlabel("step")
    ax3.set_ylabel("detected track off a straight line (RMS px)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def card_block(run: Path, step: int, log: list[dict], probes: list[dict]) -> str:
    seconds, segments = training_time(log, step)
    at = {r["step"]: r for r in log}
    marks = [s for s in (10, 250, 1000, 2000, 3000, 4000, 5000, 6000) if s in at and s < step]
    marks += [step] if step in at else []
    losses = ", ".join(f"{at[s]['loss']:.3f} at {s:,}" for s in marks)
    last = probes[-1]
    lines = [
        f"**This checkpoint: step {step:,}** (the EMA export of `{run}`), after "
        f"{seconds / 60:.0f} minutes of training wall time in {segments} invocations "
        f"({seconds / max(step, 1):.2f} s a step on average) on the shared 2-core CPU, one thread. "
        f"The planned run is {log and _planned(run)} steps; re-bundle the final one with "
        "`python -m research.scenes_video.bundle --run RUN`.",
        "",
        f"Training loss (mean of 10 batches): {losses}. Held-out loss (EMA, 24 fixed clips): "
        f"{probes[0]['heldout_loss']:.4f} at step {probes[0]['step']:,}, {last['heldout_loss']:.4f} at {step:,}.",
        "",
        "`research/scenes_video/runs/log.jsonl` and `probes.jsonl` (in the repository, not installed) are "
        "the run's logs; `training_curve.png` there plots them. Probes (4 clips generated with Euler "
        "in 8 steps, frames scored by the scenes template matcher):",
        "",
        "| step | held-out loss | object hit | background hit | same object, all frames | track RMS px |",
        "|---|---|---|---|---|---|",
    ]
    for p in probes:
        if p["step"] % 1000 == 0 or p is last or p is probes[0]:
            lines.append(
                f"| {p['step']:,} | {p['heldout_loss']:.4f} | {p['gen_object']:.0%} | {p['gen_background']:.0%} "
                f"| {p['gen_same_object_all_frames']:.0%} | {p['gen_track_rms_px']:.2f} |"
            )
    return "\n".join(lines)


def _planned(run: Path) -> str:
    """The run's planned total steps, from its checkpoint's config ('?' if unreadable)."""
    try:
        import torch

        ck = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
        cfg = ck.get("config") or ck.get("cfg") or {}
        steps = cfg.get("steps") if isinstance(cfg, dict) else getattr(cfg, "steps", None)
        return f"{int(steps):,}" if steps else "?"
    except Exception:  # noqa: BLE001 - only a note in the card
        return "?"


def bundle(run: Path, package: Path = PACKAGE) -> int:
    step = checkpoint_step(run)
    package.mkdir(parents=True, exist_ok=True)
    for f in WEIGHT_FILES:
        data = (run / "weights" / f).read_bytes()
        atomic_write(package / f, lambda fh, data=data: fh.write(data))
    RUNS.mkdir(parents=True, exist_ok=True)
    for f in ("log.jsonl", "probes.jsonl"):
        shutil.copyfile(run / f, RUNS / f)
    log, probes = _jsonl(RUNS / "log.jsonl"), _jsonl(RUNS / "probes.jsonl")
    probes = [p for p in probes if p["step"] <= step]
    plot(log, probes, RUNS / "training_curve.png")
    card = CARD.read_text()
    head, rest = card.split(START, 1)
    _, tail = rest.split(END, 1)
    card = f"{head}{START}\n{card_block(run, step, log, probes)}\n{END}{tail}"
    atomic_write(CARD, lambda fh: fh.write(card.encode()))
    atomic_write(package / "README.md", lambda fh: fh.write(card.encode()))
    print(f"step {step}: {run / 'weights'} -> {package}; card, log, probes and curve refreshed")
    return step


def main() -> None:
    p = argparse.ArgumentParser(description="Copy a scenes-video run's latest weights into the package.")
    p.add_argument("--run", type=Path, default=Path("/work/runs/scenes_video"), help="the training run folder")
    p.add_argument("--package", type=Path, default=PACKAGE)
    args = p.parse_args()
    bundle(args.run, args.package)


if __name__ == "__main__":
    main()

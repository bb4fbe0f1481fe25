"""Every family's released transformer at full size: edit time, peak memory, what fits a smaller card.

    python -m fireflow.bench.families --models sd3.5-medium qwen-image --fit 22 14 --out DIR
    python -m fireflow.bench.families --list

Each model's transformer is built from its released ``config.json`` values with random weights,
straight on the device (speed and memory do not depend on the weights' values; nothing is
downloaded), and fed random conditioning of its pipeline's shapes (``fireflow.models.<family>.released``).
Per model, at the released pipeline's default size (1024 x 1024; Wan: 480 x 832, 81 frames):

* ``edit``: an 8-step FireFlow edit through ``FireFlowEditor.edit_latents`` with the family's
  defaults (its guidance, true CFG where the family has it), in bf16 with nothing offloaded:
  seconds, transformer calls (counted, not assumed), peak memory;
* ``fit``: for each ``--fit`` cap (22 GiB stands for a 24 GB card, 14 GiB for a 16 GB one), the first
  configuration of bf16, fp8 weight storage, fp8 weights with group offloading, and that with the
  stored features in host memory, whose edit runs under the cap, with its time. A configuration
  whose resident weights alone exceed the cap is recorded as not fitting without being run.

Records use the speed benchmark's JSON and table (``python -m fireflow.bench.speed --summarize``).
``--tiny`` runs the same code with each family's test-sized transformer on a CPU.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

from fireflow.bench import _speed_memory as memory
from fireflow.bench import speed
from fireflow.bench._speed_models import materialize
from fireflow.models import family_parts
from fireflow.models._released import Released

GIB = 2**30
NUM_STEPS = 8
#: Memory configurations tried under a cap, cheapest in time first; each is applied on top of the
#: previous one (in place), so one model build serves them all.
#: native: the compute dtype (bf16 on a GPU); cpu-features: the edit's stored attention features in
#: host memory (``feature_device="cpu"``), which at 81 frames are gigabytes per recorded call.
FIT_CONFIGS = ("native", "fp8", "fp8+group", "fp8+group+cpu-features")
#: diffusers' config names for a transformer's depth (blocks of each kind), which ``--layers`` sets
#: to build the released widths shallow: every shape the conditioning must match, at a CPU's cost.
DEPTH_KEYS = ("num_layers", "num_single_layers", "n_layers", "n_refiner_layers")


def released() -> dict[str, Released]:
    """Every family's released checkpoints, by name."""
    out: dict[str, Released] = {}
    for module in family_parts("released"):
        out.update(module.RELEASED)
    return out


class FamilyEdit:
    """One released model with random weights, its editor, and random inputs of its default size."""

    def __init__(
        self,
        model: Released,
        tiny: bool,
        device: torch.device,
        dtype: torch.dtype,
        sizes: dict[str, int | None] | None = None,
        layers: int | None = None,
    ):
        """``sizes``: ``height``, ``width``, ``num_frames`` or ``text_len`` instead of the released
        pipeline's (None: keep it), e.g. the full-size model at a toy size to check its shapes on a CPU."""
        import diffusers

        from fireflow.editor import FireFlowEditor

        self.device, self.dtype = device, dtype
        self.config = dict(model.tiny if tiny else model.config)
        if layers is not None:
            self.config |= {k: layers for k in DEPTH_KEYS if k in self.config}
        cls = getattr(diffusers, model.transformer)
        self.transformer = materialize(lambda: cls(**self.config), device, dtype)
        self.editor = FireFlowEditor(transformer=self.transformer)
        a = self.editor.adapter
        if tiny:  # the smallest size the family takes, a few frames for video
            height = width = 2 * a.multiple
            frames = 5 if model.num_frames else None
            text_len = 8
        else:
            height, width, frames, text_len = model.height, model.width, model.num_frames, model.text_len
        given = {k: v for k, v in (sizes or {}).items() if v is not None}
        height, width, text_len = (
            given.get("height", height),
            given.get("width", width),
            given.get("text_len", text_len),
        )
        frames = given.get("num_frames", frames) if model.num_frames else None
        self.height, self.width, self.num_frames, self.text_len = height, width, frames, text_len
        geometry = a.default_geometry(height, width, frames)
        g = torch.Generator(device).manual_seed(0)
        self.latents = torch.randn(1, *a.latent_shape(geometry), generator=g, device=device)
        self.source = model.embeds(self.config, 1, text_len, g, device, dtype)
        self.target = model.embeds(self.config, 1, text_len, g, device, dtype)
        self.calls = 0
        self.transformer.register_forward_pre_hook(self._count)
        self.feature_device: str | None = None
        self.last: torch.Tensor | None = None  # the latest edit's result

    def _count(self, module, args) -> None:
        self.calls += 1

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.transformer.parameters())

    def weights_gib(self, config: str) -> float:
        """Resident transformer weights under ``config`` (fp8: one byte per matrix entry; the
        layers diffusers keeps in the compute dtype are few and small)."""
        if "group" in config:
            return 0.0
        per = 1 if config == "fp8" else torch.finfo(self.dtype).bits // 8
        return self.params * per / GIB

    def edit(self) -> torch.Tensor:
        kwargs = {f"source_{k}": v for k, v in self.source.items()}
        kwargs |= {f"target_{k}": v for k, v in self.target.items()}
        self.last = self.editor.edit_latents(
            self.latents,
            self.height,
            self.width,
            num_frames=self.num_frames,
            num_steps=NUM_STEPS,
            feature_device=self.feature_device,
            **kwargs,
        )
        return self.last

    def apply(self, config: str) -> None:
        """Move to ``config`` from the one before it in :data:`FIT_CONFIGS`."""
        if config == "fp8":
            memory.apply_weights(self.transformer, "fp8", self.dtype)
        elif config == "fp8+group":
            memory.apply_offload(self.transformer, "group", self.device)
        elif config == "fp8+group+cpu-features":
            self.feature_device = "cpu"
        speed._free()


def _timed(fe: FamilyEdit, args: argparse.Namespace) -> dict:
    """The edit's median time and peak memory, its transformer calls counted over the same runs
    (no extra edit: at 81 frames on 14B one takes minutes), and whether its result is finite."""
    fe.calls = 0
    r = speed.measure(fe.edit, fe.device, args.warmup, args.repeats)
    calls = fe.calls // (args.warmup + args.repeats)
    finite = bool(torch.isfinite(fe.last).all())
    return {"s": r["s"], "runs": r["runs"], "peak_memory_gib": r["peak_gib"], "nfe": calls, "finite": finite}


def _error(e: BaseException) -> str:
    kind = "out of memory" if isinstance(e, torch.OutOfMemoryError) else type(e).__name__
    return f"{kind}: {str(e).splitlines()[0] if str(e) else ''}"


def run_model(
    name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, out: list[dict] | None = None
) -> list[dict]:
    """The edit of one released model, then what fits under each ``--fit`` cap; records are
    appended to ``out`` as they are made (a :class:`speed.Results` saves each at once, so a step
    stopped by its time limit keeps them)."""
    model = released()[name]
    common = {
        "model": name,
        "repo": model.repo,
        "card": speed._card(device),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tag": args.tag,
        "clock": "wall, CUDA-synchronised" if device.type == "cuda" else "process CPU time",
        **speed._versions(),
    }
    out = [] if out is None else out
    start = time.perf_counter()
    try:
        sizes = {k: getattr(args, k) for k in ("height", "width", "num_frames", "text_len")}
        fe = FamilyEdit(model, args.tiny, device, dtype, sizes, args.layers)
    except RuntimeError as e:  # its weights do not fit the card: a result too
        out.append({**common, "kind": "error", "error": f"building it: {_error(e)}"})
        return out
    common |= {
        "size": f"{fe.width}x{fe.height}" + (f"x{fe.num_frames}" if fe.num_frames else ""),
        "params_b": fe.params / 1e9,
        "latent_shape": list(fe.latents.shape),
        "text_len": fe.text_len,
        "build_s": time.perf_counter() - start,
        "note_shapes": model.note,
        "layers": args.layers,
    }
    try:
        out.append({**common, "kind": "edit", **_timed(fe, args)})
    except RuntimeError as e:  # out of memory is a RuntimeError too
        out.append({**common, "kind": "error", "error": _error(e)})
    speed._free()
    fit(fe, args, common, out)
    return out


def fit(fe: FamilyEdit, args: argparse.Namespace, common: dict, out: list[dict] | None = None) -> list[dict]:
    """Per cap, largest first: the first of :data:`FIT_CONFIGS` whose edit runs under it. The
    configurations only go forward (each is applied on top of the last), and a smaller cap starts
    from the one that fitted the larger."""
    out = [] if out is None else out
    applied = index = 0  # FIT_CONFIGS[0] is the model as built
    for cap in sorted(args.fit, reverse=True):
        rec = {**common, "memory_limit_gib": cap}
        while index < len(FIT_CONFIGS):
            config = FIT_CONFIGS[index]
            fields = {**rec, "fit": config, **_fit_fields(config)}
            if fe.weights_gib(config) > 0.95 * cap:
                out.append({**fields, "kind": "no fit", "error": f"weights alone {fe.weights_gib(config):.1f} GiB"})
                index += 1
                continue
            memory.limit_memory(fe.device, None)  # no cap while the weights change
            for later in FIT_CONFIGS[applied + 1 : index + 1]:
                fe.apply(later)
            applied = max(applied, index)
            memory.limit_memory(fe.device, cap)
            try:
                out.append({**fields, "kind": "fit", **_timed(fe, args)})
                break
            except RuntimeError as e:  # out of memory is a RuntimeError too
                out.append({**fields, "kind": "no fit", "error": _error(e)})
                speed._free()
                index += 1
        else:
            out.append({**rec, "kind": "no fit", "error": f"none of {', '.join(FIT_CONFIGS)} fits {cap:g} GiB"})
    memory.limit_memory(fe.device, None)
    return out


def _fit_fields(config: str) -> dict:
    """The speed table's configuration fields for a fit configuration."""
    fields = {"weights": "fp8" if "fp8" in config else "native", "offload": "group" if "group" in config else "none"}
    return fields | ({"feature_device": "cpu"} if "cpu-features" in config else {})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fireflow.bench.families", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", help="released model names (see --list); default: all")
    p.add_argument("--list", action="store_true", help="print the released models and exit")
    p.add_argument("--fit", type=float, nargs="*", default=[], metavar="GIB", help="memory caps to fit under")
    p.add_argument("--tiny", action="store_true", help="each family's test-sized transformer: the same code, on a CPU")
    p.add_argument("--height", type=int, help="instead of the released pipeline's default")
    p.add_argument("--width", type=int, help="instead of the released pipeline's default")
    p.add_argument("--num-frames", type=int, help="video models: instead of 81")
    p.add_argument("--text-len", type=int, help="text tokens per prompt instead of the pipeline's")
    p.add_argument("--layers", type=int, help="blocks of each kind instead of the released depth (a shape check)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="timed edits; the median is reported")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (CPU runs only)")
    p.add_argument("--tag", default="families", help="name of this run's JSON")
    p.add_argument("--out", type=Path, help="folder for speed-<tag>.json")
    args = p.parse_args(argv)
    known = released()
    for name in args.models or []:
        if name not in known:
            p.error(f"unknown model {name!r}; accepted: {', '.join(known)}")
    if any(cap <= 0 for cap in args.fit):
        p.error(f"--fit takes positive GiB, got {args.fit}")
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"--repeats takes 1 or more and --warmup 0 or more, got {args.repeats} and {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = released()
    if args.list:
        for name, m in models.items():
            frames = f", {m.num_frames} frames" if m.num_frames else ""
            print(f"{name:16s} {m.repo} ({m.transformer}, {m.width}x{m.height}{frames})")
        return 0
    device, dtype = speed.device_and_dtype(args)
    records = speed.Results(args)
    for name in args.models or list(models):
        run_model(name, args, device, dtype, records)
        speed._free()
    print(speed.table(records))
    path = records.save()
    if path is not None:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How fast an edit is, and how little memory it can take: ``python -m fireflow.bench.speed``.

Builds a FLUX.1-dev-sized transformer, VAE and text encoders with random weights straight on the
device (no download: speed does not depend on the weights' values) and times, per image size:

* ``edit``: an 8-step FireFlow edit through :meth:`FireFlowEditor.edit_latents`, latents to latents
  (inversion + denoising with feature reuse, 18 transformer calls);
* ``forward``: one bare transformer call with diffusers' own attention processors and the same
  inputs, so ``overhead_ratio = edit / (NFE x forward)`` is what the editor adds around the model;
* ``batched``: one inversion serving ``--targets`` edits in one batch, and its time per target;
* ``reference``: the reference implementation's loop (BFL-style, features in a dict keyed by
  strings; ``fireflow.bench._reference``) on the same transformer and inputs, so that a card
  without a published reference timing gets one from the same run (eager runs only);
* ``vae_encode`` / ``vae_decode`` at that size, and once the text encoders (T5 at 512 tokens and
  CLIP; tokenisation excluded: it runs on the CPU in well under a millisecond).

With ``--weights`` or ``--quantize``, a ``deviation`` record gives the relative error of one velocity
(the bare forward at the largest size) against the same weights before the option was applied.
``--parts precision`` (on its own) runs the edit in fp32, then with the same weights in the chosen
dtype, and reports the relative error of the final latents.

Each timing has warm-up runs, a device synchronisation around every run, and reports the median.
Memory options (``--offload``, ``--weights fp8``, ``--quantize``) and ``--memory-limit-gib`` (to
emulate a smaller card) show what fits where. ``--tiny`` runs the same code at toy size on a CPU.
Results: a table on stdout and ``speed-<tag>.json`` in ``--out``; ``--summarize DIR`` merges every
JSON in DIR into one table. ``scripts/gpu_bench.sh`` runs the whole set on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fireflow import solvers
from fireflow.bench import _speed_memory as memory
from fireflow.bench._speed_models import (
    FLUX_DEV,
    TINY,
    ModelSpec,
    build_text_encoders,
    build_transformer,
    build_vae,
)
from fireflow.models.base import Geometry

NUM_STEPS = 8
GIB = 2**30
#: e2e (image to image) and precision (fp32 against the chosen dtype) run on their own.
PARTS = ("edit", "forward", "batched", "reference", "vae", "text", "e2e", "precision")
DEFAULT_PARTS = PARTS[:-2]


# ---- timing ------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device) -> Callable[[], float]:
    """Wall time around a synchronised GPU; on a CPU the process's CPU time, which other jobs
    on a shared machine do not inflate (the CPU benchmark runs its math on one thread)."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    clock = _clock(device)
    _sync(device)
    start = clock()
    fn()
    _sync(device)
    return clock() - start


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    """Peak memory allocated on the GPU since the last reset (None on a CPU)."""
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def _reserved_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_reserved(device) / GIB if device.type == "cuda" else None


def measure(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> dict:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs, with its peak memory."""
    for _ in range(warmup):
        fn()
    _reset_peak(device)
    runs = [_time_once(fn, device) for _ in range(repeats)]
    return {"s": statistics.median(runs), "runs": runs, "peak_gib": _peak_gib(device)}


def measure_pair(
    edit: Callable[[], object],
    forward: Callable[[], object],
    device: torch.device,
    warmup: int,
    repeats: int,
    forwards_per_repeat: int,
) -> tuple[dict, dict]:
    """Time the edit and a block of bare forwards in alternation, so that drift (clocks, a busy
    CPU) touches both sides of ``overhead_ratio`` alike; a forward's time is its block's over the
    block's size, which also averages out the noise of single short calls."""
    for _ in range(warmup):
        forward()
        edit()

    def forwards() -> None:
        for _ in range(forwards_per_repeat):
            forward()

    fwd_runs: list[float] = []
    edit_runs: list[float] = []
    fwd_peak: list[float] = []
    edit_peak: list[float] = []
    for _ in range(repeats):
        _reset_peak(device)
        fwd_runs.append(_time_once(forwards, device) / forwards_per_repeat)
        fwd_peak.append(_peak_gib(device) or 0.0)
        _reset_peak(device)
        edit_runs.append(_time_once(edit, device))
        edit_peak.append(_peak_gib(device) or 0.0)
    cuda = device.type == "cuda"
    return (
        {"s": statistics.median(edit_runs), "runs": edit_runs, "peak_gib": max(edit_peak) if cuda else None},
        {"s": statistics.median(fwd_runs), "runs": fwd_runs, "peak_gib": max(fwd_peak) if cuda else None},
    )


# ---- the workloads -----------------------------------------------------------------------------
class Workload:
    """Random inputs of one image size and the calls that are timed on them."""

    def __init__(self, editor, spec: ModelSpec, size: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
        cfg = spec.transformer
        g = torch.Generator(device).manual_seed(seed)
        self.editor, self.spec, self.size, self.device, self.dtype = editor, spec, size, device, dtype
        self.tokens = spec.tokens(size)
        self.latents = torch.randn(1, self.tokens, cfg["in_channels"], generator=g, device=device)

        def embeds(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            txt = torch.randn(n, spec.text_len, cfg["joint_attention_dim"], generator=g, device=device)
            pooled = torch.randn(n, cfg["pooled_projection_dim"], generator=g, device=device)
            return txt.to(dtype), pooled.to(dtype)

        self.source, self.target = embeds(1), embeds(1)
        # The bare forward's inputs, built once as the adapter builds them once per pass.
        adapter = editor.adapter
        cond = adapter.conditioning(
            {"prompt_embeds": self.source[0], "pooled_prompt_embeds": self.source[1]}, Geometry(size, size), 2.0
        )
        self.forward_kwargs = dict(
            hidden_states=self.latents.to(dtype),
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_prompt_embeds,
            timestep=torch.full((1,), 0.5, device=device),
            img_ids=cond.img_ids,
            txt_ids=cond.txt_ids,
            guidance=torch.full((1,), 2.0, device=device) if cond.guidance is not None else None,
            return_dict=False,
        )

    def edit(self, targets: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        tgt = targets or self.target
        return self.editor.edit_latents(
            latents=self.latents,
            height=self.size,
            width=self.size,
            source_prompt_embeds=self.source[0],
            source_pooled_prompt_embeds=self.source[1],
            target_prompt_embeds=tgt[0],
            target_pooled_prompt_embeds=tgt[1],
            num_steps=NUM_STEPS,
            inject=1,
            guidance=2.0,
        )

    @torch.no_grad()
    def forward(self) -> torch.Tensor:
        return self.editor.transformer(**self.forward_kwargs)[0]

    def reference(self) -> torch.Tensor:
        """The same edit (8 steps, inject 1, guidance 2) by the reference implementation's loop."""
        from fireflow.bench._reference import reference_edit

        side = self.size // (2 * self.spec.vae_scale_factor)
        return reference_edit(
            self.editor.transformer,
            self.latents.to(self.dtype),
            self.source[0],
            self.source[1],
            self.target[0],
            self.target[1],
            side,
            side,
            NUM_STEPS,
            inject=1,
            guidance=2.0,
        )

    def batched_targets(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.target[0].expand(n, -1, -1).contiguous(), self.target[1].expand(n, -1).contiguous()


def _card(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:  # Linux: platform.processor() is often empty
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU: {name}, {torch.get_num_threads()} threads"


def _versions() -> dict:
    import diffusers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def _free() -> None:
    """Return memory that dropped objects held (call after ``del``-ing the last reference)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _configure_compile() -> None:
    """Static shapes per image size (fastest kernels) and room for every size and batch."""
    import torch._dynamo as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, 64)
    dynamo.config.automatic_dynamic_shapes = False


def time_text(spec: ModelSpec, device: torch.device, dtype: torch.dtype, warmup: int, repeats: int) -> dict:
    """CLIP (77 tokens) then T5 on one prompt; the encoders are freed before the transformer is built."""
    r = _time_text(spec, device, dtype, warmup, repeats)
    _free()  # the encoders went out of scope with _time_text
    return r


def _time_text(spec: ModelSpec, device: torch.device, dtype: torch.dtype, warmup: int, repeats: int) -> dict:
    """CLIP (77 tokens) then T5 (``text_len`` tokens) on one prompt: what ``encode_prompt`` runs."""
    clip, t5 = build_text_encoders(spec, device, dtype)
    g = torch.Generator(device).manual_seed(0)
    clip_ids = torch.randint(
        0, spec.clip["vocab_size"], (1, spec.clip["max_position_embeddings"]), generator=g, device=device
    )
    t5_ids = torch.randint(0, spec.t5["vocab_size"], (1, spec.text_len), generator=g, device=device)

    @torch.no_grad()
    def encode() -> None:
        clip(clip_ids, output_hidden_states=False)
        t5(t5_ids, output_hidden_states=False)

    return measure(encode, device, warmup, repeats)


class Results(list):
    """The records of one run; with ``--out`` written after every measurement, so that a run
    stopped by a time limit keeps what it measured."""

    def __init__(self, args: argparse.Namespace):
        super().__init__()
        self.args = args

    def add(self, records: list[dict]) -> None:
        self.extend(records)
        self.save()

    def append(self, record: dict) -> None:
        super().append(record)
        self.save()

    def save(self) -> Path | None:
        if self.args.out is None:
            return None
        self.args.out.mkdir(parents=True, exist_ok=True)
        path = self.args.out / f"speed-{self.args.tag}.json"
        path.write_text(json.dumps({"args": vars(self.args), "records": list(self)}, indent=1, default=str))
        return path


def _prepare_weights(transformer: torch.nn.Module, args: argparse.Namespace, dtype: torch.dtype) -> dict | None:
    """Apply ``--weights`` and ``--quantize``; a record saying why not when the option cannot run."""
    try:
        memory.apply_weights(transformer, args.weights, dtype)
        memory.apply_quantization(transformer, args.quantize)
    except memory.Unavailable as e:
        print(f"skipped: {e}", file=sys.stderr)
        return {"kind": "skipped", "error": str(e)}
    except Exception as e:  # e.g. a torchao built for another torch: report it, do not crash the run
        print(f"failed: {type(e).__name__}: {e}", file=sys.stderr)
        return {"kind": "error", "error": f"{args.weights}/{args.quantize}: {type(e).__name__}: {e}"}
    return None


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """``--device`` (default: cuda when available) and ``--dtype`` (default: bf16 on a GPU, fp32 on a
    CPU); a CPU benchmark runs on ``--threads`` threads (this is the benchmark's own process)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("fp32" if device.type == "cpu" else "bf16")
    ]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    return device, dtype


def run(args: argparse.Namespace) -> Results:
    """Every measurement one invocation asks for, as flat JSON records."""
    spec = TINY if args.tiny else FLUX_DEV
    device, dtype = device_and_dtype(args)
    if args.forwards is None:
        # A GPU's timings are steady; a shared CPU's are not, and a block as long as an edit evens them out.
        args.forwards = 3 if device.type == "cuda" else 2 * solvers.nfe("fireflow", NUM_STEPS)
    parts = set(args.parts)
    sizes = args.sizes or list(spec.sizes)
    common = {
        "model": spec.name,
        "card": _card(device),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "compile": bool(args.compile),
        "offload": args.offload,
        "weights": args.weights,
        "quantize": args.quantize,
        "memory_limit_gib": args.memory_limit_gib,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tag": args.tag,
        "clock": "wall, CUDA-synchronised" if device.type == "cuda" else "process CPU time",
        **_versions(),
    }
    records = Results(args)
    if "e2e" in parts:
        records.add(run_e2e(args, spec, device, dtype, sizes, common))
        return records
    if "precision" in parts:
        records.add(run_precision(args, spec, device, dtype, sizes, common))
        return records
    if "text" in parts:
        text = time_text(spec, device, dtype, args.warmup, args.repeats)
        records.add([{**common, "kind": "text_encode", "s": text["s"], "peak_memory_gib": text["peak_gib"]}])

    from fireflow.editor import FireFlowEditor

    build_start = time.perf_counter()
    transformer = build_transformer(spec, device, dtype)
    vae = build_vae(spec, device, dtype) if "vae" in parts else None
    editor = FireFlowEditor(transformer=transformer)
    changed = args.weights != "native" or args.quantize != "none"
    before = Workload(editor, spec, sizes[-1], device, dtype).forward().float() if changed else None
    failed = _prepare_weights(transformer, args, dtype)
    if failed is not None:
        records.add([{**common, **failed}])
        return records
    if before is not None:
        after = Workload(editor, spec, sizes[-1], device, dtype).forward().float()
        err = float((after - before).norm() / before.norm())
        records.add([{**common, "kind": "deviation", "size": sizes[-1], "velocity_rel_err": err}])
        del before, after
    memory.apply_offload(transformer, args.offload, device)
    if args.compile:
        _configure_compile()
    backends = args.attention_backend or [None]
    if args.compile or (len(backends) == 1 and backends[0] is not None):
        editor.adapter.optimize(compile=args.compile, attention_backend=backends[0], **_compile_kwargs(args))
    build_s = time.perf_counter() - build_start
    _free()
    fraction = memory.limit_memory(device, args.memory_limit_gib)
    weights_gib = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None
    common = {**common, "build_s": build_s, "resident_weights_gib": weights_gib, "memory_fraction": fraction}

    for backend in backends if not args.compile else backends[:1]:
        if len(backends) > 1:
            try:
                editor.adapter.optimize(attention_backend=backend)
            except (ImportError, RuntimeError, ValueError) as e:  # a backend this machine lacks
                records.add([{**common, "attention": backend, "kind": "skipped", "error": str(e)}])
                continue
        for size in sizes:
            records.add(
                _run_size(editor, vae, spec, size, device, dtype, parts, args, {**common, "attention": backend})
            )
    return records


def run_e2e(args, spec: ModelSpec, device: torch.device, dtype: torch.dtype, sizes, common: dict) -> list[dict]:
    """``FireFlowEditor.edit`` on a whole random-weight pipeline: image and prompts in, image out."""
    from fireflow.bench import _speed_pipeline as pipeline
    from fireflow.editor import FireFlowEditor

    build_start = time.perf_counter()
    pipe = pipeline.build_pipeline(spec, device, dtype)
    failed = _prepare_weights(pipe.transformer, args, dtype)
    if failed is not None:
        return [{**common, **failed}]
    pipeline.offload_pipeline(pipe, args.offload, device)
    editor = FireFlowEditor.from_pipe(pipe)
    if args.compile:
        _configure_compile()
    backend = (args.attention_backend or [None])[0]
    editor.adapter.optimize(compile=args.compile, attention_backend=backend, **_compile_kwargs(args))
    _free()
    fraction = memory.limit_memory(device, args.memory_limit_gib)
    base = {**common, "build_s": time.perf_counter() - build_start, "memory_fraction": fraction, "attention": backend}
    out = []
    for size in sizes:
        image, source, target = pipeline.edit_inputs(size)
        rec = {**base, "kind": "e2e_edit", "size": size, "tokens": spec.tokens(size)}
        try:
            r = measure(lambda a=(image, source, target): editor.edit(*a), device, args.warmup, args.repeats)
            nfe = 2 * solvers.nfe("fireflow", NUM_STEPS)  # the editor's default steps
            out.append({**rec, "s": r["s"], "runs": r["runs"], "nfe": nfe, "peak_memory_gib": r["peak_gib"]})
        except RuntimeError as e:  # out of memory (a RuntimeError too), or a kernel this card lacks
            kind = "out of memory" if isinstance(e, torch.OutOfMemoryError) else type(e).__name__
            out.append({**rec, "error": f"{kind}: {str(e).splitlines()[0]}"})
            _free()
    return out


def run_precision(args, spec: ModelSpec, device: torch.device, dtype: torch.dtype, sizes, common: dict) -> list[dict]:
    """The edit in fp32, then with the same weights cast to ``dtype``: the relative error of the
    final latents, and the time of each (random weights: trained ones may differ)."""
    from fireflow.editor import FireFlowEditor

    transformer = build_transformer(spec, device, torch.float32)
    editor = FireFlowEditor(transformer=transformer)
    base = {**common, "kind": "precision", "dtype": str(dtype).removeprefix("torch."), "reference_dtype": "float32"}
    out = []
    for size in sizes:
        rec = {**base, "size": size, "tokens": spec.tokens(size)}
        try:
            results = {}
            timings = {}
            for d in (torch.float32, dtype):  # fp32 first: the cast to the lower precision is one way
                transformer.to(d)
                w = Workload(editor, spec, size, device, d)
                timings[d] = measure(
                    lambda w=w, d=d, r=results: r.__setitem__(d, w.edit()), device, args.warmup, args.repeats
                )
            ref, got = results[torch.float32].float(), results[dtype].float()
            err = float((got - ref).norm() / ref.norm())
            tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
            rec |= {"s": timings[dtype]["s"], "fp32_s": timings[torch.float32]["s"], "latents_rel_err": err}
            out.append({**rec, "nfe": 2 * solvers.nfe("fireflow", NUM_STEPS), "tf32": tf32})
        except RuntimeError as e:  # out of memory (a RuntimeError too)
            out.append({**rec, "kind": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"})
        _free()
    return out


def _compile_kwargs(args: argparse.Namespace) -> dict:
    kwargs: dict = {"backend": args.compile_backend}
    if args.compile_mode:
        kwargs["mode"] = args.compile_mode
    return kwargs


def _run_size(editor, vae, spec, size, device, dtype, parts, args, common) -> list[dict]:
    """Edit, forward, batched edit and VAE at one size; an out-of-memory error is a result too."""
    out: list[dict] = []
    base = {**common, "size": size, "tokens": spec.tokens(size)}
    nfe = 2 * solvers.nfe("fireflow", NUM_STEPS)
    try:
        w = Workload(editor, spec, size, device, dtype)
        if "edit" in parts and "forward" in parts:
            edit, fwd = measure_pair(w.edit, w.forward, device, args.warmup, args.repeats, args.forwards)
            # Each edit against the forward block timed just before it: a busy CPU's load drifts
            # over seconds, and pairing cancels it. On a GPU this equals the ratio of the medians.
            ratio = statistics.median(e / (nfe * f) for e, f in zip(edit["runs"], fwd["runs"]))
            finite = bool(torch.isfinite(w.edit()).all())
            out.append(
                {
                    **base,
                    "kind": "edit",
                    "s": edit["s"],
                    "runs": edit["runs"],
                    "nfe": nfe,
                    "forward_s": fwd["s"],
                    "forward_runs": fwd["runs"],
                    "overhead_ratio": ratio,
                    "peak_memory_gib": edit["peak_gib"],
                    "forward_peak_memory_gib": fwd["peak_gib"],
                    "finite": finite,
                }
            )
        elif "edit" in parts:
            r = measure(w.edit, device, args.warmup, args.repeats)
            out.append(
                {**base, "kind": "edit", "s": r["s"], "runs": r["runs"], "nfe": nfe, "peak_memory_gib": r["peak_gib"]}
            )
        elif "forward" in parts:
            r = measure(w.forward, device, args.warmup, args.repeats * args.forwards)
            out.append({**base, "kind": "forward", "s": r["s"], "peak_memory_gib": r["peak_gib"]})
        if "batched" in parts and args.targets > 1:
            targets = w.batched_targets(args.targets)
            r = measure(lambda: w.edit(targets), device, args.warmup, args.repeats)
            out.append(
                {
                    **base,
                    "kind": "batched_edit",
                    "targets": args.targets,
                    "s": r["s"],
                    "per_target_s": r["s"] / args.targets,
                    "transformer_calls": nfe,
                    "peak_memory_gib": r["peak_gib"],
                }
            )
        if "reference" in parts and not args.compile:  # the reference loop swaps processors: eager only
            kept: dict = {}  # the last timed run's result: no extra edit to check it
            r = measure(lambda: kept.__setitem__("x", w.reference()), device, args.warmup, args.repeats)
            latents = kept["x"]
            ref = {**base, "kind": "reference", "s": r["s"], "runs": r["runs"], "nfe": nfe}
            ref |= {"peak_memory_gib": r["peak_gib"], "finite": bool(torch.isfinite(latents).all())}
            for rec in out:
                if rec["kind"] == "edit":
                    # Both sides compute the same edit: their distance says the timing compares like with like.
                    ours = w.edit().float()
                    rec["vs_reference"] = rec["s"] / r["s"]
                    ref["rel_diff_to_edit"] = float((ours - latents.float()).norm() / latents.float().norm())
            out.append(ref)
        if vae is not None:
            out += _time_vae(vae, spec, size, device, dtype, args, base)
    except torch.OutOfMemoryError as e:
        out.append({**base, "kind": "error", "error": f"out of memory: {str(e).splitlines()[0]}"})
        _free()
    except RuntimeError as e:  # e.g. an attention kernel this card or shape does not support
        out.append({**base, "kind": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"})
        _free()
    return out


@torch.no_grad()
def _time_vae(vae, spec, size, device, dtype, args, base) -> list[dict]:
    g = torch.Generator(device).manual_seed(0)
    pixels = torch.rand(1, 3, size, size, generator=g, device=device).mul(2).sub(1).to(dtype)
    f = spec.vae_scale_factor
    z = torch.randn(1, spec.vae["latent_channels"], size // f, size // f, generator=g, device=device, dtype=dtype)
    enc = measure(lambda: vae.encode(pixels).latent_dist.mean, device, args.warmup, args.repeats)
    dec = measure(lambda: vae.decode(z).sample, device, args.warmup, args.repeats)
    return [
        {**base, "kind": "vae_encode", "s": enc["s"], "peak_memory_gib": enc["peak_gib"]},
        {**base, "kind": "vae_decode", "s": dec["s"], "peak_memory_gib": dec["peak_gib"]},
    ]


# ---- output ------------------------------------------------------------------------------------
def _fmt(x, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}{unit}"
    return f"{x}{unit}"


def _config(r: dict) -> str:
    bits = [r.get("dtype", "-")]
    if r.get("weights") == "fp8":
        bits.append("fp8-weights")
    if r.get("quantize") not in (None, "none"):
        bits.append(r["quantize"])
    if r.get("offload") not in (None, "none"):
        bits.append(f"offload={r['offload']}")
    if r.get("feature_device") == "cpu":
        bits.append("features=cpu")
    if r.get("compile"):
        bits.append("compiled")
    if r.get("attention"):
        bits.append(f"attn={r['attention']}")
    if r.get("memory_limit_gib"):
        bits.append(f"cap={r['memory_limit_gib']:g}GiB")
    return " ".join(bits)


#: Figures a record may carry that the table shows in its note column.
NOTES = {
    "velocity_rel_err": "velocity rel. error",
    "latents_rel_err": "latents rel. error vs fp32",
    "rel_diff_to_edit": "rel. difference to fireflow's edit",
}


def table(records: list[dict]) -> str:
    """A markdown table of the records: one row per measurement."""
    head = (
        "| model | config | what | size | s | NFE | forward s | overhead | vs ref. | per target s | peak GiB | note |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        note = r.get("error") or ("" if r.get("finite", True) else "non-finite output")
        for key, label in NOTES.items():
            if r.get(key) is not None:
                note = f"{label} {r[key]:.2e}" + (f"; {note}" if note else "")
        rows.append(
            "| "
            + " | ".join(
                [
                    r.get("model", "-"),
                    _config(r),
                    r.get("kind", "-"),
                    _fmt(r.get("size")),
                    _fmt(r.get("s"), digits=4),
                    _fmt(r.get("nfe")),
                    _fmt(r.get("forward_s"), digits=4),
                    _fmt(r.get("overhead_ratio")),
                    _fmt(r.get("vs_reference")),
                    _fmt(r.get("per_target_s"), digits=4),
                    _fmt(r.get("peak_memory_gib"), digits=2),
                    note,
                ]
            )
            + " |"
        )
    return "\n".join(rows)


def summarize(folder: Path) -> tuple[list[dict], str]:
    """Every record of every ``speed-*.json`` in ``folder``, and their table with the cards and versions."""
    records: list[dict] = []
    for path in sorted(folder.glob("speed-*.json"), key=lambda p: p.stat().st_mtime):  # in the order run
        records += json.loads(path.read_text())["records"]
    seen = sorted({(r.get("card"), r.get("torch"), r.get("diffusers"), r.get("date", "")[:10]) for r in records})
    lines = [f"- {c}, torch {t}, diffusers {d}, {day}" for c, t, d, day in seen]
    checks = "\n".join(f"- {line}" for line in bars(records))
    return records, "\n".join(lines) + "\n\n" + table(records) + "\n\n## Bars\n\n" + checks + "\n"


#: The GPU issue's bars for the FLUX.1-dev edit at its largest size: (what, limit).
BARS = {
    "vs_reference": ("fastest edit / the reference implementation's, same card", 0.70),
    "eager_overhead": ("eager overhead_ratio (edit / 18 eager forwards)", 1.05),
    "compiled_overhead": ("compiled overhead_ratio (edit / 18 compiled forwards)", 1.10),
}
#: The reference implementation's published 1024² edit on an H200 (bf16), for cards of that name.
H200_REFERENCE_S = 3.74


def bars(records: list[dict]) -> list[str]:
    """Each bar of the GPU issue as one line: the measured figure and reached / NOT reached, or not
    measured. Plain configurations only (no cap, offload, quantization or other attention backend)."""
    model = FLUX_DEV.name if any(r.get("model") == FLUX_DEV.name for r in records) else TINY.name
    plain = [
        r
        for r in records
        if r.get("model") == model
        and "error" not in r
        and not r.get("memory_limit_gib")
        and r.get("offload") in (None, "none")
        and r.get("weights") in (None, "native")
        and r.get("quantize") in (None, "none")
        and r.get("attention") is None
        and isinstance(r.get("size"), int)
    ]
    sizes = [r["size"] for r in plain if r["kind"] == "edit"]
    if not sizes:
        return [f"{name}: not measured" for name, _ in BARS.values()]
    size = max(sizes)

    def one(kind: str, compiled: bool) -> dict | None:
        found = [r for r in plain if r["kind"] == kind and r["size"] == size and bool(r.get("compile")) == compiled]
        return found[-1] if found else None

    eager, compiled, reference = one("edit", False), one("edit", True), one("reference", False)
    lines = []

    def verdict(key: str, value: float | None, detail: str = "") -> None:
        name, limit = BARS[key]
        if value is None:
            lines.append(f"{name} at {size}²: not measured")
            return
        mark = "reached" if value <= limit else "NOT reached"
        lines.append(f"{name} at {size}²: {value:.3f} (bar <= {limit:.2f}): {mark}{detail}")

    edits = [r for r in (eager, compiled) if r is not None]
    fastest = min(edits, key=lambda r: r["s"])
    ratio = fastest["s"] / reference["s"] if reference else None
    how = "compiled" if fastest.get("compile") else "eager"
    detail = f"; {how} edit {fastest['s']:.3f} s" + (f", reference {reference['s']:.3f} s" if reference else "")
    if "H200" in str(fastest.get("card")) and size == 1024:
        detail += f", {fastest['s'] / H200_REFERENCE_S:.3f} of the published H200 figure ({H200_REFERENCE_S} s)"
    verdict("vs_reference", ratio, detail)
    verdict("eager_overhead", eager.get("overhead_ratio") if eager else None)
    verdict("compiled_overhead", compiled.get("overhead_ratio") if compiled else None)
    for cap in (22, 14):
        fits = [
            r
            for r in records
            if r.get("memory_limit_gib") == cap
            and r.get("model") == model
            and r.get("kind") in ("edit", "e2e_edit")
            and r.get("size") == size
            and "error" not in r
        ]
        if fits:
            best = min(fits, key=lambda r: r["s"])
            lines.append(
                f"{size}² edit within {cap} GiB: fits, fastest as {_config(best)} ({best['kind']}): {best['s']:.3f} s"
            )
        else:
            lines.append(f"{size}² edit within {cap} GiB: no configuration measured to fit")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fireflow.bench.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", help="image sides (default 512 1024; --tiny: 128 256)")
    p.add_argument("--tiny", action="store_true", help="a toy-sized model: the same code path, on a CPU")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the repeated blocks")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--compile-mode", help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument(
        "--attention-backend", nargs="+", help="diffusers attention backend(s), each timed in turn (native, ...)"
    )
    p.add_argument("--offload", choices=memory.OFFLOADS, default="none", help="transformer weights in CPU memory")
    p.add_argument("--weights", choices=memory.WEIGHTS, default="native", help="fp8: float8 storage, upcast per layer")
    p.add_argument("--quantize", choices=memory.QUANTIZE, default="none")
    p.add_argument("--memory-limit-gib", type=float, help="cap GPU memory to emulate a smaller card")
    p.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(DEFAULT_PARTS), help="what to time (e2e: a whole pipeline)"
    )
    p.add_argument("--targets", type=int, default=4, help="targets of the batched edit (invert once, edit many)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed runs (edits); the median is reported")
    p.add_argument(
        "--forwards", type=int, help="bare forwards timed as one block per edit run (default: 3 on a GPU, 18 on a CPU)"
    )
    p.add_argument("--threads", type=int, default=1, help="CPU threads (CPU runs only)")
    p.add_argument("--tag", help="name of this run's JSON (default: from the options)")
    p.add_argument("--out", type=Path, help="folder for speed-<tag>.json (and speed.md with --summarize)")
    p.add_argument("--summarize", type=Path, metavar="DIR", help="merge DIR/speed-*.json into one table")
    args = p.parse_args(argv)
    if args.tag is None:
        args.tag = "-".join(
            b
            for b in (
                "tiny" if args.tiny else "flux",
                "fp8" if args.weights == "fp8" else "",
                args.quantize if args.quantize != "none" else "",
                f"offload_{args.offload}" if args.offload != "none" else "",
                "compiled" if args.compile else "eager",
                "_".join(args.attention_backend or []),
                f"cap{args.memory_limit_gib:g}" if args.memory_limit_gib else "",
            )
            if b
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize is not None:
        records, text = summarize(args.summarize)
        out = args.out or args.summarize
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.json").write_text(json.dumps({"records": records}, indent=1))
        (out / "speed.md").write_text(text)
        print(text)
        return 0
    records = run(args)
    print(table(records))
    path = records.save()
    if path is not None:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

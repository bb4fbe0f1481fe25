"""The edit knobs, declared and validated once.

:data:`KNOBS` is the single table the API, the CLI flags, the web page's controls and the
benchmarks' settings are derived from. :class:`EditSettings` holds one edit's values;
:meth:`EditSettings.check` validates everything that needs no model (before a model loads), and
:meth:`EditSettings.resolve` fills the model family's defaults and checks block specs against the
model's block counts. A bad value raises :class:`SettingError`, whose message can be worded for
the caller: the API name (``num_steps``), the CLI flag (``--steps``) or the page label (``Steps``).

Block specs: ``default`` (the family's choice), ``none``, or comma-separated items
``[kind:]SELECTION`` with SELECTION ``all``, ``N``, ``A-B`` or ``A..B`` (inclusive); the kind
defaults to the family's main kind (FLUX: ``single``, SD3: ``joint``). ``single:all,double:0-3``
selects all single-stream and the first four double-stream blocks of FLUX.1. Specs are parsed
with bounds before anything is expanded: reversed, empty and out-of-range items are errors.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fireflow import solvers
from fireflow.features import STRATEGIES, BlockId, parse_strategy

#: Largest step count accepted (a 1000-step pass is already far past any use of the method).
MAX_STEPS = 1000
#: Largest step count a shared server accepts from its page, so one request cannot hold the queue
#: for hours (the web page's limit, kept in this table with the others).
PAGE_MAX_STEPS = 100
#: Guidance values accepted, distilled or CFG: well past any published setting.
GUIDANCE_RANGE = (0.0, 100.0)
RATIO_RANGE = (0.0, 10.0)
#: Dilation of automatic masks accepted, in latent cells.
MAX_MASK_DILATION = 64


class SettingError(ValueError):
    """A bad knob value. ``str()`` names the API argument; :meth:`worded` names a flag or label."""

    def __init__(self, knob: str, detail: str):
        self.knob, self.detail = knob, detail
        super().__init__(self.worded("name"))

    def worded(self, style: str = "name") -> str:
        """The message with the knob named as ``style`` says: "name", "flag" or "label"."""
        k = KNOBS.get(self.knob)
        who = getattr(k, style) if k is not None else self.knob
        return self.detail.replace("{name}", who)


@dataclass(frozen=True)
class Knob:
    """One edit setting: its API name, CLI flag, page label, default and help text."""

    name: str
    flag: str
    label: str
    default: Any  # None: the model family decides (its ``defaults``)
    help: str
    choices: tuple[str, ...] | None = None


KNOBS: dict[str, Knob] = {
    k.name: k
    for k in (
        Knob("num_steps", "--steps", "Steps", 8, f"steps per pass, 1..{MAX_STEPS} (default 8: 18 model calls an edit)"),
        Knob(
            "inject",
            "--inject",
            "Injected steps",
            None,
            "denoising steps that reuse inversion features (default: the model's, 1)",
        ),
        Knob("guidance", "--guidance", "Guidance", None, "guidance while editing (default: the family's, FLUX.1 2)"),
        Knob(
            "inversion_guidance",
            "--inversion-guidance",
            "Inversion guidance",
            None,
            "guidance while inverting (default: the family's unguided value, 1; Z-Image 0)",
        ),
        Knob(
            "solver",
            "--solver",
            "Solver",
            "fireflow",
            "fireflow (N+1 calls), midpoint (2N), euler (N)",
            tuple(solvers.SOLVERS),
        ),
        Knob("strategy", "--strategy", "Strategy", "replace_v", f"space-separated mix of {', '.join(STRATEGIES)}"),
        Knob(
            "blocks",
            "--blocks",
            "Blocks",
            "default",
            "blocks to reuse features in: default, none, all, 0-37, single:all,double:0-3 (kind:range)",
        ),
        Knob("ratios", "--ratios", "Q,K,V ratios", (1.0, 1.0, 1.0), "scale of stored Q,K,V, each 0..10 (1,1,1)"),
        Knob(
            "feature_device",
            "--feature-device",
            "Feature device",
            None,
            "where stored features live: cpu, cuda, cuda:N (default: the model's device)",
        ),
        Knob(
            "mask_threshold",
            "--mask-threshold",
            "Auto-mask threshold",
            0.2,
            "mask=auto: cells whose velocity difference reaches this share of its top are edited, 0..1 (0.2)",
        ),
        Knob("mask_dilation", "--mask-dilation", "Auto-mask dilation", 1, "mask=auto: grow it by this many cells (1)"),
    )
}

_ITEM = re.compile(r"^(?:(?P<kind>[a-z][a-z0-9_]*):)?(?P<sel>all|\d+|\d+(?:-|\.\.)\d+)$")


@dataclass(frozen=True)
class BlockSpec:
    """A parsed block spec: ``None`` for the family default, else ``(kind or None, lo, hi)``
    items with ``hi = None`` for "all". Nothing is expanded until :meth:`expand`."""

    items: tuple[tuple[str | None, int, int | None], ...] | None

    @classmethod
    def parse(cls, spec: Any) -> BlockSpec:
        if isinstance(spec, BlockSpec):
            return spec
        if spec is None:
            return cls(None)
        if not isinstance(spec, str):  # an iterable of indices of the main kind, or of block ids
            try:
                items = tuple(_item_of(b) for b in spec)
            except (TypeError, ValueError):
                raise SettingError("blocks", f"{{name}} {spec!r} is not a block spec; {_ACCEPTED}") from None
            return cls(items)
        text = spec.strip().lower().replace(" ", "")
        if text == "default":
            return cls(None)
        if text in ("", "none"):
            if text == "":
                raise SettingError("blocks", f"{{name}} is empty; {_ACCEPTED}")
            return cls(())
        out = []
        for part in text.split(","):
            m = _ITEM.match(part)
            if m is None:
                raise SettingError("blocks", f"{{name}} {spec!r}: bad item {part!r}; {_ACCEPTED}")
            sel = m["sel"]
            if sel == "all":
                out.append((m["kind"], 0, None))
                continue
            lo, _, hi = sel.replace("..", "-").partition("-")
            a, b = int(lo), int(hi or lo)
            if a > b:
                raise SettingError("blocks", f"{{name}} {spec!r}: range {part!r} is reversed; write {b}-{a}")
            out.append((m["kind"], a, b))
        return cls(tuple(out))

    def expand(self, counts: Mapping[str, int], main: str) -> tuple[BlockId, ...]:
        """Block ids, checked against ``counts`` (blocks per kind) before expanding."""
        assert self.items is not None
        out: dict[BlockId, None] = {}
        for kind, lo, hi in self.items:
            kind = kind or main
            if kind not in counts:
                kinds = ", ".join(f"{k} (0..{n - 1})" for k, n in counts.items())
                raise SettingError("blocks", f"{{name}}: this model has no {kind!r} blocks; its blocks: {kinds}")
            n = counts[kind]
            top = n - 1 if hi is None else hi
            if top >= n:
                shown = f"{lo}-{hi}" if hi != lo else str(lo)
                raise SettingError(
                    "blocks", f"{{name}}: {kind} block {shown} out of range; this model has {kind} blocks 0..{n - 1}"
                )
            out.update(dict.fromkeys((kind, i) for i in range(lo, top + 1)))
        return tuple(out)


_ACCEPTED = "accepted: default, none, all, 0-37, 20..37, 0,5,9, single:all,double:0-3"


def _item_of(b: Any) -> tuple[str | None, int, int]:
    if isinstance(b, tuple) and len(b) == 2 and isinstance(b[0], str):
        return (b[0], _index(b[1]), _index(b[1]))
    return (None, _index(b), _index(b))


def _index(b: Any) -> int:
    if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 0:
        raise ValueError(b)
    return int(b)


def _integer(knob: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise SettingError(knob, f"{{name}} must be a whole number between {lo} and {hi}, got {value!r}")
    if not lo <= value <= hi:
        raise SettingError(knob, f"{{name}} must be between {lo} and {hi}, got {value}")
    return int(value)


def _number(knob: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SettingError(knob, f"{{name}} must be a number between {lo:g} and {hi:g}, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise SettingError(knob, f"{{name}} must be a finite number between {lo:g} and {hi:g}, got {value!r}")
    return value


def check_device_name(knob: str, device: Any) -> str | None:
    """A device string that torch knows and this machine has, or None."""
    if device is None or device == "":
        return None
    from fireflow.models import parse_device

    try:
        return str(parse_device(str(device), what="{name}"))
    except ValueError as e:
        raise SettingError(knob, str(e)) from None


#: The knobs each verb takes (the rest of the table is for edits only).
VERB_KNOBS: dict[str, tuple[str, ...]] = {
    "edit": tuple(KNOBS),
    "invert": ("num_steps", "inversion_guidance", "solver"),
    "reconstruct": ("num_steps", "inversion_guidance", "solver"),
    "generate": ("num_steps", "guidance", "solver"),
}


@dataclass(frozen=True)
class EditSettings:
    """One edit's knobs. ``None`` means the model family's default (resolved by :meth:`resolve`).

    Validated once: :meth:`check` returns a checked copy, which :meth:`resolve` takes as it is.
    """

    num_steps: int = 8
    inject: int | None = None
    guidance: float | None = None
    inversion_guidance: float | None = None
    solver: str = "fireflow"
    strategy: str = "replace_v"
    blocks: Any = "default"
    ratios: tuple[float, float, float] = (1.0, 1.0, 1.0)
    feature_device: str | None = None
    mask_threshold: float = 0.2
    mask_dilation: int = 1
    #: Set on the copy :meth:`check` returns: validated and normalised, nothing left to check.
    checked: bool = field(default=False, compare=False, repr=False)

    @classmethod
    def build(cls, settings: EditSettings | None, overrides: Mapping[str, Any], verb: str = "edit") -> EditSettings:
        """``settings`` (or the table's defaults) with ``overrides`` by API name, checked: how the
        API's ``settings=None, **overrides`` become one object. Unknown names are a TypeError."""
        allowed = VERB_KNOBS[verb]
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise TypeError(f"{verb}() got an unexpected keyword argument {unknown[0]!r}; knobs: {', '.join(allowed)}")
        if settings is not None and not isinstance(settings, EditSettings):
            raise TypeError(f"settings must be an EditSettings, got {type(settings).__name__}")
        base = settings or cls()
        if not overrides:
            return base.check()
        return dataclasses.replace(base, checked=False, **overrides).check()

    def check(self) -> EditSettings:
        """Validate everything that needs no model; return the normalised settings."""
        if self.checked:
            return self
        num_steps = _integer("num_steps", self.num_steps, 1, MAX_STEPS)
        inject = None if self.inject is None else _integer("inject", self.inject, 0, MAX_STEPS)
        if inject is not None and inject > num_steps:
            raise SettingError("inject", f"{{name}} must be between 0 and the step count {num_steps}, got {inject}")
        guidance = None if self.guidance is None else _number("guidance", self.guidance, *GUIDANCE_RANGE)
        inv = self.inversion_guidance
        inv = None if inv is None else _number("inversion_guidance", inv, *GUIDANCE_RANGE)
        if self.solver not in solvers.SOLVERS:
            accepted = ", ".join(solvers.SOLVERS)
            raise SettingError("solver", f"{{name}}: unknown solver {self.solver!r}; accepted: {accepted}")
        try:
            parse_strategy(self.strategy)
        except ValueError as e:
            raise SettingError("strategy", "{name}: " + str(e)) from None
        strategy = " ".join(str(self.strategy).replace(",", " ").split())
        ratios = self.ratios
        if isinstance(ratios, str) or len(tuple(ratios)) != 3:
            raise SettingError("ratios", f"{{name}} must be three numbers (Q, K, V), got {ratios!r}")
        ratios = tuple(_number("ratios", r, *RATIO_RANGE) for r in ratios)
        blocks = BlockSpec.parse(self.blocks)
        mask_threshold = _number("mask_threshold", self.mask_threshold, 0.0, 1.0)
        mask_dilation = _integer("mask_dilation", self.mask_dilation, 0, MAX_MASK_DILATION)
        return dataclasses.replace(
            self,
            num_steps=num_steps,
            inject=inject,
            guidance=guidance,
            inversion_guidance=inv,
            strategy=strategy,
            ratios=ratios,
            blocks=blocks,
            feature_device=check_device_name("feature_device", self.feature_device),
            mask_threshold=mask_threshold,
            mask_dilation=mask_dilation,
            checked=True,
        )

    def resolve(
        self, defaults: Mapping[str, Any], block_counts: Mapping[str, int], verb: str = "edit"
    ) -> ResolvedSettings:
        """Fill the family's ``defaults`` and expand the blocks against ``block_counts``: what runs.
        Verbs other than ``edit`` reuse no feature (inject 0, no blocks)."""
        s = self.check()
        edit = verb == "edit"
        default_blocks = BlockSpec.parse(defaults.get("blocks", "none") if edit else "none")
        main = next((k for k, *_ in default_blocks.items or () if k), next(iter(block_counts), "block"))
        spec = s.blocks if s.blocks.items is not None and edit else default_blocks
        guidance = s.guidance if s.guidance is not None else float(defaults.get("guidance", 2.0))
        # Unguided inversion: 1 where guidance is CFG above 1 or an embedded input; a family whose
        # guidance is "on above 0" (Z-Image) says 0.
        inversion = float(defaults.get("inversion_guidance", 1.0))
        # A model's default inject never exceeds the steps asked for (a value given does: check()).
        inject = s.inject if s.inject is not None else min(int(defaults.get("inject", 1)), s.num_steps)
        return ResolvedSettings(
            num_steps=s.num_steps,
            inject=inject if edit else 0,
            guidance=guidance,
            inversion_guidance=s.inversion_guidance if s.inversion_guidance is not None else inversion,
            solver=s.solver,
            strategy=s.strategy,
            blocks=spec.expand(block_counts, main),
            ratios=s.ratios,
            feature_device=s.feature_device,
            ops=tuple(parse_strategy(s.strategy).items()),
            mask_threshold=s.mask_threshold,
            mask_dilation=s.mask_dilation,
        )

    def as_kwargs(self) -> dict[str, Any]:
        """The knobs as keyword arguments of :meth:`fireflow.FireFlowEditor.edit`."""
        return {k: getattr(self, k) for k in KNOBS}

    @classmethod
    def from_values(cls, values: Mapping[str, Any], *, ignore_none: bool = True) -> EditSettings:
        """From a mapping by API name (a front end's parsed input); unknown names are ignored."""
        kw = {k: v for k, v in values.items() if k in KNOBS and not (ignore_none and v is None)}
        return cls(**kw)


@dataclass(frozen=True)
class ResolvedSettings:
    """Settings with every default filled and the blocks expanded, as one edit ran them."""

    num_steps: int
    inject: int
    guidance: float
    inversion_guidance: float
    solver: str
    strategy: str
    blocks: tuple[BlockId, ...]
    ratios: tuple[float, float, float]
    feature_device: str | None
    #: The strategy parsed: ``(("v", "replace"), ...)``, one operation per tensor.
    ops: tuple[tuple[str, str], ...] = (("v", "replace"),)
    #: ``mask="auto"``: the share of the top velocity difference a cell must reach, and the dilation in cells.
    mask_threshold: float = 0.2
    mask_dilation: int = 1

    def to_dict(self) -> dict[str, Any]:
        """The knobs as plain JSON values (what the front ends write)."""
        d = {k: getattr(self, k) for k in KNOBS}
        d["blocks"] = [list(b) for b in self.blocks]
        d["ratios"] = list(self.ratios)
        return d


def describe_blocks(blocks) -> str:
    """``[("single", 0), ..., ("single", 37), ("double", 2)]`` -> ``"single 0-37, double 2"``."""
    runs: list[list] = []  # [kind, first, last]
    for kind, i in blocks:
        if runs and runs[-1][0] == kind and runs[-1][2] == i - 1:
            runs[-1][2] = i
        else:
            runs.append([kind, i, i])
    return ", ".join(f"{k} {a}" if a == b else f"{k} {a}-{b}" for k, a, b in runs) or "none"


# ---- argparse, derived from the table ------------------------------------------------------------
def _ratios_arg(text: str) -> tuple[float, float, float]:
    import argparse

    try:
        q, k, v = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad ratios {text!r}; accepted: three numbers Q,K,V like 1,1,1") from None
    return q, k, v


_ARG_TYPES: dict[str, Callable[[str], Any]] = {
    "num_steps": int,
    "inject": int,
    "guidance": float,
    "inversion_guidance": float,
    "ratios": _ratios_arg,
    "mask_threshold": float,
    "mask_dilation": int,
}


def parse_knob(name: str, text: str) -> Any:
    """A knob's value from text, as its CLI flag parses it (manifest cells, form fields); text that
    does not parse is returned as it is, so that :meth:`EditSettings.check` words the error."""
    import argparse

    convert = _ARG_TYPES.get(name)
    if convert is None:
        return text
    try:
        return convert(text)
    except (ValueError, argparse.ArgumentTypeError):
        return text


def add_arguments(parser, names: tuple[str, ...] = tuple(KNOBS), title: str = "editing (defaults: the paper's)"):
    """Add the flags of ``names`` to an argparse parser; values land under the API names."""
    g = parser.add_argument_group(title)
    for name in names:
        k = KNOBS[name]
        g.add_argument(
            k.flag,
            dest=name,
            type=_ARG_TYPES.get(name, str),
            default=None,  # None: the EditSettings default (or the family's)
            choices=k.choices,
            help=k.help,
        )
    return g


def settings_from_args(args) -> EditSettings:
    """The EditSettings an argparse namespace built by :func:`add_arguments` asks for, checked."""
    return EditSettings.from_values(vars(args)).check()


def add_verb_arguments(parser, verb: str):
    """The flags of the knobs ``verb`` takes (``fireflow reconstruct``: --steps, --inversion-guidance, --solver)."""
    return add_arguments(parser, VERB_KNOBS[verb], title="settings (defaults: the paper's)")

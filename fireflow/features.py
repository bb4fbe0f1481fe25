"""Attention feature reuse: record Q/K/V during inversion, inject them while denoising.

Family-free by design. A model family's attention processors (in ``fireflow/models/<family>/``)
compute attention exactly like the stock diffusers processors and hand their Q, K, V to the
edit's :class:`FeatureReuse`, which they receive through the transformer's attention kwargs:

* :class:`FeatureReuse` is all the state of one edit: the recorded tensors and the current call.
  Each edit creates its own, so concurrent edits on one model never see each other's features.
* :class:`ProcessorInstaller` puts a family's processors on the attention layers an edit selects
  while it runs, and puts the previous processors back afterwards.

Matching rule: a denoising call reuses the inversion call that covers the same time interval with
the same call kind ("start" or "midpoint"). Blocks are ``(kind, index)`` pairs named by the family.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from fireflow.solvers import VelocityCall

BlockId = tuple[str, int]  # (block kind, index), kinds named by the model family
STRATEGIES = ("replace_v", "add_v", "replace_k", "add_k", "replace_q", "add_q")
#: The attention kwarg the processors receive the edit's store under.
ATTENTION_KWARG = "fireflow"


def parse_strategy(strategy: str) -> dict[str, str]:
    """``"replace_v add_k"`` -> ``{"v": "replace", "k": "add"}``; one operation per tensor."""
    if not isinstance(strategy, str):
        raise ValueError(f"strategy must be a string such as 'replace_v', got {strategy!r}")
    ops: dict[str, str] = {}
    for word in strategy.replace(",", " ").split():
        if word not in STRATEGIES:
            raise ValueError(f"unknown strategy {word!r}; accepted: {', '.join(STRATEGIES)} (space-separated)")
        op, target = word.split("_")
        if target in ops:
            what = "repeats" if ops[target] == op else "both adds and replaces"
            raise ValueError(f"strategy {strategy!r} {what} {target.upper()}; give each of Q, K, V at most once")
        ops[target] = op
    if not ops:
        raise ValueError(f"empty strategy; accepted: {', '.join(STRATEGIES)} (space-separated)")
    return ops


@dataclass(frozen=True)
class _Key:
    interval: tuple[float, float]
    kind: str
    block: BlockId
    target: str  # "q", "k" or "v"


def _fit(stored: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """A stored tensor shaped for the current call's batch.

    Same rows: as is. One stored row (one inversion shared by several edits): broadcast. The
    current batch a multiple of the stored one (classifier-free guidance while editing, an
    unguided inversion): repeated, so both halves see the source's features. The stored batch a
    multiple of the current one (a guided inversion, an unguided edit): its last rows, the
    prompt-conditioned half of a [negative, positive] batch.
    """
    s, c = stored.shape[0], cur.shape[0]
    if s == c:
        return stored
    if s == 1:
        return stored.expand_as(cur)
    if c % s == 0:
        return stored.repeat(c // s, *([1] * (stored.dim() - 1)))
    if s % c == 0:
        return stored[s - c :]
    raise ValueError(f"stored features have batch {s}, the current call {c}: cannot match them")


class FeatureReuse:
    """The recorded features and the current call of one edit.

    ``recording(call)`` and ``injecting(call)`` are solver call hooks for the inversion and the
    denoising pass. Features are recorded in the last ``inject`` inversion steps and injected in
    the first ``inject`` denoising steps, in the selected ``blocks`` only.
    """

    def __init__(
        self,
        num_steps: int,
        inject: int,
        strategy: str = "replace_v",
        blocks: Iterable[BlockId] = (),
        ratios: tuple[float, float, float] = (1.0, 1.0, 1.0),
        storage_device: torch.device | str | None = None,
    ):
        if not 0 <= inject <= num_steps:
            raise ValueError(f"inject must be between 0 and num_steps={num_steps}, got {inject}")
        self.num_steps, self.inject = num_steps, inject
        self.ops = parse_strategy(strategy)
        self.blocks: frozenset[BlockId] = frozenset(blocks)
        self.ratios = dict(zip("qkv", ratios, strict=True))
        self.storage_device = None if storage_device is None else torch.device(storage_device)
        self._store: dict[_Key, torch.Tensor] = {}
        #: (interval, kind) of every call that recorded something: what an injecting call can find.
        self._recorded: set[tuple[tuple[float, float], str]] = set()
        self._mode: str | None = None
        self._call: VelocityCall | None = None
        #: (denoising step, call kind, block) of every injection made, in order; for tests and logs.
        self.injections: list[tuple[int, str, BlockId]] = []

    @property
    def active(self) -> bool:
        """Whether the current call records, or injects something recorded for it."""
        if self._mode == "record":
            return bool(self.blocks)
        call = self._call
        return self._mode == "inject" and call is not None and (call.interval, call.kind) in self._recorded

    @property
    def attention_kwargs(self) -> dict[str, FeatureReuse] | None:
        """What the current transformer call passes on to the processors.

        None when the call neither records nor injects (16 of an edit's 18 calls at the defaults):
        those calls take the plain attention path, with no per-block hook and nothing that would
        stop a compiled block from being reused.
        """
        return {ATTENTION_KWARG: self} if self.active else None

    @contextlib.contextmanager
    def _active(self, mode: str | None, call: VelocityCall) -> Iterator[None]:
        self._mode, self._call = mode, call
        try:
            yield
        finally:
            self._mode, self._call = None, None

    def recording(self, call: VelocityCall) -> contextlib.AbstractContextManager[None]:
        """Inversion call hook: record in the last ``inject`` steps (nearest the noise)."""
        return self._active("record" if call.step >= self.num_steps - self.inject else None, call)

    def injecting(self, call: VelocityCall) -> contextlib.AbstractContextManager[None]:
        """Denoising call hook: inject in the first ``inject`` steps."""
        return self._active("inject" if call.step < self.inject else None, call)

    def __call__(
        self, block: BlockId, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Record or inject this block's Q, K, V (batch first) for the current call."""
        if self._mode is None or block not in self.blocks:
            return q, k, v
        call = self._call
        assert call is not None
        qkv = {"q": q, "k": k, "v": v}
        if self._mode == "record":
            for target in self.ops:
                stored = qkv[target].detach() * self.ratios[target]
                if self.storage_device is not None:
                    stored = stored.to(self.storage_device, non_blocking=True)
                self._store[_Key(call.interval, call.kind, block, target)] = stored
            self._recorded.add((call.interval, call.kind))
            return q, k, v
        injected = False
        for target, op in self.ops.items():
            stored = self._store.get(_Key(call.interval, call.kind, block, target))
            if stored is None:  # e.g. FireFlow's first start call: inversion never made it
                continue
            cur = qkv[target]
            stored = _fit(stored.to(cur.device, cur.dtype, non_blocking=True), cur)
            qkv[target] = stored if op == "replace" else cur + stored
            injected = True
        if injected:
            self.injections.append((call.step, call.kind, block))
        return qkv["q"], qkv["k"], qkv["v"]


class _OwnKwargFilter(logging.Filter):
    """Drops diffusers' "kwargs ['fireflow'] are not expected by <processor>" warning: an edit that
    selects some blocks passes its store to every layer, and the others rightly ignore it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"['{ATTENTION_KWARG}'] are not expected" not in record.getMessage()


def quiet_unused_kwarg_warning(logger_name: str) -> None:
    """Install :class:`_OwnKwargFilter` on one diffusers module logger (once)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _OwnKwargFilter) for f in logger.filters):
        logger.addFilter(_OwnKwargFilter())


#: Builds the family's processor for one attention layer, given the block id and the layer's
#: current processor (whose attention backend it should follow).
ProcessorFactory = Callable[[BlockId, object], object]


class ProcessorInstaller:
    """Installs a family's feature-reuse processors on one transformer while edits run.

    Owned by the model adapter, not by an edit. Only the layers an edit selects get a new
    processor; the rest (an IP-adapter's, say) stay as they are. Each layer counts the edits in
    flight that use it, so concurrent edits share one installation, and the last one out restores
    that layer's previous processor, also when an edit fails.
    """

    def __init__(self, transformer: torch.nn.Module, layers: Mapping[str, BlockId], factory: ProcessorFactory):
        self.transformer, self.layers, self.factory = transformer, dict(layers), factory
        self._lock = threading.Lock()
        self._users: dict[str, int] = {}
        self._original: dict[str, object] = {}

    def _set(self, changes: Mapping[str, object]) -> None:
        # diffusers' dict form needs every layer: keep the others' current processors.
        processors = dict(self.transformer.attn_processors)
        processors.update(changes)
        self.transformer.set_attn_processor(processors)

    @contextlib.contextmanager
    def installed(self, blocks: Iterable[BlockId]) -> Iterator[None]:
        wanted = set(blocks)
        names = [name for name, block in self.layers.items() if block in wanted]
        with self._lock:
            fresh = [n for n in names if self._users.get(n, 0) == 0]
            if fresh:
                current = self.transformer.attn_processors
                self._original.update({n: current[n] for n in fresh})
                self._set({n: self.factory(self.layers[n], current[n]) for n in fresh})
            for n in names:
                self._users[n] = self._users.get(n, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                done = []
                for n in names:
                    self._users[n] -= 1
                    if self._users[n] == 0:
                        done.append(n)
                if done:
                    self._set({n: self._original.pop(n) for n in done})

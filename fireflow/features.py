"""Attention feature reuse: record Q/K/V during inversion, inject them while denoising.

Family-free by design. A model family's attention processors (in ``fireflow/models/<family>/``)
compute attention exactly like the stock diffusers processors and hand their Q, K, V to the
edit's :class:`FeatureReuse`. How the store reaches them is the family's choice (its ``route``):

* ``"kwargs"``: under the ``fireflow`` attention kwarg, where the family's blocks forward attention
  kwargs to their processors (FLUX, SD3, FLUX.2, Qwen-Image, Chroma);
* ``"context"``: a context variable bound around each transformer call (:func:`bound`, read by
  :func:`current`), where the blocks call attention without kwargs (Wan, Z-Image). A context
  variable is per thread (and per asyncio task), so concurrent edits stay apart.

* :class:`FeatureReuse` is all the state of one edit: the recorded tensors and the current call.
  Each edit creates its own, so concurrent edits on one model never see each other's features.
* :class:`ProcessorInstaller` puts a family's processors on the attention layers an edit selects
  while it runs, and puts the previous processors back afterwards.

Matching rule: a denoising call reuses the inversion call that covers the same time interval with
the same call kind ("start" or "midpoint"). Blocks are ``(kind, index)`` pairs named by the family.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from fireflow.solvers import VelocityCall

BlockId = tuple[str, int]  # (block kind, index), kinds named by the model family
STRATEGIES = ("replace_v", "add_v", "replace_k", "add_k", "replace_q", "add_q")
#: The attention kwarg the processors receive the edit's store under (the "kwargs" route).
ATTENTION_KWARG = "fireflow"
#: How a family's processors receive the store: attention kwargs, or a context variable.
Route = Literal["kwargs", "context"]

_CURRENT: contextvars.ContextVar[FeatureReuse | None] = contextvars.ContextVar("fireflow_features", default=None)
#: True while fireflow runs a transformer call: scopes the log filters below to fireflow's own calls.
_IN_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("fireflow_in_call", default=False)


def current() -> FeatureReuse | None:
    """The store bound to the transformer call running in this thread (the "context" route)."""
    return _CURRENT.get()


@contextlib.contextmanager
def bound(store: FeatureReuse | None) -> Iterator[None]:
    """Bind ``store`` for the processors of the call made inside (None: no feature reuse)."""
    token = _CURRENT.set(store)
    try:
        yield
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def in_call() -> Iterator[None]:
    """Marks fireflow's own transformer and text-encoder calls, so the filters below act only there."""
    token = _IN_CALL.set(True)
    try:
        yield
    finally:
        _IN_CALL.reset(token)


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
    if s == 1:  # the batch only: a family may fit a differing sequence length itself
        return stored.expand(c, *stored.shape[1:])
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
        strategy: str | Mapping[str, str] = "replace_v",
        blocks: Iterable[BlockId] = (),
        ratios: tuple[float, float, float] = (1.0, 1.0, 1.0),
        storage_device: torch.device | str | None = None,
    ):
        """``strategy``: a strategy string, or one already parsed (``{"v": "replace"}``)."""
        self.num_steps, self.inject = num_steps, inject
        self.ops = parse_strategy(strategy) if isinstance(strategy, str) else dict(strategy)
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

    @classmethod
    def from_settings(cls, settings) -> FeatureReuse:
        """The store for one edit run with resolved settings (fireflow.settings.ResolvedSettings),
        which were validated where they entered: nothing is checked or parsed again."""
        s = settings
        return cls(s.num_steps, s.inject, dict(s.ops), s.blocks, s.ratios, s.feature_device)

    @property
    def active(self) -> bool:
        """Whether the current call records, or injects something recorded for it."""
        if self._mode == "record":
            return bool(self.blocks)
        call = self._call
        return self._mode == "inject" and call is not None and (call.interval, call.kind) in self._recorded

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


class _InCallFilter(logging.Filter):
    """Drops, inside fireflow's own calls only (:func:`in_call`), the records ``drop`` matches.
    Outside them it passes everything: the caller's logging is never changed by a level."""

    def __init__(self, drop: Callable[[logging.LogRecord], bool]):
        super().__init__()
        self.drop = drop

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_IN_CALL.get() and self.drop(record))


_filters_lock = threading.Lock()


def quiet_in_calls(logger_name: str, key: str, drop: Callable[[logging.LogRecord], bool]) -> None:
    """Install (once per ``key``) a filter on one logger that drops ``drop``'s records during
    fireflow's calls: diffusers' "kwargs ['fireflow'] are not expected" warning from layers an
    edit did not select, the tokenizers' truncation notices for a long prompt."""
    logger = logging.getLogger(logger_name)
    with _filters_lock:
        if not any(getattr(f, "key", None) == key for f in logger.filters):
            f = _InCallFilter(drop)
            f.key = key  # type: ignore[attr-defined]
            logger.addFilter(f)


def quiet_unused_kwarg_warning(logger_name: str) -> None:
    """Drop diffusers' "kwargs ['fireflow'] are not expected by <processor>" warning during
    fireflow's calls: an edit that selects some blocks passes its store to every layer, and the
    others rightly ignore it."""
    quiet_in_calls(logger_name, "unused-kwarg", lambda r: f"['{ATTENTION_KWARG}'] are not expected" in r.getMessage())


#: Builds the family's processor for one attention layer, given the block id and the layer's
#: current processor (whose attention backend it should follow).
ProcessorFactory = Callable[[BlockId, object], object]


class ProcessorInstaller:
    """Installs a family's feature-reuse processors on attention modules while edits run.

    Owned by the model adapter, not by an edit. ``modules`` maps a layer name to its attention
    module (anything with ``processor`` and ``set_processor``, diffusers' per-module API, which
    also serves models without ``set_attn_processor`` and adapters over several transformers).
    Only the layers an edit selects get a new processor; the rest (an IP-adapter's, say) stay as
    they are. Each layer counts the edits in flight that use it, so concurrent edits share one
    installation, and the last one out restores that layer's previous processor, also when an
    edit fails.
    """

    def __init__(
        self, modules: Mapping[str, torch.nn.Module], layers: Mapping[str, BlockId], factory: ProcessorFactory
    ):
        self.modules, self.layers, self.factory = dict(modules), dict(layers), factory
        self._lock = threading.Lock()
        self._users: dict[str, int] = {}
        self._original: dict[str, object] = {}

    def _set(self, changes: Mapping[str, object]) -> None:
        for name, proc in changes.items():
            self.modules[name].set_processor(proc)

    def current(self, name: str) -> object:
        return self.modules[name].processor

    @contextlib.contextmanager
    def installed(self, blocks: Iterable[BlockId]) -> Iterator[None]:
        wanted = set(blocks)
        names = [name for name, block in self.layers.items() if block in wanted]
        with self._lock:
            fresh = [n for n in names if self._users.get(n, 0) == 0]
            if fresh:
                current = {n: self.modules[n].processor for n in fresh}
                self._original.update(current)
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

"""Attention feature reuse: record Q/K/V during inversion, inject them while denoising.

Two pieces, kept apart on purpose:

* :class:`FireFlowAttnProcessor` is a stateless diffusers attention processor, installed on a
  ``FluxTransformer2DModel`` through ``set_attn_processor``. It computes attention exactly like
  diffusers' ``FluxAttnProcessor`` and hands Q, K, V (after the Q/K RMS-norm, before RoPE) to the
  edit's :class:`FeatureReuse`, which it receives through ``joint_attention_kwargs``.
* :class:`FeatureReuse` is all the state of one edit: the recorded tensors and the current call.
  Each edit creates its own, so concurrent edits on one model never see each other's features.

Matching rule (METHOD.md §4): a denoising call reuses the inversion call that covers the same time
interval with the same call kind ("start" or "midpoint").
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from fireflow.solvers import VelocityCall

BlockId = tuple[str, int]  # ("single", i) or ("double", i)
STRATEGIES = ("replace_v", "add_v", "replace_k", "add_k", "replace_q", "add_q")
ATTENTION_KWARG = "fireflow"


def parse_strategy(strategy: str) -> dict[str, str]:
    """``"replace_v add_k"`` -> ``{"v": "replace", "k": "add"}``; one operation per tensor."""
    ops: dict[str, str] = {}
    for word in strategy.replace(",", " ").split():
        if word not in STRATEGIES:
            raise ValueError(f"unknown strategy {word!r}; accepted: {', '.join(STRATEGIES)} (space-separated)")
        op, target = word.split("_")
        if ops.get(target, op) != op:
            raise ValueError(f"strategy {strategy!r} both adds and replaces {target.upper()}")
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


class FeatureReuse:
    """The recorded features and the current call of one edit.

    ``recording(call)`` and ``injecting(call)`` are solver call hooks for the inversion and the
    denoising pass. Features are recorded in the last ``inject`` inversion steps and injected in
    the first ``inject`` denoising steps, in the selected blocks only.
    """

    def __init__(
        self,
        num_steps: int,
        inject: int,
        strategy: str = "replace_v",
        single_blocks: Iterable[int] = (),
        double_blocks: Iterable[int] = (),
        ratios: tuple[float, float, float] = (1.0, 1.0, 1.0),
        storage_device: torch.device | str | None = None,
    ):
        if not 0 <= inject <= num_steps:
            raise ValueError(f"inject must be between 0 and num_steps={num_steps}, got {inject}")
        self.num_steps, self.inject = num_steps, inject
        self.ops = parse_strategy(strategy)
        self.blocks: frozenset[BlockId] = frozenset(
            [("single", i) for i in single_blocks] + [("double", i) for i in double_blocks]
        )
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
            return True
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
        """Record or inject this block's ``[B, S, H, D]`` Q, K, V for the current call."""
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
            stored = stored.to(cur.device, cur.dtype, non_blocking=True).expand_as(cur)
            qkv[target] = stored if op == "replace" else cur + stored
            injected = True
        if injected:
            self.injections.append((call.step, call.kind, block))
        return qkv["q"], qkv["k"], qkv["v"]


class FireFlowAttnProcessor:
    """FLUX attention with a hook on Q, K, V (after the Q/K norm, before RoPE).

    Without a :class:`FeatureReuse` in the call it computes what diffusers' ``FluxAttnProcessor``
    computes. It follows ``transformer.set_attention_backend``.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, block: BlockId):
        self.block = block

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        fireflow: FeatureReuse | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        q, k, v = _projections(attn, hidden_states, fused="to_qkv", names=("to_q", "to_k", "to_v"))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if joint:
            eq, ek, ev = _projections(
                attn,
                encoder_hidden_states,
                fused="to_added_qkv",
                names=("add_q_proj", "add_k_proj", "add_v_proj"),
            )
            # Text tokens first, then image tokens: the joint sequence the single blocks also see.
            q = torch.cat([attn.norm_added_q(eq), q], dim=1)
            k = torch.cat([attn.norm_added_k(ek), k], dim=1)
            v = torch.cat([ev, v], dim=1)
        if fireflow is not None:
            q, k, v = fireflow(self.block, q, k, v)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = dispatch_attention_fn(
            q,
            k,
            v,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).to(q.dtype)
        if not joint:
            return out
        text_len = encoder_hidden_states.shape[1]
        encoder_out, out = out[:, :text_len], out[:, text_len:]
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(encoder_out.contiguous())


def _projections(
    attn: torch.nn.Module, x: torch.Tensor, fused: str, names: tuple[str, str, str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V as ``[B, S, H, D]``, from fused or separate projections."""
    # Plain statements, no generators: this runs in every attention layer of every call, and on a
    # launch-bound GPU (FLUX at 512², eager) its Python time is the forward's time.
    if getattr(attn, "fused_projections", False):
        q, k, v = getattr(attn, fused)(x).chunk(3, dim=-1)
    else:
        q, k, v = getattr(attn, names[0])(x), getattr(attn, names[1])(x), getattr(attn, names[2])(x)
    shape = (-1, attn.head_dim)
    return q.unflatten(-1, shape), k.unflatten(-1, shape), v.unflatten(-1, shape)


def attention_blocks(transformer: torch.nn.Module) -> dict[str, BlockId]:
    """Processor name -> block id for every attention layer of a FLUX transformer."""
    out: dict[str, BlockId] = {}
    for name in transformer.attn_processors:
        parts = name.split(".")
        kind = {"transformer_blocks": "double", "single_transformer_blocks": "single"}.get(parts[0])
        if kind is None:
            raise ValueError(f"not a FLUX transformer: unexpected attention layer {name!r}")
        out[name] = (kind, int(parts[1]))
    return out


class ProcessorInstaller:
    """Installs :class:`FireFlowAttnProcessor` on one transformer for as long as any edit runs.

    Owned by the model adapter, not by an edit: it counts the edits in flight so that concurrent
    edits share one installation, and the last one out restores the original processors, also
    when an edit fails.
    """

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self._lock = threading.Lock()
        self._users = 0
        self._original: dict[str, object] | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._original = dict(self.transformer.attn_processors)
                backend = getattr(next(iter(self._original.values())), "_attention_backend", None)
                processors = {}
                for name, block in attention_blocks(self.transformer).items():
                    processors[name] = FireFlowAttnProcessor(block)
                    processors[name]._attention_backend = backend
                self.transformer.set_attn_processor(processors)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._original is not None:
                    self.transformer.set_attn_processor(self._original)
                    self._original = None

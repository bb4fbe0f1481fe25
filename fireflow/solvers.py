"""ODE solvers for rectified flows: pure functions over any velocity ``v(x, t)``.

One step goes from ``t_a`` to ``t_b`` with ``h = t_b - t_a`` (negative when sampling 1 -> 0,
positive when inverting 0 -> 1). The same call integrates in either direction: pass the grid
reversed to invert.

Every velocity call is described by a :class:`VelocityCall` (step index, call kind, time and the
step's interval). Callers that need that context (feature recording and injection) pass
``call_hook``: a function of the :class:`VelocityCall` that returns a context manager entered
around the call. The velocity itself stays a plain ``v(x, t)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

CallKind = Literal["start", "midpoint"]
Velocity = Callable[[torch.Tensor, float], torch.Tensor]
CallHook = Callable[["VelocityCall"], AbstractContextManager[object]]
StepCallback = Callable[[int, float, torch.Tensor], None]
StateHook = Callable[[int, float, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class VelocityCall:
    """Where one velocity evaluation sits in a pass."""

    step: int  # index of the step within this pass, 0-based
    kind: CallKind  # "start": at t_start; "midpoint": at t_start + h / 2
    t: float  # the time the velocity is evaluated at
    t_start: float  # the step's start time t_a
    t_end: float  # the step's end time t_b

    @property
    def interval(self) -> tuple[float, float]:
        """The step's time interval as ``(low, high)``: the same for a step and its reverse."""
        return (min(self.t_start, self.t_end), max(self.t_start, self.t_end))


class _Stepper:
    """Wraps the user's velocity: builds the call context, enters the hook, keeps the state dtype."""

    def __init__(self, velocity: Velocity, ts: list[float], dtype: torch.dtype, call_hook: CallHook | None):
        self.velocity, self.ts, self.dtype, self.call_hook = velocity, ts, dtype, call_hook

    def __call__(self, x: torch.Tensor, step: int, kind: CallKind) -> torch.Tensor:
        t_a, t_b = self.ts[step], self.ts[step + 1]
        t = t_a if kind == "start" else t_a + (t_b - t_a) / 2
        hook = self.call_hook(VelocityCall(step, kind, t, t_a, t_b)) if self.call_hook else None
        with hook if hook is not None else contextlib.nullcontext():
            v = self.velocity(x, t)
        if v.shape != x.shape:
            raise ValueError(f"velocity returned shape {tuple(v.shape)}, expected {tuple(x.shape)} like x")
        # The ODE state stays in its own dtype (fp32) whatever precision the model runs in.
        return v.to(self.dtype)

    def steps(self) -> Iterator[tuple[int, float]]:
        for i in range(len(self.ts) - 1):
            yield i, self.ts[i + 1] - self.ts[i]


def euler(f: _Stepper, x: torch.Tensor) -> Generator[torch.Tensor, torch.Tensor, None]:
    """Euler ("ReFlow"): ``x += h v(x, t_a)``. 1 NFE per step."""
    for i, h in f.steps():
        x = x + h * f(x, i, "start")
        x = yield x


def midpoint(f: _Stepper, x: torch.Tensor) -> Generator[torch.Tensor, torch.Tensor, None]:
    """Explicit midpoint rule (what RF-Solver's second-order update reduces to). 2 NFE per step."""
    for i, h in f.steps():
        v_a = f(x, i, "start")
        v_m = f(x + h / 2 * v_a, i, "midpoint")
        x = x + h * v_m
        x = yield x


def fireflow(f: _Stepper, x: torch.Tensor) -> Generator[torch.Tensor, torch.Tensor, None]:
    """FireFlow: the midpoint rule with ``v(x, t_a)`` replaced by the previous step's midpoint
    velocity. Only step 0 evaluates its start velocity, so N steps cost N + 1 NFE."""
    v_m = None  # the cache starts empty on every pass
    for i, h in f.steps():
        v_a = f(x, i, "start") if v_m is None else v_m
        v_m = f(x + h / 2 * v_a, i, "midpoint")
        x = x + h * v_m
        x = yield x


SOLVERS: dict[str, Callable[[_Stepper, torch.Tensor], Generator[torch.Tensor, torch.Tensor, None]]] = {
    "euler": euler,
    "midpoint": midpoint,
    "fireflow": fireflow,
}


def nfe(solver: str, num_steps: int) -> int:
    """Velocity evaluations one pass of ``num_steps`` steps costs."""
    check_solver(solver)
    return {"euler": num_steps, "midpoint": 2 * num_steps, "fireflow": num_steps + 1}[solver]


def check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; accepted: {', '.join(SOLVERS)}")


def sample(
    velocity: Velocity,
    x: torch.Tensor,
    timesteps: Sequence[float] | torch.Tensor,
    solver: str = "fireflow",
    *,
    call_hook: CallHook | None = None,
    callback: StepCallback | None = None,
    state_hook: StateHook | None = None,
    progress: bool | str = False,
) -> torch.Tensor:
    """Integrate ``dx/dt = velocity(x, t)`` along ``timesteps``, in whichever direction they run.

    ``velocity(x, t)`` gets the state and a Python float time and must return a tensor shaped like
    ``x``; its output is cast to ``x.dtype``, so a bf16 model keeps an fp32 trajectory.
    ``call_hook(call)`` returns a context manager entered around every velocity call.
    ``state_hook(step, t_end, x)`` may replace the state after each step (a masked edit blends
    the source back in there); ``callback(step, t_end, x)`` then sees the state the next step
    starts from. ``progress`` shows a bar (a string sets its label). Returns the final state, in
    ``x``'s dtype.
    """
    check_solver(solver)
    ts = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else [float(t) for t in timesteps]
    if len(ts) < 2:
        raise ValueError(f"timesteps needs at least 2 points, got {len(ts)}")
    f = _Stepper(velocity, ts, x.dtype, call_hook)
    desc = progress if isinstance(progress, str) else solver
    steps = SOLVERS[solver](f, x)
    with tqdm(total=len(ts) - 1, desc=desc, disable=not progress) as bar:
        out = next(steps)
        for i in range(len(ts) - 1):
            if state_hook is not None:
                out = state_hook(i, ts[i + 1], out)
            if callback is not None:
                callback(i, ts[i + 1], out)
            bar.update(1)
            if i < len(ts) - 2:
                out = steps.send(out)
    return out

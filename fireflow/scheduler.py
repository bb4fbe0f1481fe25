"""FireFlow as a drop-in diffusers scheduler for text-to-image pipelines.

    pipe.scheduler = FireFlowScheduler.from_config(pipe.scheduler.config)

FireFlow is the midpoint rule whose start-of-step velocity is the previous step's midpoint
velocity, so N steps cost N + 1 model calls. A diffusers pipeline calls the model once per
entry of ``scheduler.timesteps`` and hands every output to ``step``; this scheduler therefore
lists the N + 1 times the model must be evaluated at,

    timesteps = [t_0, m_0, m_1, ..., m_{N-1}] * 1000,   m_i = (t_i + t_{i+1}) / 2,

where ``t_0 > t_1 > ... > t_N = 0`` is exactly the grid ``FlowMatchEulerDiscreteScheduler`` would
step through (shift, dynamic shifting, terminal stretch and Karras-type sigmas all inherited).
``step`` keeps the step-start state ``x_i`` (the anchor, fp32) and returns the state the next
call must see:

- call 0 (at t_0):           anchor = x_0,                       return x_0 + h_0 / 2 v
- call k (at m_{k-1}), k>=1: anchor = x_{k-1} + h_{k-1} v = x_k, return x_k + h_k / 2 v
- call N (at m_{N-1}):       anchor = x_N,                       return x_N (the result)

with ``h_i = t_{i+1} - t_i``; this is :func:`fireflow.solvers.fireflow` step for step.

Pipelines that start part-way through the schedule (img2img and inpainting with ``strength < 1``
slice ``timesteps`` by ``order``) cannot be served: a slice of this list does not name a FireFlow
run. They are refused with :class:`UnsupportedPipelineError` before the first model call.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

__all__ = ["FireFlowScheduler", "UnsupportedPipelineError"]

# A pipeline saved with this scheduler names ``["fireflow.scheduler", "FireFlowScheduler"]`` in its
# model_index.json. diffusers' loader then looks its loadable base classes up *by name in this module*
# to find ``from_pretrained``: SchedulerMixin must be importable from here.
_LOADABLE_BASE = SchedulerMixin


class UnsupportedPipelineError(ValueError):
    """The pipeline uses the scheduler in a way FireFlow cannot serve correctly."""


_PARTIAL = (
    "FireFlowScheduler serves text-to-image from pure noise only: this pipeline starts at call {k} of {n} "
    "(img2img or inpainting with strength < 1 slices the schedule), and a slice of FireFlow's call list is "
    "not a FireFlow run. Use strength=1.0, or FlowMatchEulerDiscreteScheduler for partial denoising."
)


class FireFlowScheduler(FlowMatchEulerDiscreteScheduler):
    """FireFlow (Deng et al., ICML 2025): second-order accurate flow sampling at N + 1 model calls.

    A subclass of :class:`~diffusers.FlowMatchEulerDiscreteScheduler` with the same config, so
    ``from_config`` of any flow-matching pipeline's scheduler config works. With
    ``num_inference_steps=N`` the pipeline makes N + 1 transformer calls (``len(timesteps)``).

    Attributes after :meth:`set_timesteps`:
        timesteps: the N + 1 model-call times (x ``num_train_timesteps``).
        sigmas: the N + 1 model-call sigmas and a terminal value, as diffusers expects.
        step_sigmas: the N + 1 step boundaries ``t_0 .. t_N`` FireFlow steps between.

    The ODE state stays in fp32 inside the scheduler whatever dtype the pipeline runs in. If a
    ``callback_on_step_end`` changes the latents, the change is carried into that state.
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ):
        if stochastic_sampling:
            raise ValueError("FireFlowScheduler is a deterministic ODE solver: stochastic_sampling=True is unsupported")
        if invert_sigmas:
            raise ValueError("FireFlowScheduler does not support invert_sigmas=True (Mochi's reversed schedule)")
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            shift=shift,
            use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift,
            max_shift=max_shift,
            base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len,
            invert_sigmas=invert_sigmas,
            shift_terminal=shift_terminal,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            time_shift_type=time_shift_type,
            stochastic_sampling=stochastic_sampling,
        )
        self.step_sigmas: torch.Tensor | None = None
        self._reset()

    def _reset(self) -> None:
        self._h: list[float] = []  # step sizes t_{i+1} - t_i as Python floats: no device syncs in step
        self._anchor: torch.Tensor | None = None  # x_i, the state at the current step's start, fp32
        self._returned: torch.Tensor | None = None  # what the last step handed the pipeline

    @property
    def num_calls(self) -> int:
        """Model calls of one generation: ``num_inference_steps + 1``."""
        return len(self._h) + 1 if self._h else 0

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ):
        """Set the grid exactly as ``FlowMatchEulerDiscreteScheduler`` would, then list the FireFlow
        calls on it: the grid's first point and the midpoints of its N intervals."""
        if timesteps is not None:
            raise ValueError(
                "FireFlowScheduler derives every call time from sigmas (a grid point or the midpoint of two): "
                "pass sigmas= or num_inference_steps, not timesteps="
            )
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu)
        grid = self.sigmas  # fp32, t_0 .. t_{N-1} and the terminal t_N
        n = len(grid) - 1
        if n < 1:
            raise ValueError("FireFlowScheduler needs at least one step")
        calls = torch.cat([grid[:1], (grid[:-1] + grid[1:]) / 2])
        self.step_sigmas = grid
        self.timesteps = calls * self.config.num_train_timesteps
        self.sigmas = torch.cat([calls, grid[-1:]])
        self._reset()
        values = grid.double().tolist()  # one host copy per generation
        self._h = [b - a for a, b in zip(values[:-1], values[1:])]

    def set_begin_index(self, begin_index: int = 0):
        """Only 0: a pipeline that starts later (strength < 1) is refused here, before any model call."""
        if begin_index != 0:
            raise UnsupportedPipelineError(_PARTIAL.format(k=begin_index, n=len(self.timesteps)))
        super().set_begin_index(begin_index)

    def scale_noise(self, sample: torch.FloatTensor, timestep, noise: torch.FloatTensor | None = None):
        """The forward process ``sigma * noise + (1 - sigma) * sample`` at a listed time. Refused
        once sampling has begun: inpainting re-noises its known region to the next call's time after
        every step, but FireFlow's state there is a midpoint prediction, not a step end."""
        if self.step_index is not None:
            raise UnsupportedPipelineError(
                "FireFlowScheduler cannot re-noise latents during sampling (what inpainting pipelines do after "
                "every step): its intermediate latents are midpoint predictions, not step ends. "
                "Use FlowMatchEulerDiscreteScheduler for inpainting."
            )
        return super().scale_noise(sample, timestep, noise)

    def step(
        self,
        model_output: torch.FloatTensor,
        timestep: float | torch.FloatTensor,
        sample: torch.FloatTensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        """Take the model's velocity at ``timestep`` and return the latents of the next call
        (after the last call: the generated latents). ``s_*`` and ``generator`` are ignored."""
        if per_token_timesteps is not None:
            raise ValueError("FireFlowScheduler does not support per_token_timesteps")
        if not self._h:
            raise RuntimeError("call set_timesteps before step")
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError("pass one of scheduler.timesteps to step(), not an integer index")
        n = len(self._h)
        if self.step_index is None:
            # Once per generation: the first call must be the schedule's first (a sliced schedule's is not).
            # begin_index is None or 0 here (set_begin_index refuses anything else).
            t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
            first = float(self.timesteps[0])
            if abs(t - first) > 1e-4 * max(1.0, abs(first)):
                k = int((self.timesteps.float().cpu() - t).abs().argmin())
                raise UnsupportedPipelineError(_PARTIAL.format(k=k, n=n + 1))
            self._step_index = 0
        k = self._step_index
        if k > n:
            raise RuntimeError(f"step called {k + 1} times; this schedule has {n + 1} calls (set_timesteps again)")
        v = model_output.to(torch.float32)
        if k == 0:
            anchor = sample.to(torch.float32, copy=True)
        else:
            anchor = self._anchor
            returned = self._returned
            if sample is not returned and not (sample.dtype == returned.dtype and torch.equal(sample, returned)):
                # A callback (or the pipeline) changed the latents: carry the change into the state.
                anchor = anchor + (sample.to(torch.float32) - returned.to(torch.float32))
            anchor = anchor + self._h[k - 1] * v  # x_k = x_{k-1} + h_{k-1} v(midpoint of step k-1)
        out = anchor + self._h[k] / 2 * v if k < n else anchor  # the next call's input, or the result
        self._anchor = anchor
        prev_sample = out.to(model_output.dtype)
        self._returned = prev_sample
        self._step_index = k + 1
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)

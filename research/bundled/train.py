"""Train the demo model: rectified flow on the rendered emoji, in pixel space, on CPU or GPU.

    python -m research.bundled.train --out /work/runs/demo --steps 6000 --minutes 90
    python -m research.bundled.train --out /work/runs/demo --resume     # continue after a stop
    python -m research.bundled.train --out /work/runs/scenes --dataset scenes --steps 8000

``--dataset scenes`` trains on emoji composited on the fly at a random position and size on a
palette background (:mod:`research.bundled.scenes`), never drawing the held-out tenth of scenes.

The flow follows FLUX's convention: ``x_t = (1 - t) x_0 + t noise``, target ``noise - x_0``, t = 1
is noise. Times are drawn logit-normal (with a uniform share so both ends are seen) and pushed
through the same resolution shift the sampling grid uses. The run is deterministic for a seed:
one generator draws batches, times and noise, and its state is checkpointed, so a resumed run
continues exactly where it stopped. Loss goes to ``log.jsonl``; the EMA weights are exported with
``save_pretrained`` to ``OUT/weights`` at every checkpoint.

Threads default to 1: the model is tiny, and on a shared, busy CPU a second OpenMP thread spins
at every barrier while the first waits for a core, which was measured 10-30 times slower.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fireflow._io import atomic_write
from fireflow.models._pipeline import shift_mu
from fireflow.models.demo import PATCH, MiniLMEncoder, grid_ids, pack, transformer_config
from fireflow.models.flux import FLUX_DEV_SCHEDULER
from research.bundled import emoji as emoji_data


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in the checkpoint so ``--resume`` needs only ``--out``."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.02
    warmup: int = 200
    weight_decay: float = 0.0
    ema: float = 0.999
    seed: int = 0
    uniform_share: float = 0.25
    model: dict = field(default_factory=transformer_config)
    data: str = str(emoji_data.DATA_FILE)
    #: "emoji" (the fixed rendered set in ``data``) or "scenes" (composited on the fly,
    #: :mod:`research.bundled.scenes`; ``data`` is then unused).
    dataset: str = "emoji"


class Trainer:
    """One training run: model, EMA copy, optimiser, data and the run's random generator."""

    config_cls = TrainConfig

    def __init__(self, cfg: TrainConfig, device: torch.device):
        from diffusers import FluxTransformer2DModel

        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed)  # parameter init
        self.model = FluxTransformer2DModel(**cfg.model).to(device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay
        )
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.step = 0

        self.setup_data()
        embeds, pooled = MiniLMEncoder()(self.prompts)  # frozen: encode once
        self.embeds, self.pooled = embeds.to(device), pooled.to(device)
        self.txt_ids = torch.zeros(self.embeds.shape[1], 3, device=device)

    def setup_data(self) -> None:
        """Set ``source`` (or the fixed tokens ``x0``), ``prompts``, ``img_ids`` and ``e_mu`` (the
        time shift) for ``cfg.dataset``; a subclass training on other data overrides it."""
        cfg, device = self.cfg, self.device
        if cfg.dataset == "scenes":
            from research.bundled import scenes

            self.source = scenes.SceneSource()
            self.prompts = list(self.source.prompts)
            side = scenes.RESOLUTION
            self.x0 = None
        elif cfg.dataset == "emoji":
            self.source = None
            emoji = emoji_data.load(cfg.data)
            self.prompts = emoji.prompts
            pixels = torch.from_numpy(emoji.pixels())
            self.x0 = pack(pixels).to(device)  # [N, L, C]
            side = pixels.shape[-1]
        else:
            raise ValueError(f"unknown dataset {cfg.dataset!r} (emoji or scenes)")
        self.img_ids = grid_ids(side // PATCH, side // PATCH).to(device)
        self.e_mu = math.exp(shift_mu((side // PATCH) ** 2, FLUX_DEV_SCHEDULER))

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
        cfg = self.cfg
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        p = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))

    def sample_t(self, n: int, gen: torch.Generator) -> torch.Tensor:
        u = torch.sigmoid(torch.randn(n, generator=gen))
        uniform = torch.rand(n, generator=gen)
        u = torch.where(torch.rand(n, generator=gen) < self.cfg.uniform_share, uniform, u)
        return self.e_mu / (self.e_mu + (1 / u.clamp(1e-5, 1) - 1))  # the grid's shift

    def draw(self, b: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of ``b`` drawn with ``gen``: tokens ``[b, L, C]`` and prompt indices ``[b]``."""
        if self.source is None:
            idx = torch.randint(len(self.prompts), (b,), generator=gen).to(self.device)
            return self.x0[idx], idx
        # a fresh composited batch, drawn with the same generator
        pixels, idx = self.source.batch(b, gen)
        return pack(pixels).to(self.device), idx.to(self.device)

    def loss(self, model: torch.nn.Module, b: int, gen: torch.Generator) -> torch.Tensor:
        """Flow-matching loss of ``model`` on a batch of ``b`` drawn with ``gen``."""
        x0, idx = self.draw(b, gen)
        t = self.sample_t(b, gen).to(self.device)
        noise = torch.randn(x0.shape, generator=gen).to(self.device)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        pred = model(
            hidden_states=xt,
            encoder_hidden_states=self.embeds[idx],
            pooled_projections=self.pooled[idx],
            timestep=t,
            img_ids=self.img_ids,
            txt_ids=self.txt_ids,
            return_dict=False,
        )[0]
        return torch.nn.functional.mse_loss(pred.float(), noise - x0)

    @torch.no_grad()
    def eval_loss(self, b: int = 256, seed: int = 1234, ema: bool = True) -> float:
        """Loss on a fixed batch (its own generator): comparable between steps, unlike the
        training loss whose batches and times differ every step."""
        return self.loss(self.ema if ema else self.model, b, torch.Generator().manual_seed(seed)).item()

    def train_step(self) -> float:
        cfg = self.cfg
        loss = self.loss(self.model, cfg.batch_size, self.gen)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        with torch.no_grad():
            # EMA warms up (1 - 1/(step+1) early on) so early exports are not stuck near init.
            d = min(cfg.ema, (1 + self.step) / (10 + self.step))
            for pe, pm in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                pe.lerp_(pm, 1 - d)
        self.step += 1
        return loss.item()

    def state_dict(self) -> dict:
        return {
            "config": asdict(self.cfg),
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "gen": self.gen.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])

    def save(self, out: Path) -> None:
        """Checkpoint (atomic) and export the EMA weights for the adapter (atomic folder swap)."""
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "checkpoint.pt", lambda f: torch.save(self.state_dict(), f))
        export_weights(self.ema, out / "weights", self.export_files())

    def export_files(self) -> dict[str, str]:
        """Extra text files (name -> content) exported beside the weights; none here."""
        return {}


def export_weights(model: torch.nn.Module, folder: Path, files: dict[str, str] | None = None) -> None:
    """``save_pretrained`` (and ``files``, name -> text) into a temp folder beside ``folder``,
    then swap it in."""
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".weights-"))
    model.save_pretrained(tmp)
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)
    for f in [tmp, *tmp.iterdir()]:  # mkdtemp makes 0700; the weights are meant to be shipped
        f.chmod(0o755 if f.is_dir() else 0o644)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(
    out: Path,
    cfg: TrainConfig | None = None,
    resume: bool = False,
    minutes: float | None = None,
    steps: int | None = None,
    until: int | None = None,
    log_every: int = 50,
    ckpt_every: int = 250,
    device: str | torch.device | None = None,
    trainer_cls: type[Trainer] = Trainer,
) -> Trainer:
    """Run (or resume) training to ``cfg.steps`` (``steps`` overrides it), checkpointing on exit.

    Stops early, with a checkpoint to resume from, after ``minutes`` of wall time or at step
    ``until``; the schedule stays that of the whole run, so a resumed run matches an unbroken one.
    ``trainer_cls`` (a :class:`Trainer` subclass, with its config class as ``config_cls``) trains
    other data or models.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = out / "checkpoint.pt"
    state = None
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        cfg = trainer_cls.config_cls(**state["config"])
    elif resume:
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
    cfg = cfg or trainer_cls.config_cls()
    if steps is not None:  # extend (or shorten) a run; the cosine schedule stretches with it
        cfg.steps = steps
    trainer = trainer_cls(cfg, device)
    if state is not None:
        trainer.load_state_dict(state)
        print(f"resumed at step {trainer.step} from {ckpt}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    print(
        f"{n_params / 1e6:.2f}M parameters, {len(trainer.prompts)} prompts ({cfg.dataset}), device {device}",
        flush=True,
    )
    start, losses = time.time(), []
    while trainer.step < cfg.steps:
        losses.append(trainer.train_step())
        stop = minutes is not None and time.time() - start > minutes * 60
        stop |= until is not None and trainer.step >= until
        if trainer.step % log_every == 0 or trainer.step == cfg.steps:
            rec = {
                "step": trainer.step,
                "loss": sum(losses) / len(losses),
                "lr": trainer.lr_at(trainer.step - 1),
                "elapsed_s": round(time.time() - start, 1),
            }
            _append_jsonl(out / "log.jsonl", rec)
            print(json.dumps(rec), flush=True)
            losses = []
        if trainer.step % ckpt_every == 0 or trainer.step == cfg.steps or stop:
            trainer.save(out)
        if stop:
            print(f"stopped at step {trainer.step} of {cfg.steps}; --resume continues", flush=True)
            break
    return trainer


def main() -> None:
    p = argparse.ArgumentParser(description="Train the FireFlow demo model on rendered emoji.")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, log.jsonl, weights/")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget for this invocation")
    p.add_argument("--steps", type=int, default=None, help=f"total steps (default {TrainConfig.steps})")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    p.add_argument("--dataset", choices=["emoji", "scenes"], default="emoji", help="emoji set or composited scenes")
    p.add_argument("--ckpt-every", type=int, default=250, help="steps between checkpoints and EMA exports")
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--layers", type=int, default=1, help="double-stream blocks")
    p.add_argument("--single-layers", type=int, default=8, help="single-stream blocks")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (see the module docstring)")
    p.add_argument("--device", default=None)
    args = p.parse_args()
    # Before any thread pool exists, so every worker thread inherits it: denormals in small Adam
    # states and activations slow CPUs down severalfold.
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        seed=args.seed,
        dataset=args.dataset,
        model=transformer_config(args.layers, args.single_layers, args.heads, args.head_dim),
    )
    t0 = time.time()
    train(
        args.out,
        cfg,
        resume=args.resume,
        minutes=args.minutes,
        steps=args.steps,
        ckpt_every=args.ckpt_every,
        device=args.device,
    )
    print(f"wall time {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()

"""The families benchmark (tier 2 of the GPU figures): every released shape builds, and the
whole path runs at toy size on the CPU, including the memory configurations tried under a cap."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import init_empty_weights

from fireflow.bench import families

#: Published sizes (billions of parameters, as the model cards round them). The configs are typed
#: in from the checkpoints' config.json files; a wrong layer count or width misses these by far more.
PUBLISHED_B = {
    "flux.1-dev": 12,
    "sd3.5-medium": 2.5,
    "sd3.5-large": 8.1,
    "flux2-klein-4b": 4,
    "flux2-klein-9b": 9,
    "flux2-dev": 32,
    "chroma1-hd": 8.9,
    "qwen-image": 20,
    "wan2.1-1.3b": 1.3,
    "wan2.1-14b": 14,
    "z-image-turbo": 6,
}


def test_every_family_has_released_shapes():
    from fireflow.models import FAMILY_MODULES

    names = families.released()
    assert set(names) == set(PUBLISHED_B)
    served = {m.transformer for m in names.values()}
    assert len(served) == len(FAMILY_MODULES)  # one transformer class per family, each listed


@pytest.mark.parametrize("name", sorted(PUBLISHED_B))
def test_released_configs_build_at_their_published_size(name):
    import diffusers

    model = families.released()[name]
    with init_empty_weights():  # the meta device: shapes only, no memory
        transformer = getattr(diffusers, model.transformer)(**model.config)
    billions = sum(p.numel() for p in transformer.parameters()) / 1e9
    assert billions == pytest.approx(PUBLISHED_B[name], rel=0.12), billions


def _run(tmp_path, *argv: str) -> list[dict]:
    args = ["--tiny", "--device", "cpu", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path), *argv]
    assert families.main(args) == 0
    return json.loads((tmp_path / "speed-families.json").read_text())["records"]


def test_every_released_model_edits_at_toy_size(tmp_path):
    records = _run(tmp_path)
    edits = {r["model"]: r for r in records if r["kind"] == "edit"}
    assert set(edits) == set(PUBLISHED_B)
    for name, r in edits.items():
        assert r["finite"] and r["s"] > 0, r
        # 18 calls for an 8-step edit; where CFG takes a second call (not batched), the 9 calls of
        # denoising double: 27.
        assert r["nfe"] in (18, 27), (name, r["nfe"])
    # Two latent cells a side (Wan's multiple is 16 pixels), 5 frames: 2 latent frames.
    assert edits["wan2.1-1.3b"]["size"] == "32x32x5" and edits["wan2.1-1.3b"]["latent_shape"] == [1, 16, 2, 4, 4]


def test_a_cap_below_the_weights_goes_to_fp8_and_offloading(tmp_path):
    # The toy weights are about 1e-4 GiB: a 1e-5 GiB cap rules out the native and fp8 weights by
    # their size alone, so the edit runs with fp8 weights offloaded by groups (on the CPU: to itself).
    records = _run(tmp_path, "--models", "sd3.5-medium", "--fit", "1e-5")
    by = {(r["kind"], r.get("fit")): r for r in records}
    assert by[("no fit", "native")]["error"].startswith("weights alone")
    assert by[("no fit", "fp8")]["error"].startswith("weights alone")
    fitted = by[("fit", "fp8+group")]
    assert fitted["weights"] == "fp8" and fitted["offload"] == "group" and fitted["s"] > 0


class _FakeEdit:
    """What ``fit`` needs of a model: its weights per configuration and the configurations applied."""

    device = torch.device("cpu")

    def __init__(self, oom: set[str]):
        self.applied: list[str] = []
        self.oom = oom
        self.calls = 0
        self.last = None

    def weights_gib(self, config: str) -> float:
        return {"native": 12.0, "fp8": 6.0}.get(config, 0.0)

    def apply(self, config: str) -> None:
        self.applied.append(config)

    def edit(self):
        current = (["native", *self.applied])[-1]
        if current in self.oom:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.calls += 18
        self.last = torch.zeros(1)
        return self.last


def test_fit_takes_the_first_configuration_that_runs_under_each_cap():
    args = families.parse_args(["--fit", "14", "22", "--warmup", "0", "--repeats", "1"])
    fake = _FakeEdit(oom={"native"})  # the native weights fit 22 GiB, but not with the activations
    out = families.fit(fake, args, {"model": "m"})
    summary = [(r["memory_limit_gib"], r["kind"], r["fit"]) for r in out]
    # Largest cap first; the smaller cap starts from what fitted the larger one.
    assert summary == [(22, "no fit", "native"), (22, "fit", "fp8"), (14, "fit", "fp8")]
    assert "out of memory" in out[0]["error"] and fake.applied == ["fp8"]
    assert out[1]["nfe"] == 18 and out[1]["finite"]  # the calls of one edit, counted over the timed runs
    # Video: the stored features are what is left to move off the card.
    fake = _FakeEdit(oom={"native", "fp8", "fp8+group"})
    out = families.fit(fake, families.parse_args(["--fit", "8"]), {"model": "m"})
    assert [(r["kind"], r["fit"]) for r in out] == [
        ("no fit", "native"),  # by its weights alone: not run
        ("no fit", "fp8"),
        ("no fit", "fp8+group"),
        ("fit", "fp8+group+cpu-features"),
    ]
    assert out[-1]["feature_device"] == "cpu" and fake.applied == ["fp8", "fp8+group", "fp8+group+cpu-features"]
    fake = _FakeEdit(oom=set(families.FIT_CONFIGS))
    out = families.fit(fake, families.parse_args(["--fit", "8"]), {"model": "m"})
    assert out[-1]["kind"] == "no fit" and "none of" in out[-1]["error"]


def test_unknown_model_and_bad_caps_are_refused(capsys):
    for argv in (["--models", "sd4"], ["--fit", "-1"], ["--repeats", "0"]):
        with pytest.raises(SystemExit) as e:
            families.parse_args(argv)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown model 'sd4'; accepted: flux.1-dev" in err and "--fit takes positive GiB" in err
    assert "--repeats takes 1 or more" in err


def test_released_widths_run_shallow(tmp_path):
    # The released configs' widths (text, pooled, channels, heads) with one block of each kind: the
    # conditioning's shapes must fit the real model, not only the tiny one. The two cheapest here;
    # docs/speed.md gives the command that checks all of them (about 4 minutes).
    argv = ["--models", "sd3.5-medium", "wan2.1-1.3b", "--layers", "1", "--height", "32", "--width", "32"]
    argv += ["--num-frames", "5", "--text-len", "8", "--device", "cpu", "--warmup", "0", "--repeats", "1"]
    assert families.main([*argv, "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "speed-families.json").read_text())["records"]
    assert [(r["model"], r["kind"], r["finite"], r["layers"]) for r in records] == [
        ("sd3.5-medium", "edit", True, 1),
        ("wan2.1-1.3b", "edit", True, 1),
    ]
    assert records[1]["latent_shape"] == [1, 16, 2, 4, 4] and records[0]["latent_shape"] == [1, 16, 4, 4]

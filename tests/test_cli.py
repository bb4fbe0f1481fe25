"""The fireflow command: an end-to-end edit on a real photo, and every bad input refused cleanly."""

import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from fireflow.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, cwd=None):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return subprocess.run(
        [sys.executable, "-m", "fireflow", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def test_edit_end_to_end_on_boy_jpg(tiny_flux_dir, boy_jpg, tmp_path):
    out = tmp_path / "edited.png"
    rec = tmp_path / "rec.png"
    r = run_cli(
        "edit",
        boy_jpg,
        "-s",
        "A young boy is playing with a toy airplane",
        "-t",
        "A young boy is playing with a small brown dog",
        "-o",
        str(out),
        "--model",
        str(tiny_flux_dir),
        "--resize",
        "680x384",
        "--save-reconstruction",
        str(rec),
    )
    assert r.returncode == 0, r.stderr
    assert "18 NFE" not in r.stdout and "27 NFE" in r.stdout  # 9 inversion + 9 edit + 9 reconstruction
    assert "fireflow, 8 steps, 2 block calls injected" in r.stdout
    assert Image.open(out).size == (672, 384) and Image.open(rec).size == (672, 384)
    assert "inversion" in r.stderr and "editing" in r.stderr  # progress bars


def test_generate_reconstruct_invert(tiny_flux_dir, tmp_path):
    src = tmp_path / "src.png"
    Image.new("RGB", (40, 33), "red").save(src)
    m = ["--model", str(tiny_flux_dir), "-q"]
    assert (
        main(
            [
                "generate",
                "-p",
                "a cat",
                "-o",
                str(tmp_path / "g.png"),
                "--height",
                "32",
                "--width",
                "48",
                "--steps",
                "2",
                *m,
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "g.png").size == (48, 32)
    assert (
        main(
            [
                "reconstruct",
                str(src),
                "-p",
                "red",
                "-o",
                str(tmp_path / "r.png"),
                "--steps",
                "3",
                "--solver",
                "euler",
                *m,
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "r.png").size == (32, 32)
    assert main(["invert", str(src), "-p", "red", "-o", str(tmp_path / "z.safetensors"), *m]) == 0
    from safetensors import safe_open

    with safe_open(tmp_path / "z.safetensors", "pt") as f:
        assert f.get_tensor("latents").shape == (1, 4, 16) and f.metadata()["prompt"] == "red"


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (48, 48), "blue").save(path)
    return path


@pytest.mark.parametrize(
    "args,message",
    [
        (["{missing}"], "not found"),
        (["{text}"], "is not a readable image"),
        (["{image}", "--inject", "9"], "--inject must be between 0 and the step count 8, got 9"),
        (["{image}", "--strategy", "swap_v"], "--strategy: unknown strategy 'swap_v'"),
        (["{image}", "--strategy", "replace_v replace_v"], "repeats V"),
        (
            ["{image}", "--blocks", "0-40"],
            "--blocks: single block 0-40 out of range; this model has single blocks 0..1",
        ),  # noqa: E501
        (["{image}", "--blocks", "0-100000000"], "single block 0-100000000 out of range"),
        (["{image}", "--blocks", "5-2"], "--blocks '5-2': range '5-2' is reversed; write 2-5"),
        (["{image}", "--blocks", "double:1"], "double block 1 out of range; this model has double blocks 0..0"),
        (["{image}", "--blocks", "x"], "--blocks 'x': bad item 'x'"),
        (["{image}", "--guidance", "nan"], "--guidance must be a finite number between 0 and 100, got nan"),
        (["{image}", "--guidance", "inf"], "--guidance must be a finite number between 0 and 100, got inf"),
        (["{image}", "--inversion-guidance=-1e6"], "--inversion-guidance must be a finite number"),
        (["{image}", "--ratios", "1,1,nan"], "--ratios must be a finite number between 0 and 10"),
        (["{image}", "--steps", "0"], "--steps must be between 1 and 1000, got 0"),
        (["{image}", "--device", "tpu"], "unknown --device 'tpu'; accepted: cpu, cuda, cuda:N, mps"),
        (["{image}", "--device", "cuda"], "--device 'cuda' asked for, but this machine has no CUDA GPU"),
        (["{image}", "--device", "gpu"], "unknown --device 'gpu'"),
        (["{image}", "--feature-device", "cdua"], "unknown --feature-device 'cdua'"),
        (["{image}", "-t", " "], "target prompt is empty"),
        (["{image}", "--model", "{tmp}/no-such-model"], "no such folder"),
        (["{image}", "--model", "{tmp}"], "not a diffusers model (no model_index.json or config.json)"),
        (["{image}", "--model", "{tmp}/corrupt"], "model_index.json is not valid JSON"),
        (["{image}", "--model", "{tmp}/noweights"], "transformer has no weights (*.safetensors or *.bin)"),
        (["{image}", "--model", "{tmp}/unknown"], "KandinskyPipeline is not a supported model; supported:"),
        (["{image}", "-o", "{tmp}/out.txt"], "must end in one of .png"),
        (["{image}", "-o", "{tmp}/adir.png"], "-o '{tmp}/adir.png' is a folder"),
        (["{image}", "-o", "{tmp}/same.png", "--save-reconstruction", "{tmp}/same.png"], "is the same file as -o"),
        (["{image}", "-o", "{image}"], "is the same file as the input image"),
        (["{image}", "--paste-pixels"], "--paste-pixels needs --mask"),
        (["{image}", "--mask", "{tmp}/nomask.png"], "mask '{tmp}/nomask.png' not found"),
        (["{image}", "--mask", "{black}"], "mask selects nothing (all black)"),
    ],
)
def test_bad_input_one_line_error_no_output(args, message, image, tmp_path, tiny_flux_dir, capsys):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "adir.png").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "model_index.json").write_text("{ not json")
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    if "{tmp}/noweights" in args:
        shutil.copytree(tiny_flux_dir, tmp_path / "noweights")
        for f in (tmp_path / "noweights" / "transformer").glob("*.safetensors"):
            f.unlink()
    Image.new("L", (8, 8), 0).save(tmp_path / "black.png")
    subs = {
        "{missing}": str(tmp_path / "missing.jpg"),
        "{text}": str(tmp_path / "notes.txt"),
        "{image}": str(image),
        "{black}": str(tmp_path / "black.png"),
        "{tmp}": str(tmp_path),
    }
    args = [subs.get(a, a.replace("{tmp}", str(tmp_path))) for a in args]
    message = message.replace("{tmp}", str(tmp_path))
    if "-t" not in args:
        args += ["-t", "a red square"]
    if "--model" not in args:
        args += ["--model", str(tiny_flux_dir)]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out.png")]
    before = set(os.listdir(tmp_path))
    code = main(["edit", *args[:1], "-s", "a blue square", *args[1:], "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and err.startswith("fireflow edit: error:") and len(err.splitlines()) == 1
    assert set(os.listdir(tmp_path)) == before  # no output, no temporary file


def test_bad_option_types_exit_nonzero(image, capsys):
    with pytest.raises(SystemExit) as e:
        main(["edit", str(image), "-s", "a", "-t", "b", "--resize", "big"])
    assert e.value.code == 2 and "bad size 'big'" in capsys.readouterr().err


def test_long_prompt_is_truncated_quietly(image, tmp_path, tiny_flux_dir, capfd):
    prompt = " ".join(["word"] * 10_000)
    out = tmp_path / "long.png"
    code = main(["edit", str(image), "-s", prompt, "-t", "a red square", "--model", str(tiny_flux_dir), "-o", str(out)])
    err = capfd.readouterr().err
    assert code == 0 and out.is_file()
    assert "truncated" not in err and len(err) < 5_000  # was 800 KB of warnings


@pytest.mark.parametrize(
    "args,message",
    [
        (["--height", "0"], "--height must be a positive number of pixels, got 0"),
        (["--height", "17"], "--height 17 is not accepted; this model takes multiples of 16 (>= 16)"),
        (["--width", "40"], "--width 40 is not accepted; this model takes multiples of 16"),
        (["--steps", "2", "--solver", "rk4"], "invalid choice: 'rk4'"),
        (["--seed", "-1"], "--seed must be a whole number from 0 to 2**63 - 1, got -1"),
    ],
)
def test_generate_refuses_sizes_the_model_cannot_make(args, message, tmp_path, tiny_flux_dir, capsys):
    out = tmp_path / "g.png"
    argv = ["generate", "-p", "a cat", "--model", str(tiny_flux_dir), "-o", str(out), "-q", *args]
    if "rk4" in args:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    else:
        assert main(argv) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_the_old_double_blocks_flag_is_refused(image, capsys):
    with pytest.raises(SystemExit) as e:
        main(["edit", str(image), "-s", "a", "-t", "b", "--double-blocks", "all"])
    assert e.value.code == 2 and "unrecognized arguments: --double-blocks" in capsys.readouterr().err


def test_a_bare_transformer_folder_is_refused_before_loading(tiny_flux_dir, boy_jpg, tmp_path, capsys):
    """A diffusers transformer folder (config.json, no model_index.json) serves the latent-level API;
    the CLI's image commands need the whole pipeline and say so in one line, before any load."""
    folder = tiny_flux_dir / "transformer"
    out = tmp_path / "x.png"
    assert main(["edit", boy_jpg, "-s", "a boy", "-t", "a girl", "--model", str(folder), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "is a bare FluxTransformer2DModel folder" in err and "latent-level API" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_bare_transformer_folder_loads_for_the_latent_api(tiny_flux_dir):
    import torch

    from fireflow import FireFlowEditor
    from fireflow.models.flux import FluxAdapter

    editor = FireFlowEditor.from_pretrained(tiny_flux_dir / "transformer", device="cpu", torch_dtype="fp32")
    assert type(editor.adapter) is FluxAdapter and editor.adapter.pipe is None  # FLUX.1's family, not the demo's
    noise = torch.randn(1, 4, 16)
    x = editor.sample_latents(noise, 32, 32, num_steps=2, prompt_embeds=torch.randn(1, 7, 32),
                              pooled_prompt_embeds=torch.randn(1, 32))  # fmt: skip
    assert x.shape == noise.shape and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="this editor has no VAE"):
        editor.edit(Image.new("RGB", (32, 32)), "a", "b")

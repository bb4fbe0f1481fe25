"""Careless and hostile input to the fireflow command and the editor API: every refusal is one line
(exit 2 on the command, a ValueError/TypeError naming the argument in the API), found before any
model loads or runs; an output that cannot be written is one line and exit 1, with no partial file."""

import errno
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import fireflow.cli
from fireflow.cli import main
from fireflow.image import ImageError, load_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDIT = ["-s", "lemon, gray background", "-t", "tangerine, gray background", "--model", "demo", "-q"]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    return {**env, **extra}


def run_cli(*args, cwd, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "fireflow", *args], cwd=cwd, env=env or _env(), timeout=300, **kw)


@pytest.fixture
def src(tmp_path):
    """A 32x32 noise image (its PNG is kilobytes, whatever the demo model makes of it)."""
    path = tmp_path / "src.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded: the refusal must come first."""

    def load(*_a, **_k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(fireflow.cli, "load_editor", load)


def refused(argv: list[str], capsys) -> str:
    """Run the command; assert exit 2 with one line on stderr; return that line."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's refusals
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"fireflow {argv[0]}: error:"), err
    assert "Traceback" not in err
    return err


def files(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ---- 1. an attention backend that cannot run here ------------------------------------------------
def test_attention_backend_unusable_here_is_refused_before_the_model_loads(src, tmp_path, capsys, no_model):
    from diffusers.models import attention_dispatch

    if attention_dispatch._CAN_USE_FLASH_ATTN:
        pytest.skip("flash-attn is installed here")
    out = tmp_path / "o.png"
    err = refused(["edit", str(src), *EDIT, "--attention-backend", "flash", "-o", str(out)], capsys)
    assert "--attention-backend 'flash' cannot run here" in err and "flash-attn" in err
    err = refused(["edit", str(src), *EDIT, "--attention-backend", "bogus", "-o", str(out)], capsys)
    assert "--attention-backend 'bogus' is not a diffusers backend; accepted:" in err and "native" in err
    assert not out.exists()


# ---- 2. generate at a size past every limit --------------------------------------------------------
def test_generate_huge_size_is_refused_naming_the_sizes(tmp_path, capsys, no_model):
    out = tmp_path / "g.png"
    err = refused(
        ["generate", "-p", "x", "--model", "demo", "-q", "--height", "100000", "--width", "100000", "-o", str(out)],
        capsys,
    )
    assert "--height 100000 --width 100000: 10000000000 pixels, more than the limit of 16777216" in err
    err = refused(["generate", "-p", "x", "--model", "demo", "--max-pixels", "0", "-o", str(out)], capsys)
    assert "argument --max-pixels: '0': must be a positive whole number of pixels" in err
    assert not out.exists()


def test_generate_size_from_the_model_default_is_checked_after_the_load(tmp_path, capsys):
    """One side given: the other is the model's, known once it loads; still refused before any work."""
    out = tmp_path / "g.png"
    err = refused(
        ["generate", "-p", "x", "--model", "demo", "-q", "--height", "100", "--max-pixels", "1000", "-o", str(out)],
        capsys,
    )
    assert "--height 100 --width 32: 3200 pixels, more than the limit of 1000 (--max-pixels)" in err
    assert not out.exists()


# ---- 3. outputs that cannot be written ---------------------------------------------------------------
@pytest.mark.parametrize(
    "verb,args,out",
    [
        ("edit", EDIT, "o.png"),
        ("reconstruct", ["-p", "lemon", "--model", "demo", "-q"], "r.png"),
        ("invert", ["-p", "lemon", "--model", "demo", "-q"], "z.safetensors"),
        ("generate", ["-p", "lemon", "--model", "demo", "-q"], "g.png"),
    ],
)
def test_a_full_disk_is_one_line_exit_1_and_no_partial_file(verb, args, out, src, tmp_path, capsys, monkeypatch):
    def full(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("fireflow._io.os.fsync", full)  # the bytes went out; the disk refuses them
    before = files(tmp_path)
    argv = [verb, *([] if verb == "generate" else [str(src)]), *args, "-o", str(tmp_path / out)]
    assert main(argv) == 1
    cap = capsys.readouterr()
    assert cap.err.strip() == f"fireflow {verb}: error: cannot write {str(tmp_path / out)!r}: No space left on device"
    assert files(tmp_path) == before and cap.out == ""  # no output, no temporary file, no report


def test_a_file_size_limit_is_one_line_and_no_partial_file(src, tmp_path):
    import resource

    def limit():  # `ulimit -f`: Python ignores SIGXFSZ, so the write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))

    before = files(tmp_path)
    r = run_cli("edit", str(src), *EDIT, "-o", "o.png", cwd=tmp_path, preexec_fn=limit, capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == "fireflow edit: error: cannot write 'o.png': File too large"
    assert files(tmp_path) == before


def test_several_targets_are_written_all_or_none(src, tmp_path, capsys, monkeypatch):
    import fireflow._io

    real, calls = fireflow._io.os.fsync, []

    def second_fails(fd):  # the first target's image is written whole; the second's disk is full
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr("fireflow._io.os.fsync", second_fails)
    before = files(tmp_path)
    argv = ["edit", str(src), *EDIT, "-t", "orange", "-o", str(tmp_path / "o.png")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"fireflow edit: error: cannot write {str(tmp_path / 'o-1.png')!r}: No space left on device"
    assert files(tmp_path) == before  # not o-0.png either, and no hidden part files
    monkeypatch.setattr("fireflow._io.os.fsync", real)
    assert main(argv) == 0
    assert files(tmp_path) - before == {"o-0.png", "o-1.png"}


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_stdout_on_a_full_device_is_one_line_without_traceback(src, tmp_path):
    with open("/dev/full", "w") as full:
        r = run_cli(
            "edit", str(src), *EDIT, "-o", "o.png", cwd=tmp_path, stdout=full, stderr=subprocess.PIPE, text=True
        )
    assert r.returncode == 1
    assert r.stderr.strip() == "fireflow edit: error: cannot write to stdout: No space left on device"
    assert Image.open(tmp_path / "o.png").size == (32, 32)  # the edit itself was written whole


# ---- 4. float and wide-integer images ----------------------------------------------------------------
@pytest.mark.parametrize(
    "values,dtype,mode,expected",
    [
        (0.5, np.float32, "F", 128),  # a float TIFF in [0, 1]: was black
        (1.0, np.float32, "F", 255),
        (128.0, np.float32, "F", 128),  # float holding 0..255
        (32768.0, np.float32, "F", 128),  # float holding 0..65535
        (32768, np.uint16, "I;16", 128),
        (200, np.uint16, "I;16", 1),  # a dark 16-bit image stays dark (was read as 8-bit: 200)
        (128, np.int32, "I", 128),
        (32768, np.int32, "I", 128),
    ],
)
def test_float_and_16_bit_tiffs_are_scaled_by_their_range(values, dtype, mode, expected, tmp_path):
    path = tmp_path / "x.tiff"
    Image.fromarray(np.full((8, 8), values, dtype)).save(path)
    assert Image.open(path).mode == mode
    assert load_image(path).getpixel((3, 3)) == (expected,) * 3


@pytest.mark.parametrize(
    "value,dtype,message",
    [
        (np.nan, np.float32, "contains NaN or infinite values"),
        (np.inf, np.float32, "contains NaN or infinite values"),
        (-1.0, np.float32, "has float values from -1 to 0.5; accepted: 0..1 (float), 0..255 or 0..65535"),
        (100000, np.int32, "has 32-bit integer values from 0 to 100000; accepted"),
    ],
)
def test_unreadable_float_tiffs_are_refused_in_one_line(value, dtype, message, tmp_path, src, capsys, no_model):
    arr = np.full((8, 8), 0.5 if dtype == np.float32 else 0, dtype)
    arr[0, 0] = value
    path = tmp_path / "bad.tiff"
    Image.fromarray(arr).save(path)
    err = refused(["edit", str(path), *EDIT, "-o", str(tmp_path / "o.png")], capsys)
    assert f"image {str(path)!r} {message}" in err
    assert not (tmp_path / "o.png").exists()


# ---- 5. an output that is one of the inputs -----------------------------------------------------------
@pytest.mark.parametrize(
    "argv,message",
    [
        (["invert", "{tmp}/x.safetensors", "-p", "a", "-o", "{tmp}/x.safetensors"], "same file as the input image"),
        (["reconstruct", "{src}", "-p", "a", "-o", "{src}"], "same file as the input image"),
        (["edit", "{src}", "-s", "a", "-t", "b", "-o", "{src}"], "same file as the input image"),
        (["edit", "{src}", "-s", "a", "-t", "b", "--mask", "{tmp}/m.png", "-o", "{tmp}/m.png"], "same file as --mask"),
        (["edit", "{src}", "-s", "a", "-t", "b", "--mask", "{tmp}/m.png", "--save-mask", "{src}"], "the input image"),
    ],
)
def test_an_output_naming_an_input_is_refused_and_the_input_kept(argv, message, src, tmp_path, capsys, no_model):
    (tmp_path / "x.safetensors").write_bytes(src.read_bytes())  # an image whatever its name
    Image.new("L", (32, 32), 255).save(tmp_path / "m.png")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    argv = [a.replace("{src}", str(src)).replace("{tmp}", str(tmp_path)) for a in argv]
    err = refused([*argv, "--model", "demo", "-q"], capsys)
    assert message in err and "give each output its own path" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# ---- 6. a locale that cannot show the output's name ----------------------------------------------------
def test_non_ascii_output_and_prompts_in_an_ascii_locale(src, tmp_path):
    """LC_ALL=C without UTF-8 mode: argv's non-ASCII bytes arrive as surrogates and stdout is ASCII.
    The edit runs, the file has its name, the report escapes what it cannot show."""
    env = _env(LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONIOENCODING="ascii", PYTHONCOERCECLOCALE="0")
    r = run_cli(
        "edit",
        str(src),
        "-s",
        "🍋 lemon",
        "-t",
        "🍊 tangerine",
        "--model",
        "demo",
        "-q",
        "-o",
        "résultat.png",
        cwd=tmp_path,
        env=env,
        capture_output=True,
    )
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert Image.open(tmp_path / "résultat.png").size == (32, 32)
    assert r.stdout.decode("ascii").strip().endswith("-> r\\udcc3\\udca9sultat.png") and r.stderr == b""


# ---- 7, 8. a folder given as an image, a file given as a model ------------------------------------------
@pytest.mark.parametrize(
    "argv,message",
    [
        (["reconstruct", "{tmp}/adir", "-p", "a"], "image '{tmp}/adir' is a folder, not an image file"),
        (["invert", "{tmp}/adir", "-p", "a", "-o", "{tmp}/z.safetensors"], "'{tmp}/adir' is a folder, not an image"),
        (["edit", "{src}", *EDIT[:4], "--mask", "{tmp}/adir"], "mask '{tmp}/adir' is a folder, not an image file"),
        (["edit", "{src}", *EDIT[:4], "--mask", "{tmp}/notes.txt"], "mask '{tmp}/notes.txt' is not a readable image"),
        # edit takes a folder of frames as a video: the refusal says so instead of "not found"
        (["edit", "{tmp}/adir", *EDIT[:4]], "the input '{tmp}/adir' is a folder, read as a video's frames; a video"),
        (
            ["edit", "{src}", *EDIT[:4], "--model", "{tmp}/notes.txt"],
            "model '{tmp}/notes.txt' is a file; accepted: a diffusers model folder, a Hub id in the HF cache, "
            "or one of demo/scenes/scenes-video",
        ),
        (["edit", "{src}", *EDIT[:4], "--model", "Scenes"], "did you mean 'scenes'?"),
        (["edit", "-", *EDIT[:4]], "image '-': reading the image from stdin is not supported"),
        (["reconstruct", "{src}", "-p", " "], "prompt is empty; describe the image with -p"),
    ],
)
def test_folders_files_and_names_get_the_real_reason(argv, message, src, tmp_path, capsys, no_model):
    (tmp_path / "adir").mkdir()
    (tmp_path / "notes.txt").write_text("not an image")
    argv = [a.replace("{src}", str(src)).replace("{tmp}", str(tmp_path)) for a in argv]
    if "--model" not in argv:
        argv += ["--model", "demo"]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "o.png")]
    before = files(tmp_path)
    err = refused([*argv, "-q"], capsys)
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert files(tmp_path) == before


# ---- 9-11. values argparse got wrong, or let through -----------------------------------------------
@pytest.mark.parametrize(
    "flags,message",
    [
        (["--ratios", "-1,1,1"], "--ratios must be a finite number between 0 and 10, got -1.0"),
        (["--guidance", "-1e6"], "--guidance must be a finite number between 0 and 100, got -1000000.0"),
        (["--guidance", "-inf"], "--guidance must be a finite number between 0 and 100, got -inf"),
        (["--max-pixels", "-5"], "argument --max-pixels: '-5': must be a positive whole number of pixels"),
        (["--max-pixels", "abc"], "argument --max-pixels: 'abc': must be a positive whole number of pixels"),
        (["--resize", "big"], "argument --resize: bad size 'big'"),  # argparse's refusals are one line too
    ],
)
def test_negative_and_bad_values_are_refused_for_what_they_are(flags, message, src, tmp_path, capsys, no_model):
    err = refused(["edit", str(src), *EDIT, *flags, "-o", str(tmp_path / "o.png")], capsys)
    assert message in err
    assert not (tmp_path / "o.png").exists()


def test_values_after_double_dash_stay_positional():
    from fireflow.cli import _join_negative_values

    assert _join_negative_values(["--ratios", "-1,1,1", "--", "--x", "-1"]) == ["--ratios=-1,1,1", "--", "--x", "-1"]
    assert _join_negative_values(["-t", "-5", "--seed", "-1"]) == ["-t", "-5", "--seed=-1"]


@pytest.mark.parametrize("seed", ["1180591620717411303424", "-1"])
def test_seed_out_of_range_is_refused_before_the_model_loads(seed, tmp_path, capsys, no_model):
    err = refused(["generate", "-p", "x", "--model", "demo", "--seed", seed, "-o", str(tmp_path / "g.png")], capsys)
    assert f"--seed must be a whole number from 0 to 2**63 - 1, got {seed}" in err


# ---- 12-16. the API: bad input is a ValueError or TypeError naming it, before any model call -------
@pytest.fixture(scope="module")
def editor():
    from fireflow import FireFlowEditor

    return FireFlowEditor.from_pretrained("demo", device="cpu")


@pytest.fixture
def no_model_call(editor, monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("the model was called before the refusal")

    for name in ("encode_image", "encode_prompt", "velocity", "decode"):
        monkeypatch.setattr(editor.adapter, name, boom)
    return editor


IMG = np.zeros((32, 32, 3), np.uint8)


@pytest.mark.parametrize(
    "image,error,message",
    [
        (np.zeros((0, 0, 3)), ValueError, r"array of shape \(0, 0, 3\) is empty"),
        (np.zeros((5, 0)), ValueError, r"array of shape \(5, 0\) is empty"),
        (Image.new("RGB", (0, 0)), ValueError, "image is 0x0: empty"),
        (np.full((32, 32, 3), 128.0), ValueError, r"float arrays must be in \[0, 1\] \(uint8 for 0..255\)"),
        (np.full((32, 32, 3), -0.5), ValueError, r"float arrays must be in \[0, 1\]"),
        (np.full((32, 32, 3), np.nan), ValueError, "image contains NaN or infinite values"),
        (np.full((32, 32), np.inf, np.float32), ValueError, "image contains NaN or infinite values"),
    ],
)
def test_api_refuses_images_it_would_misread(image, error, message, no_model_call):
    with pytest.raises(error, match=message):
        no_model_call.edit(image, "a", "b")


def test_api_float_arrays_a_rounding_error_outside_0_1_are_clipped():
    assert load_image(np.full((2, 2, 3), 1.0 + 1e-7)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.full((2, 2, 3), -1e-7)).getpixel((0, 0)) == (0, 0, 0)
    with pytest.raises(ImageError):
        load_image(np.full((2, 2, 3), 1.01))


@pytest.mark.parametrize(
    "source,target,error,message",
    [
        ("a", None, TypeError, "target_prompt must be a str or a non-empty list of str, got NoneType"),
        ("a", ["b", None], TypeError, "target_prompt must be a str or a non-empty list of str, got NoneType"),
        ("a", 5, TypeError, "target_prompt must be a str or a non-empty list of str, got int"),
        (None, "b", TypeError, "source_prompt must be a str, got NoneType"),
        (["a"], "b", TypeError, "source_prompt must be a str, got list"),
        ("a", [], ValueError, "target_prompt is an empty list; give at least one prompt"),
        ("a", ["b", " "], ValueError, "target_prompt must be non-empty text"),
        ("", "b", ValueError, "source_prompt must be non-empty text"),
    ],
)
def test_api_refuses_prompts_that_are_not_text(source, target, error, message, no_model_call):
    with pytest.raises(error, match=message):
        no_model_call.edit(IMG, source, target)


def test_api_other_verbs_check_their_prompts_and_seed_first(no_model_call):
    for call in (no_model_call.invert, no_model_call.reconstruct):
        with pytest.raises(TypeError, match="prompt must be a str, got NoneType"):
            call(IMG, None)
    with pytest.raises(TypeError, match="prompt must be a str or a non-empty list of str, got NoneType"):
        no_model_call.generate(None)
    with pytest.raises(ValueError, match=r"seed must be a whole number from 0 to 2\*\*63 - 1, got 118059162071741130"):
        no_model_call.generate("a", seed=2**70)

import numpy as np
import pytest
from PIL import Image

from fireflow.image import ImageError, load_image, save_image_atomic, to_pil, to_tensor


def _png(tmp_path, image, name="x.png", **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


@pytest.mark.parametrize(
    "mode,color,expected",
    [
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # transparent goes on white
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("L", 128, (128, 128, 128)),
        ("LA", (0, 0), (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("P", 0, (0, 0, 0)),
    ],
)
def test_modes_become_rgb(tmp_path, mode, color, expected):
    suffix = ".jpg" if mode == "CMYK" else ".png"
    im = load_image(_png(tmp_path, Image.new(mode, (20, 10), color), "x" + suffix))
    assert im.mode == "RGB" and im.size == (20, 10)
    assert np.abs(np.asarray(im)[5, 5].astype(int) - expected).max() <= 2


def test_16_bit_grayscale(tmp_path):
    arr = np.full((8, 8), 65535 // 2, dtype=np.uint16)
    im = load_image(_png(tmp_path, Image.fromarray(arr)))
    assert im.mode == "RGB" and abs(int(np.asarray(im)[0, 0, 0]) - 127) <= 1


def test_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (30, 10), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif.tobytes())
    assert load_image(path).size == (10, 30)


def test_arrays(tmp_path):
    assert load_image(np.zeros((4, 6, 3), np.uint8)).size == (6, 4)
    assert load_image(np.ones((4, 6), np.float32)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.zeros((4, 6, 4), np.uint8)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.full((4, 6, 1), 65535, np.uint16)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ImageError, match=r"shape \(4, 6, 2\)"):
        load_image(np.zeros((4, 6, 2), np.uint8))


def test_bad_files(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(ImageError, match="more than the limit of 100"):
        load_image(Image.new("RGB", (11, 10)), max_pixels=100)


def test_tensor_round_trip():
    im = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    x = to_tensor(im)
    assert x.shape == (1, 3, 4, 4) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(np.asarray(to_pil(x)[0]), np.asarray(im))


def test_atomic_save(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    save_image_atomic(Image.new("RGB", (4, 4)), target)
    assert Image.open(target).size == (4, 4)

    def boom(self, fp, format=None, **kw):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError):
        save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "never.png")
    assert not (tmp_path / "never.png").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary file left
    with pytest.raises(ImageError, match="cannot tell the image format"):
        save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "out.xyz")

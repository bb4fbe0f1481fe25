import re

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
    with pytest.raises(ImageError, match="11x10 = 110 pixels, more than the limit of 100"):
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


# ---- images too large: refused from the header, one message for every size --------------------------
def _png_header(path, width, height):
    """A PNG that claims ``width`` x ``height`` in its header but holds a few bytes of data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )
    return path


def _bmp_header(path, width, height):
    """A BMP header claiming ``width`` x ``height`` (24-bit), with no pixel data after it."""
    import struct

    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    path.write_bytes(b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info)
    return path


TOO_LARGE = r"is (\d+)x(\d+) = (\d+) pixels, more than the limit of (\d+); use a smaller image"


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any image's pixels are decoded."""
    from PIL import ImageFile

    def load(self):
        raise AssertionError(f"decoded a {self.size} image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.parametrize(
    "make,width,height",
    [
        (_png_header, 12000, 10000),  # under Pillow's bomb limit: it would decode 1.26 GB before refusing
        (_png_header, 20000, 20000),  # over Pillow's bomb limit: DecompressionBombError from Image.open
        (_png_header, 4097, 4096),  # one column over the default limit
        (_bmp_header, 30000, 30000),
    ],
)
def test_oversized_files_are_refused_from_the_header(tmp_path, no_decoding, make, width, height):
    from fireflow.image import MAX_PIXELS

    path = make(tmp_path / "big.img", width, height)
    assert path.stat().st_size < 200  # the size is a claim in the header, not data
    with pytest.raises(ImageError, match=TOO_LARGE) as e:
        load_image(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    w, h, n, limit = map(int, re.search(TOO_LARGE, msg).groups())
    assert (w, h, n, limit) == (width, height, width * height, MAX_PIXELS)


def test_pillow_bomb_limit_without_a_limit_of_ours(tmp_path, no_decoding):
    """``max_pixels=None`` lifts our limit; Pillow's bomb error still becomes the same one-line ImageError."""
    path = _png_header(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(ImageError, match=TOO_LARGE) as e:
        load_image(path, max_pixels=None)
    assert re.search(TOO_LARGE, str(e.value)).group(4) == str(2 * Image.MAX_IMAGE_PIXELS)


def test_same_message_for_files_arrays_and_pil_images(tmp_path):
    small = _png(tmp_path, Image.new("RGB", (11, 10)))
    for image in (small, Image.new("RGB", (11, 10)), np.zeros((10, 11, 3), np.uint8)):
        with pytest.raises(ImageError, match=TOO_LARGE) as e:
            load_image(image, max_pixels=100)
        assert re.search(TOO_LARGE, str(e.value)).groups() == ("11", "10", "110", "100")
    assert load_image(small, max_pixels=110).size == (11, 10)  # the limit itself is allowed


def test_truncated_file_is_one_line(tmp_path):
    path = _png(tmp_path, Image.effect_noise((64, 64), 50).convert("RGB"))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(path)


def test_real_photos(boy_jpg, horse_jpg):
    """The committed photos (tests/data) load as the camera JPEGs they are."""
    for path in (boy_jpg, horse_jpg):
        im = load_image(path)
        assert im.mode == "RGB" and im.size == (1360, 768)
        assert np.asarray(im).std() > 20  # a photograph, not a flat picture

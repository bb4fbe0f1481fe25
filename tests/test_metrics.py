"""Metrics against the protocol text (docs/evaluation.md) and hand computations."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from fireflow import metrics as M
from fireflow.bench._tiny import tiny_clip, tiny_dino

# ---- mask decoding -------------------------------------------------------------------------------


def _interior(mask: np.ndarray) -> np.ndarray:
    return mask[1:-1, 1:-1]


def test_mask_runs_are_row_major_starts_and_lengths():
    # index = y * W + x; [13, 4] covers (1, 5), (1, 6), (1, 7) and wraps to (2, 0).
    m = M.decode_pie_mask([13, 4, 42, 1], size=8)
    expected = np.zeros((8, 8), np.uint8)
    expected[1, 5:8] = 1
    expected[2, 0] = 1
    expected[5, 2] = 1
    expected[0, :] = expected[-1, :] = expected[:, 0] = expected[:, -1] = 1
    assert m.dtype == np.uint8
    np.testing.assert_array_equal(m, expected)


def test_mask_border_is_set_on_all_four_sides():
    m = M.decode_pie_mask([], size=512)
    assert m.shape == (512, 512)
    assert m.sum() == 4 * 512 - 4
    assert m[0].all() and m[-1].all() and m[:, 0].all() and m[:, -1].all()
    assert not _interior(m).any()


def test_mask_run_past_the_end_is_clipped():
    m = M.decode_pie_mask([60, 100], size=8)  # 64 pixels: only 60..63 exist
    assert m.reshape(-1)[60:].all()
    assert _interior(m).sum() == 0  # 60..63 lie on the last row, the border
    m = M.decode_pie_mask([27, 1000], size=8)
    flat = m.reshape(-1)
    assert flat[27:].all() and flat.size == 64


def test_mask_rejects_bad_rle():
    with pytest.raises(ValueError, match="odd length 3"):
        M.decode_pie_mask([1, 2, 3], size=8)
    with pytest.raises(ValueError, match="negative"):
        M.decode_pie_mask([-1, 2], size=8)


def test_mask_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    m = (rng.random((16, 16)) > 0.6).astype(np.uint8)
    back = M.decode_pie_mask(M.encode_pie_mask(m), size=16)
    np.testing.assert_array_equal(_interior(back), _interior(m))


# ---- background metrics --------------------------------------------------------------------------


def _flat(value: int, size: int = 32) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


def test_psnr_and_mse_of_a_known_error():
    out = M.background_metrics(_flat(0), _flat(51), np.zeros((32, 32), np.uint8))
    assert out["mse"] == pytest.approx(0.2**2, rel=1e-6)
    assert out["psnr"] == pytest.approx(10 * math.log10(1 / 0.04), rel=1e-6)
    assert set(out) == {"psnr", "mse", "ssim"}


def test_metrics_run_on_the_full_masked_tensors():
    # Edit region: the left half. Only the right half differs after masking, but the mean runs
    # over all 32 x 32 x 3 elements: MSE is half the per-background-pixel error.
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 1
    src = _flat(0)
    edited = _flat(51)
    edited[:, :16] = 200  # inside the edit region: ignored
    out = M.background_metrics(src, edited, mask)
    assert out["mse"] == pytest.approx(0.04 / 2, rel=1e-6)
    assert out["psnr"] == pytest.approx(10 * math.log10(1 / 0.02), rel=1e-6)


def test_identical_background_gives_perfect_scores():
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    edited = src.copy()
    mask = M.decode_pie_mask([100, 300], size=32)
    edited[mask == 1] = 0
    out = M.background_metrics(src, edited, mask)
    assert out["mse"] == 0 and out["ssim"] == pytest.approx(1.0, abs=1e-6) and math.isinf(out["psnr"])


def test_full_mask_gives_nan():
    lp = M.SqueezeLPIPS()
    out = M.background_metrics(_flat(0), _flat(9), np.ones((32, 32), np.uint8), lpips=lp)
    assert set(out) == {"psnr", "mse", "ssim", "lpips"}
    assert all(math.isnan(v) for v in out.values())


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM from its definition: Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03, data range 1,
    'valid' windows only, mean over channels and positions."""
    r = np.arange(11) - 5
    g = np.exp(-(r**2) / (2 * 1.5**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for c in range(3):
        x, y = a[..., c], b[..., c]

        def f(z):
            windows = np.lib.stride_tricks.sliding_window_view(z, (11, 11))
            return np.einsum("ijkl,kl->ij", windows, win)

        mx, my = f(x), f(y)
        sxx, syy, sxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
        vals.append(((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_its_definition_on_masked_images():
    rng = np.random.default_rng(2)
    src = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    edited = np.clip(src.astype(int) + rng.integers(-40, 40, src.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((40, 48), np.uint8)
    mask[10:25, 5:30] = 1
    keep = (1 - mask)[..., None]
    expected = _ssim_reference(src / 255.0 * keep, edited / 255.0 * keep)
    assert M.background_metrics(src, edited, mask)["ssim"] == pytest.approx(expected, abs=2e-5)


def test_ssim_without_border_crop_is_current_torchmetrics():
    tm_image = pytest.importorskip("torchmetrics.functional.image")
    structural_similarity_index_measure = tm_image.structural_similarity_index_measure

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 3, 40, 40, generator=g), torch.rand(1, 3, 40, 40, generator=g)
    tm = structural_similarity_index_measure(a, b, gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=1.0)
    assert M.ssim(a, b, crop_borders=False).item() == pytest.approx(tm.item(), abs=1e-6)
    assert abs(M.ssim(a, b).item() - tm.item()) > 1e-4  # the two conventions do differ


def test_bad_images_are_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="same size"):
        M.background_metrics(_flat(0, 32), _flat(0, 16), np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        M.background_metrics(_flat(0).astype(np.float32), _flat(0), np.zeros((32, 32), np.uint8))


def test_reconstruction_metrics_use_the_whole_image():
    src, rec = _flat(0), _flat(51)
    rec[0, 0] = 0
    out = M.reconstruction_metrics(src, rec)
    n = 32 * 32
    assert out["mse"] == pytest.approx(0.04 * (n - 1) / n, rel=1e-6)


# ---- LPIPS ---------------------------------------------------------------------------------------


def _torchvision_like_state(model: M.SqueezeLPIPS) -> dict[str, torch.Tensor]:
    sd = {k: torch.randn_like(v) * 0.1 for k, v in model.state_dict().items() if k.startswith("features.")}
    sd["classifier.1.weight"] = torch.zeros(1000, 512, 1, 1)  # torchvision's head: ignored
    sd["classifier.1.bias"] = torch.zeros(1000)
    return sd


def test_squeezenet_keys_are_torchvisions():
    keys = [k for k in M.SqueezeLPIPS().state_dict() if k.startswith("features.")]
    assert len(keys) == 2 + 8 * 6
    for k in (
        "features.0.weight",
        "features.3.squeeze.weight",
        "features.4.expand1x1.bias",
        "features.12.expand3x3.weight",
    ):
        assert k in keys


def _heads_file(path) -> None:
    """Random non-negative heads in the ``lpips`` package's format (``lin0.model.1.weight`` ...)."""
    g = torch.Generator().manual_seed(1)
    torch.save(
        {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(M.SqueezeLPIPS.CHANNELS)},
        path,
    )


def test_lpips_taps_and_masked_inputs(tmp_path):
    torch.manual_seed(0)
    model = M.SqueezeLPIPS()
    sq = tmp_path / "squeezenet.pth"
    torch.save(_torchvision_like_state(model), sq)
    _heads_file(tmp_path / "squeeze.pth")
    lp = M.load_lpips(squeezenet=sq, heads=tmp_path / "squeeze.pth")
    torch.testing.assert_close(lp.features[0].weight, torch.load(sq)["features.0.weight"])
    taps = lp._taps(torch.zeros(1, 3, 512, 512))
    assert [t.shape[1] for t in taps] == list(M.SqueezeLPIPS.CHANNELS)
    assert [t.shape[-1] for t in taps] == [255, 127, 63, 31, 31, 31, 31]
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[:32] = 1
    out = M.background_metrics(a, b, mask, lpips=lp)
    keep = torch.from_numpy(1 - mask).float()
    ta = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255 * keep
    tb = torch.from_numpy(b).permute(2, 0, 1)[None].float() / 255 * keep
    assert out["lpips"] == pytest.approx(lp(tb * 2 - 1, ta * 2 - 1).item(), rel=1e-6)
    assert out["lpips"] > 0
    assert M.background_metrics(a, a, mask, lpips=lp)["lpips"] == pytest.approx(0, abs=1e-7)


def test_lpips_by_hand():
    # LPIPS = sum over taps of mean_hw( w . (unit(f_a) - unit(f_b))^2 ), after the scaling layer.
    torch.manual_seed(0)
    lp = M.SqueezeLPIPS()
    for i in range(7):
        getattr(lp, f"lin{i}").model[1].weight.data.uniform_(0, 1)
    a, b = torch.rand(1, 3, 48, 48) * 2 - 1, torch.rand(1, 3, 48, 48) * 2 - 1
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    x, y, total = (a - shift) / scale, (b - shift) / scale, 0.0
    for i, layer in enumerate(lp.features):
        x, y = layer(x), layer(y)
        if i in M.SqueezeLPIPS.TAPS:
            j = M.SqueezeLPIPS.TAPS.index(i)
            w = getattr(lp, f"lin{j}").model[1].weight.view(1, -1, 1, 1)
            ux = x / (x.norm(dim=1, keepdim=True) + 1e-10)
            uy = y / (y.norm(dim=1, keepdim=True) + 1e-10)
            total += ((ux - uy) ** 2 * w).sum(1).mean().item()
    assert lp(a, b).item() == pytest.approx(total, rel=1e-5)


def test_lpips_heads_bundled_with_torchmetrics_load(tmp_path):
    pytest.importorskip("torchmetrics")
    torch.save(_torchvision_like_state(M.SqueezeLPIPS()), tmp_path / "sq.pth")
    lp = M.load_lpips(squeezenet=tmp_path / "sq.pth")  # heads: torchmetrics' squeeze.pth (lpips format)
    assert lp.lin6.model[1].weight.shape == (1, 512, 1, 1) and lp.lin6.model[1].weight.min() >= 0


def test_missing_lpips_weights_name_the_file(tmp_path):
    with pytest.raises(M.MissingWeightsError, match="squeezenet1_1"):
        M.load_lpips(squeezenet=tmp_path / "nope.pth")
    torch.save(_torchvision_like_state(M.SqueezeLPIPS()), tmp_path / "sq.pth")
    with pytest.raises(M.MissingWeightsError, match="linear heads"):
        M.load_lpips(squeezenet=tmp_path / "sq.pth", heads=tmp_path / "nope.pth")


# ---- structure distance --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dino():
    return M.StructureDistance(tiny_dino())


def test_structure_distance_is_zero_for_identical_images(dino):
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    assert dino(a, a) == 0.0
    b = np.roll(a, 64, axis=1)
    assert dino(a, b) > 0


def test_structure_tokens_after_the_resize(dino):
    # Shorter side 224, longer side at most 480, 8 px patches, plus CLS.
    assert dino.num_tokens(512, 512) == 785
    assert dino.keys(np.zeros((512, 512, 3), np.uint8)).shape == (785, 32)
    assert dino.num_tokens(512, 1024) == 1 + 28 * 56
    assert dino.num_tokens(512, 2048) == 1 + 15 * 60  # 896 > 480: long 480, short int(480*224/896)=120
    assert dino.keys(np.zeros((64, 48, 3), np.uint8)).shape[0] == 1 + (298 // 8) * 28


def test_structure_input_is_normalised_on_0_255(dino):
    img = np.zeros((224, 224, 3), np.uint8)
    img[..., 0] = 255
    x = dino.preprocess(img)
    assert x[0, 0, 0, 0].item() == pytest.approx((255 - 0.485) / 0.229, rel=1e-6)
    assert x[0, 1, 0, 0].item() == pytest.approx(-0.456 / 0.224, rel=1e-6)


def test_structure_keys_are_block_11_key_projection(dino):
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    x = dino.preprocess(img)
    model = dino.model
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[11]  # input of block 11
        layer = model.layers[11] if hasattr(model, "layers") else model.encoder.layer[11]
        attn = layer.attention  # transformers 5: attention.k_proj; 4.x: attention.attention.key
        key = attn.k_proj if hasattr(attn, "k_proj") else attn.attention.key
        expected = key(layer.layernorm_before(hidden))[0]
    torch.testing.assert_close(dino.keys(img), expected)
    sim = dino.self_similarity(img)
    assert sim.shape == (785, 785)
    torch.testing.assert_close(sim.diagonal(), torch.ones(785), atol=1e-5, rtol=0)


# ---- CLIP ----------------------------------------------------------------------------------------


def test_clip_score_is_100_cos_clamped_at_zero():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    txt = torch.tensor([[0.6, 0.8], [-1.0, 0.0], [3.0, 4.0]])
    torch.testing.assert_close(M.clip_score_from_features(img, txt), torch.tensor([60.0, 0.0, 100.0]))


def test_clip_whole_and_edited_with_a_tiny_model(tmp_path):
    model, proc = tiny_clip(tmp_path)
    cs = M.ClipScore(model, proc)
    rng = np.random.default_rng(6)
    img = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    text = "a red cat"
    with torch.no_grad():
        pix = proc(images=[img], return_tensors="pt")["pixel_values"]
        tok = proc(text=[text], return_tensors="pt", padding=True)
        fi = M._features(model.get_image_features(pixel_values=pix))
        ft = M._features(model.get_text_features(**tok))
    cos = torch.nn.functional.cosine_similarity(fi, ft).item()
    assert cs([img], [text])[0] == pytest.approx(max(100 * cos, 0.0), rel=1e-5, abs=1e-5)
    whole, edited = cs.whole_and_edited(img, np.ones((48, 40), np.uint8), text)
    assert edited == pytest.approx(whole, rel=1e-6)
    mask = M.decode_pie_mask([0, 0], size=(48, 40))  # border only: the rest goes black
    _, border_only = cs.whole_and_edited(img, mask, text)
    black = img * mask[..., None]
    assert border_only == pytest.approx(cs([black], [text])[0], rel=1e-6)


# ---- missing HF weights --------------------------------------------------------------------------


def _old_vit_name(key: str) -> str:
    """transformers 4.x names, as facebook/dino-vitb8's checkpoint on the Hub has them."""
    key = key.replace("layers.", "encoder.layer.")
    for new, old in (
        ("q_proj", "attention.query"),
        ("k_proj", "attention.key"),
        ("v_proj", "attention.value"),
        ("o_proj", "output.dense"),
    ):
        key = key.replace(f"attention.{new}", f"attention.{old}")
    return key.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")


def test_dino_checkpoint_with_hub_names_loads_every_weight(tmp_path):
    import json

    from safetensors.torch import save_file

    model = tiny_dino()
    sd = model.state_dict()
    old = {_old_vit_name(k): v.contiguous() for k, v in sd.items()}
    assert "encoder.layer.11.attention.attention.key.weight" in old
    save_file(old, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({**model.config.to_dict(), "architectures": ["ViTModel"]}))
    loaded = M.load_structure_distance(str(tmp_path)).model.state_dict()
    assert all(torch.equal(sd[k], loaded[k]) for k in sd)
    # A checkpoint missing weights is refused rather than run with random ones.
    del old["encoder.layer.11.attention.attention.key.weight"]
    save_file(old, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(M.MissingWeightsError, match="lacks 1 weights"):
        M.load_structure_distance(str(tmp_path))


def test_missing_hf_weights_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    t = time.perf_counter()
    with pytest.raises(M.MissingWeightsError, match="fireflow-test/no-such-dino"):
        M.load_structure_distance("fireflow-test/no-such-dino")
    with pytest.raises(M.MissingWeightsError, match="CLIP"):
        M.load_clip_score(str(tmp_path / "no-clip-here"))
    assert time.perf_counter() - t < 20


def test_clip_loads_from_a_local_folder(tmp_path):
    model, proc = tiny_clip(tmp_path / "tok")
    model.save_pretrained(tmp_path / "clip")
    proc.save_pretrained(tmp_path / "clip")
    loaded = M.load_clip_score(str(tmp_path / "clip"))
    img = np.random.default_rng(7).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    expected = M.ClipScore(model, proc)([img], ["a red cat"])[0]
    assert loaded([img], ["a red cat"])[0] == pytest.approx(expected, rel=1e-5, abs=1e-5)

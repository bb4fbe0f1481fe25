"""PIE-Bench and reconstruction metrics, computed as the reference evaluator computes them.

Every quirk of the protocol (docs/evaluation.md) is kept on purpose, because published numbers
came from it: the background metrics run on the *full* masked tensors, the structure distance feeds
DINO [0, 255] pixels normalised with the ImageNet statistics, and the CLIP "edited" score blacks out
the background without cropping.

Images are ``uint8`` arrays ``[H, W, 3]``. Masks are ``[H, W]`` with 1 on the region to edit.

The learned metrics need weights that are never downloaded here: DINO ViT-B/8 and CLIP ViT-L/14 come
from a local folder or the Hugging Face cache (``local_files_only``), SqueezeNet 1.1 from a local file
or torch's hub cache, the LPIPS v0.1 heads from a local file, the ``lpips`` package or the copy that
torchmetrics ships. A missing one raises :class:`MissingWeightsError` with what to put where.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DINO_MODEL = "facebook/dino-vitb8"
CLIP_MODEL = "openai/clip-vit-large-patch14"
SQUEEZENET_FILE = "squeezenet1_1-b8a52dc0.pth"  # torchvision's file name in the torch hub cache
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingWeightsError(RuntimeError):
    """The weights a metric needs are not on this machine (nothing is downloaded)."""


# ---- PIE-Bench masks -----------------------------------------------------------------------------


def decode_pie_mask(rle: Sequence[int], size: int | tuple[int, int] = 512) -> np.ndarray:
    """Decode a PIE-Bench mask: ``[start0, len0, start1, len1, ...]`` over the row-major flattened
    image (``index = y * W + x``); each run sets ``mask[start:start + len] = 1``, clipped at the end
    of the array; then the one-pixel border is set to 1. Returns ``uint8 [H, W]``, 1 = edit region."""
    h, w = (size, size) if isinstance(size, int) else size
    values = [int(v) for v in rle]
    if len(values) % 2:
        raise ValueError(f"mask RLE has odd length {len(values)}; expected [start, length, ...] pairs")
    flat = np.zeros(h * w, dtype=np.uint8)
    for start, length in zip(values[0::2], values[1::2], strict=True):
        if start < 0 or length < 0:
            raise ValueError(f"mask RLE run ({start}, {length}) is negative; starts and lengths are >= 0")
        flat[start : start + length] = 1  # slicing clips at the end of the array, as the protocol says
    mask = flat.reshape(h, w)
    mask[0, :] = mask[-1, :] = 1
    mask[:, 0] = mask[:, -1] = 1
    return mask


def encode_pie_mask(mask: np.ndarray) -> list[int]:
    """The inverse of :func:`decode_pie_mask` before the border: runs of 1 as ``[start, len, ...]``."""
    flat = np.asarray(mask).reshape(-1).astype(bool).astype(np.int8)
    edges = np.diff(np.concatenate([[0], flat, [0]]))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    out: list[int] = []
    for s, e in zip(starts, ends, strict=True):
        out += [int(s), int(e - s)]
    return out


# ---- pixel metrics -------------------------------------------------------------------------------


def _check_image(name: str, image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must be a uint8 [H, W, 3] RGB array, got {image.dtype} {image.shape}")
    return image


def _unit_tensor(image: np.ndarray, keep: np.ndarray | None) -> torch.Tensor:
    """uint8 HWC to float32 [1, 3, H, W] in [0, 1], multiplied by ``keep`` like the reference does."""
    x = image.astype(np.float32) / 255
    if keep is not None:
        x = x * keep[:, :, None].astype(np.float32)
    return torch.from_numpy(x).permute(2, 0, 1).unsqueeze(0)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(
    preds: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    k1: float = 0.01,
    k2: float = 0.03,
    crop_borders: bool = True,
) -> torch.Tensor:
    """SSIM with an 11x11 Gaussian window (sigma 1.5) on ``[B, C, H, W]``, averaged per image.

    ``crop_borders=True`` averages only the windows that lie inside the image, as torchmetrics did
    when the reference evaluator was written (and as skimage does). torchmetrics >= 1.x averages
    the reflect-padded border windows too (``crop_borders=False``); on 512x512 that moves SSIM by
    about 1e-3, which is visible at the x10^2 reporting scale.
    """
    c = preds.shape[1]
    if min(preds.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {tuple(preds.shape[-2:])}")
    win = _gaussian_window().to(preds)
    pad = (win.shape[-1] - 1) // 2
    kernel = win.expand(c, 1, *win.shape)
    x = F.pad(preds, (pad,) * 4, mode="reflect")
    y = F.pad(target, (pad,) * 4, mode="reflect")
    mu_x, mu_y, xx, yy, xy = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), kernel, groups=c).split(preds.shape[0])
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    var_x = torch.clamp(xx - mu_x**2, min=0)
    var_y = torch.clamp(yy - mu_y**2, min=0)
    cov = xy - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    if crop_borders:
        s = s[..., pad:-pad, pad:-pad]
    return s.reshape(s.shape[0], -1).mean(-1)


def pixel_metrics(
    source: np.ndarray, edited: np.ndarray, keep: np.ndarray | None = None, lpips: SqueezeLPIPS | None = None
) -> dict[str, float]:
    """PSNR, MSE, SSIM (and LPIPS) between two images, each multiplied by ``keep`` (or unmasked),
    over the full tensors. ``keep`` all zero gives NaN."""
    source = _check_image("source", source)
    edited = _check_image("edited", edited)
    if source.shape != edited.shape:
        raise ValueError(
            f"edited image is {edited.shape[1]}x{edited.shape[0]}, the source "
            f"{source.shape[1]}x{source.shape[0]}; they must be the same size"
        )
    names = ["psnr", "mse", "ssim"] + (["lpips"] if lpips is not None else [])
    if keep is not None:
        if keep.shape != source.shape[:2]:
            raise ValueError(f"mask is {keep.shape}, the images {source.shape[:2]}; they must match")
        if not keep.any():
            return {k: math.nan for k in names}
    a = _unit_tensor(source, keep)
    b = _unit_tensor(edited, keep)
    mse = torch.mean((b - a) ** 2).item()
    out = {
        "psnr": 10 * math.log10(1 / mse) if mse > 0 else math.inf,  # data range 1
        "mse": mse,
        "ssim": ssim(b, a).item(),
    }
    if lpips is not None:
        out["lpips"] = lpips(b * 2 - 1, a * 2 - 1).item()
    return out


def background_metrics(
    source: np.ndarray, edited: np.ndarray, mask: np.ndarray, lpips: SqueezeLPIPS | None = None
) -> dict[str, float]:
    """Background preservation: both images times ``1 - mask`` (mask = 1 on the edit region), then
    PSNR (data range 1), MSE, SSIM (Gaussian 11 / 1.5) and LPIPS (SqueezeNet, inputs in [-1, 1]) on
    the full masked tensors. NaN everywhere when the mask covers the whole image."""
    keep = 1 - (np.asarray(mask) > 0).astype(np.uint8)
    return pixel_metrics(source, edited, keep, lpips)


def reconstruction_metrics(
    source: np.ndarray, reconstruction: np.ndarray, lpips: SqueezeLPIPS | None = None
) -> dict[str, float]:
    """PSNR, MSE, SSIM (and LPIPS) over the whole image, the background settings without a mask."""
    return pixel_metrics(source, reconstruction, None, lpips)


# ---- LPIPS with a SqueezeNet 1.1 backbone --------------------------------------------------------


class _Fire(nn.Module):
    """SqueezeNet's fire module, with torchvision's parameter names so its state dict loads."""

    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, kernel_size=1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


def _squeezenet1_1_features() -> nn.Sequential:
    """``torchvision.models.squeezenet1_1().features`` (indices matter: they are the state-dict keys)."""
    pool = dict(kernel_size=3, stride=2, ceil_mode=True)
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=3, stride=2),
        nn.ReLU(),
        nn.MaxPool2d(**pool),
        _Fire(64, 16, 64, 64),
        _Fire(128, 16, 64, 64),
        nn.MaxPool2d(**pool),
        _Fire(128, 32, 128, 128),
        _Fire(256, 32, 128, 128),
        nn.MaxPool2d(**pool),
        _Fire(256, 48, 192, 192),
        _Fire(384, 48, 192, 192),
        _Fire(384, 64, 256, 256),
        _Fire(512, 64, 256, 256),
    )


class _Linear(nn.Module):
    """An LPIPS head; ``model.1`` matches the ``lpips`` package's keys (``lin0.model.1.weight``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))


class SqueezeLPIPS(nn.Module):
    """LPIPS v0.1 with the SqueezeNet 1.1 backbone: inputs ``[B, 3, H, W]`` in [-1, 1], output ``[B]``."""

    # After these feature indices LPIPS taps the activations (its slices 1..7).
    TAPS = (1, 4, 7, 9, 10, 11, 12)
    CHANNELS = (64, 128, 256, 384, 384, 512, 512)

    def __init__(self) -> None:
        super().__init__()
        self.features = _squeezenet1_1_features()
        for i, c in enumerate(self.CHANNELS):
            self.add_module(f"lin{i}", _Linear(c))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                out.append(x)
        return out

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        device = self.shift.device
        fa, fb = self._taps(a.to(device)), self._taps(b.to(device))
        total = torch.zeros(a.shape[0], device=device)
        for i, (x, y) in enumerate(zip(fa, fb, strict=True)):
            x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            diff = getattr(self, f"lin{i}").model((x - y) ** 2)
            total = total + diff.mean(dim=(1, 2, 3))
        return total.cpu()

    def load_weights(self, squeezenet: dict[str, torch.Tensor], heads: dict[str, torch.Tensor]) -> None:
        """Load torchvision's ``squeezenet1_1`` state dict (classifier ignored) and the LPIPS heads."""
        feats = {k: v for k, v in squeezenet.items() if k.startswith("features.")}
        lins = {k: v for k, v in heads.items() if k.startswith("lin")}
        missing, unexpected = self.load_state_dict({**feats, **lins}, strict=False)
        missing = [k for k in missing if k not in ("shift", "scale")]
        if missing or unexpected:
            raise ValueError(
                f"LPIPS weights do not fit SqueezeNet 1.1: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )


def _lpips_heads_candidates() -> list[Path]:
    paths = []
    spec = importlib.util.find_spec("lpips")  # located, not imported: it would import torchvision
    if spec is not None and spec.origin:
        paths.append(Path(spec.origin).parent / "weights" / "v0.1" / "squeeze.pth")
    spec = importlib.util.find_spec("torchmetrics")
    if spec is not None and spec.origin:
        paths.append(Path(spec.origin).parent / "functional" / "image" / "lpips_models" / "squeeze.pth")
    return paths


def load_lpips(
    squeezenet: str | os.PathLike | None = None,
    heads: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> SqueezeLPIPS:
    """LPIPS (SqueezeNet) from local files. ``squeezenet`` defaults to ``$FIREFLOW_SQUEEZENET`` or
    torchvision's file in the torch hub cache; ``heads`` to ``$FIREFLOW_LPIPS_HEADS``, the ``lpips``
    package's ``weights/v0.1/squeeze.pth`` or torchmetrics' bundled copy."""
    sq_candidates = [Path(p) for p in (squeezenet, os.environ.get("FIREFLOW_SQUEEZENET")) if p]
    if squeezenet is None:
        sq_candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / SQUEEZENET_FILE)
    head_candidates = [Path(p) for p in (heads, os.environ.get("FIREFLOW_LPIPS_HEADS")) if p]
    if heads is None:
        head_candidates += _lpips_heads_candidates()
    sq = next((p for p in sq_candidates if p.is_file()), None)
    hd = next((p for p in head_candidates if p.is_file()), None)
    if sq is None:
        raise MissingWeightsError(
            f"LPIPS needs torchvision's SqueezeNet 1.1 weights ({SQUEEZENET_FILE}); looked in "
            f"{', '.join(map(str, sq_candidates))}. Pass --squeezenet FILE or put it in the torch hub cache."
        )
    if hd is None:
        raise MissingWeightsError(
            "LPIPS needs the v0.1 SqueezeNet linear heads (squeeze.pth from the lpips package); looked in "
            f"{', '.join(map(str, head_candidates))}. Pass --lpips-heads FILE."
        )
    model = SqueezeLPIPS()
    model.load_weights(
        torch.load(sq, map_location="cpu", weights_only=True),
        torch.load(hd, map_location="cpu", weights_only=True),
    )
    return model.to(device)


# ---- Hugging Face models, offline ----------------------------------------------------------------


def _load_hf(loader, name_or_path: str, what: str, model: bool = True, **kwargs):
    """``loader.from_pretrained`` from a local folder or the HF cache only; a clear error otherwise.
    A model checkpoint that leaves weights uninitialised is refused: random weights would give
    plausible-looking but meaningless numbers."""
    # Never reach the network: a missing model must fail now, not hang on a download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if model:
        kwargs["output_loading_info"] = True
    try:
        loaded = loader.from_pretrained(name_or_path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise MissingWeightsError(
            f"{what} weights '{name_or_path}' are not in a local folder or the Hugging Face cache "
            f"({type(e).__name__}); download them once (huggingface-cli download {name_or_path}) "
            "or pass a local folder."
        ) from e
    if not model:
        return loaded
    loaded, info = loaded
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise MissingWeightsError(
            f"{what} checkpoint '{name_or_path}' lacks {len(missing)} weights (first: {missing[0]}); "
            "is it the right model?"
        )
    return loaded


def _resized_size(h: int, w: int, size: int = 224, max_size: int = 480) -> tuple[int, int]:
    """torchvision's ``Resize(size, max_size=max_size)`` output size: shorter side ``size``, longer
    side scaled and capped at ``max_size``."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if w <= h else (new_short, new_long)


class StructureDistance:
    """DINO ViT key self-similarity distance (Tumanyan et al.'s Splice, as PIE-Bench uses it).

    The images go in as [0, 255] floats, are resized (shorter side 224, longer at most 480) and
    normalised with the ImageNet mean and std *without* dividing by 255 first; that quirk of the
    reference evaluator is kept. Keys of block ``layer`` (the k part of the qkv projection) give a
    token-by-token cosine similarity matrix; the distance is the MSE between the two matrices.
    """

    def __init__(self, model: nn.Module, layer: int = 11, antialias: bool = False):
        # antialias=False: torchvision < 0.17 resized tensors without it, as the reference ran.
        self.model = model.eval().requires_grad_(False)
        self.antialias = antialias
        self.key_proj = self._find_key_projection(model, layer)

    @staticmethod
    def _find_key_projection(model: nn.Module, layer: int) -> nn.Module:
        # transformers 5 names it layers.N.attention.k_proj, 4.x encoder.layer.N.attention.attention.key
        for name, module in model.named_modules():
            parts = name.split(".")
            if len(parts) >= 3 and parts[-1] in ("k_proj", "key") and str(layer) in parts:
                if parts[parts.index(str(layer)) - 1] in ("layer", "layers"):
                    return module
        raise ValueError(f"no key projection for block {layer} in {type(model).__name__}")

    @property
    def patch_size(self) -> int:
        return int(self.model.config.patch_size)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        image = _check_image("image", image)
        x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1).unsqueeze(0)  # [0, 255], on purpose
        h, w = _resized_size(*image.shape[:2])
        if (h, w) != image.shape[:2]:
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=self.antialias)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    def num_tokens(self, height: int, width: int) -> int:
        """CLS plus patches after the resize: 785 for any square image with ViT-B/8."""
        h, w = _resized_size(height, width)
        return 1 + (h // self.patch_size) * (w // self.patch_size)

    @torch.no_grad()
    def keys(self, image: np.ndarray) -> torch.Tensor:
        """``[T, heads * head_dim]`` keys of the chosen block (heads concatenated, as the reference)."""
        x = self.preprocess(image)
        param = next(self.model.parameters())
        captured: list[torch.Tensor] = []
        handle = self.key_proj.register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            size = int(self.model.config.image_size)
            self.model(
                pixel_values=x.to(param.device, param.dtype),
                interpolate_pos_encoding=x.shape[-2:] != (size, size),
            )
        finally:
            handle.remove()
        return captured[0][0].float().cpu()

    def self_similarity(self, image: np.ndarray) -> torch.Tensor:
        k = self.keys(image)
        norm = k.norm(dim=1, keepdim=True)
        return (k @ k.T) / torch.clamp(norm @ norm.T, min=1e-8)

    def __call__(self, source: np.ndarray, edited: np.ndarray) -> float:
        return F.mse_loss(self.self_similarity(edited), self.self_similarity(source)).item()


def load_structure_distance(name_or_path: str = DINO_MODEL, device: str | torch.device = "cpu") -> StructureDistance:
    from transformers import ViTModel

    model = _load_hf(ViTModel, name_or_path, "DINO ViT-B/8", add_pooling_layer=False)
    return StructureDistance(model.to(device))


def clip_score_from_features(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """torchmetrics' CLIPScore per pair: ``max(100 * cos(image, text), 0)``."""
    cos = F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)
    return torch.clamp(100 * cos, min=0)


def _features(out) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScore:
    """CLIP similarity of images and texts, scored like torchmetrics' CLIPScore."""

    def __init__(self, model: nn.Module, processor):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> list[float]:
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        images = [_check_image("image", im) for im in images]
        device = next(self.model.parameters()).device
        # The processor gets uint8: it resizes the shorter side to 224 and centre-crops.
        pix = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        tok = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        img = _features(self.model.get_image_features(pixel_values=pix.to(device, self.model.dtype)))
        txt = _features(
            self.model.get_text_features(
                input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device)
            )
        )
        return clip_score_from_features(img, txt).cpu().tolist()

    def whole_and_edited(self, edited: np.ndarray, mask: np.ndarray, text: str) -> tuple[float, float]:
        """PIE-Bench's two CLIP numbers: the edited image, and the edited image times the mask
        (background black, not cropped; the mask's border stays)."""
        masked = (edited * (np.asarray(mask) > 0)[:, :, None]).astype(np.uint8)
        whole, edited_part = self([edited, masked], [text, text])
        return whole, edited_part


def load_clip_score(name_or_path: str = CLIP_MODEL, device: str | torch.device = "cpu") -> ClipScore:
    from transformers import CLIPModel, CLIPProcessor

    model = _load_hf(CLIPModel, name_or_path, "CLIP ViT-L/14")
    processor = _load_hf(CLIPProcessor, name_or_path, "CLIP ViT-L/14 processor", model=False)
    return ClipScore(model.to(device), processor)

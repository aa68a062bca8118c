"""Views made on the training device: uint8 images in, normalised float32 views out, as batched tensor ops.

The pipeline delivers the stored uint8 images; the training worker makes every view on its own device
(CPU or GPU, the same code), each image with its own random parameters, and both views of a two-view
method from one uint8 copy. The recipes are MoCo v2's and the project's supervised one, as torchvision
defines them per image:

* moco_v2: RandomResizedCrop(scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, RandomGrayscale p=0.2,
  Gaussian blur (sigma 0.1-2 px) p=0.5, horizontal flip p=0.5;
* supervised: RandomResizedCrop(scale 0.5-1), horizontal and vertical flips p=0.5, ColorJitter(0.2, 0.2,
  0.2, 0.02) always (dermoscopy and fundus images have no up or left);
* none: the evaluation view (resize the short side, centre crop).

Random parameters are drawn from a generator on the images' device as one uniform row per image, for the
global batch of every rank, of which each rank keeps its slice: W ranks make exactly the views one rank
with the same global batch makes, and nothing is read back to the host (no synchronisation).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from proco_ray.config import Augmentation

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its central fallback


@dataclass(frozen=True)
class Recipe:
    """One training augmentation, with torchvision's parameter names and ranges."""

    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    vflip_p: float = 0.0
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    @property
    def blur_kernel(self) -> int:
        """Taps of the blur: +-3 sigma of the largest sigma (13 for MoCo v2's 2 px)."""
        return 2 * math.ceil(3 * self.blur_sigma[1]) + 1


RECIPES = {
    "moco_v2": Recipe(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5),
    "supervised": Recipe(scale=(0.5, 1.0), vflip_p=0.5, jitter=(0.2, 0.2, 0.2, 0.02), jitter_p=1.0),
}
AUGMENTATIONS = typing.get_args(Augmentation)  # the recipes and "none"

# Columns of the uniform row drawn per image and view.
_SCALE, _RATIO = slice(0, CROP_ATTEMPTS), slice(CROP_ATTEMPTS, 2 * CROP_ATTEMPTS)
_TOP, _LEFT, _HFLIP, _VFLIP, _JITTER_ON = range(2 * CROP_ATTEMPTS, 2 * CROP_ATTEMPTS + 5)
_FACTORS = slice(2 * CROP_ATTEMPTS + 5, 2 * CROP_ATTEMPTS + 9)
_ORDER = slice(2 * CROP_ATTEMPTS + 9, 2 * CROP_ATTEMPTS + 13)
_GRAY, _BLUR_ON, _SIGMA = range(2 * CROP_ATTEMPTS + 13, 2 * CROP_ATTEMPTS + 16)
UNIFORMS_PER_IMAGE = 2 * CROP_ATTEMPTS + 16


def check_augmentation(name: str) -> None:
    if name not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {list(AUGMENTATIONS)}, got '{name}'")


def to_unit(images: Tensor) -> Tensor:
    """uint8 [B, H, W, 3] (as stored and delivered) -> float32 [B, 3, H, W] in [0, 1]."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def normalize(x: Tensor) -> Tensor:
    """ImageNet normalisation of [B, 3, H, W] in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def eval_view(images: Tensor, size: int) -> Tensor:
    """The deterministic view: resize the short side to `size` (bilinear, antialiased as PIL; the long side as
    torchvision's Resize computes it), centre-crop size x size, normalise. Prepared images are stored at their training size, where this is the identity."""
    x = to_unit(images)
    height, width = x.shape[-2:]
    if min(height, width) != size:
        short, long = sorted((height, width))
        target = (size, int(size * long / short)) if height <= width else (int(size * long / short), size)
        x = F.interpolate(x, size=target, mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
        height, width = target
    top, left = (height - size) // 2, (width - size) // 2
    return normalize(x[..., top : top + size, left : left + size])


def crop_boxes(uniform: Tensor, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]) -> Tensor:
    """RandomResizedCrop's boxes, one per row of `uniform` [N, >= 22]: (x0, y0, x1, y1) in pixels.

    torchvision's sampling, vectorised: 10 attempts of an area fraction uniform in `scale` and an aspect
    ratio log-uniform in `ratio`, side lengths rounded; the first that fits is placed uniformly; when
    none fits, the central crop of the largest box within `ratio`.
    """
    area = float(height * width)
    target = area * (scale[0] + (scale[1] - scale[0]) * uniform[:, _SCALE])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * uniform[:, _RATIO])
    widths = torch.round(torch.sqrt(target * aspect))
    heights = torch.round(torch.sqrt(target / aspect))
    fits = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = float(width), float(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = float(round(height * ratio[1])), float(height)
    else:
        fallback_w, fallback_h = float(width), float(height)
    w = torch.where(found, widths.gather(1, first).squeeze(1), fallback_w)
    h = torch.where(found, heights.gather(1, first).squeeze(1), fallback_h)
    top = torch.where(found, torch.floor(uniform[:, _TOP] * (height - h + 1)), torch.floor((height - h) / 2))
    left = torch.where(found, torch.floor(uniform[:, _LEFT] * (width - w + 1)), torch.floor((width - w) / 2))
    return torch.stack([left, top, left + w, top + h], dim=1)


def resized_crop(x: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Each image's box resampled to size x size: bilinear at the pixel centres when enlarging, the mean of
    ceil(box/size)^2 bilinear samples per output pixel when shrinking (roi_align's adaptive sampling), so a
    large crop is antialiased as torchvision's resize is."""
    index = torch.arange(x.shape[0], device=x.device, dtype=x.dtype)[:, None]
    return roi_align(x, torch.cat([index, boxes.to(x.dtype)], dim=1), (size, size), 1.0, -1, aligned=True)


def flip_where(x: Tensor, flip: Tensor, dim: int) -> Tensor:
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(dim), x)


def grayscale(x: Tensor) -> Tensor:
    """torchvision's rgb_to_grayscale, kept at 3 channels: [B, 1, H, W] broadcastable."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """torchvision's _blend: factor * x + (1 - factor) * other, clamped to [0, 1]; factor per image [B]."""
    factor = factor.view(-1, 1, 1, 1)
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def _hue(x: Tensor, maxc: Tensor, chroma: Tensor) -> Tensor:
    """The hue in [0, 1) of torchvision's _rgb2hsv, from the channel maximum and the chroma."""
    r, g, b = x.unbind(dim=1)
    divisor = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    is_r, is_g = maxc == r, (maxc == g) & (maxc != r)
    hue = torch.where(is_r, bc - gc, torch.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))
    return torch.fmod(hue / 6.0 + 1.0, 1.0)


def _from_hue(hue: Tensor, value: Tensor, chroma: Tensor) -> Tensor:
    """RGB from hue, value and chroma (= value x saturation) by the closed form f(n) = V - C clamp(min(k, 4 - k),
    0, 1), k = (n + 6 H) mod 6, n = 5, 3, 1: torchvision's sector table without building it."""
    n = torch.tensor([5.0, 3.0, 1.0], device=hue.device, dtype=hue.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * hue.unsqueeze(1), 6.0)
    weight = torch.minimum(k, 4.0 - k).clamp_(0, 1)
    return (value.unsqueeze(1) - chroma.unsqueeze(1) * weight).clamp_(0, 1)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """torchvision's adjust_hue (RGB -> HSV, hue + shift mod 1, -> RGB) with a shift per image [B]."""
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    chroma = maxc - minc
    hue = torch.remainder(_hue(x, maxc, chroma) + shift.view(-1, 1, 1), 1.0)
    return _from_hue(hue, maxc, chroma)


def jitter_factors(uniform: Tensor, jitter: tuple[float, float, float, float]) -> Tensor:
    """ColorJitter.get_params per image [N, 4]: brightness, contrast, saturation uniform in
    [max(0, 1 - j), 1 + j], hue uniform in [-j, j]."""
    low = torch.tensor([max(0.0, 1 - j) for j in jitter[:3]] + [-jitter[3]], device=uniform.device)
    high = torch.tensor([1 + j for j in jitter[:3]] + [jitter[3]], device=uniform.device)
    return low + (high - low) * uniform


BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def color_jitter(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """ColorJitter with each image's factors [B, 4] applied in each image's own order [B, 4] (a permutation of
    0 brightness, 1 contrast, 2 saturation, 3 hue, as torchvision draws one per call).

    The hue shift, the costly step, runs once: the blends an image has before it, the shift, then the blends
    it has after. Each blend step applies to every image the one blend (brightness, contrast or saturation)
    it has at that place, with factor 1 (exactly the identity) where it has none there.
    """
    hue_place = (order == HUE).to(torch.uint8).argmax(dim=1)
    blends = order[order != HUE].view(-1, 3)  # each image's three blends, in its order
    for before_hue in (True, False):
        for place in range(3):
            active = (place < hue_place) if before_hue else (place >= hue_place)
            x = _blend_step(x, blends[:, place], torch.where(active, factors.gather(1, blends[:, place : place + 1])[:, 0], 1.0))
        if before_hue:
            x = adjust_hue(x, factors[:, HUE])
    return x


def _blend_step(x: Tensor, op: Tensor, factor: Tensor) -> Tensor:
    """One blend per image: towards black (brightness), the mean grey (contrast) or the grey image (saturation)."""
    gray = grayscale(x)
    op = op.view(-1, 1, 1, 1)
    other = torch.where(op == BRIGHTNESS, 0.0, torch.where(op == CONTRAST, gray.mean(dim=(-2, -1), keepdim=True), gray))
    return blend(x, other, factor)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel: int) -> Tensor:
    """A separable Gaussian blur with a sigma per image [B] (in pixels, as PIL's GaussianBlur radius), reflect
    padding; `kernel` taps, at most the image's size."""
    batch, channels, height, width = x.shape
    kernel = min(kernel, 2 * ((min(height, width) - 1) // 2) + 1)
    half = kernel // 2
    taps = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    weights = torch.exp(-(taps**2) / (2 * sigma.to(x.dtype).view(-1, 1) ** 2))
    weights = (weights / weights.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    flat = x.reshape(1, batch * channels, height, width)
    flat = F.conv2d(F.pad(flat, (half, half, 0, 0), mode="reflect"), weights.view(-1, 1, 1, kernel), groups=batch * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, half, half), mode="reflect"), weights.view(-1, 1, kernel, 1), groups=batch * channels)
    return flat.view(batch, channels, height, width)


def augment(x: Tensor, uniform: Tensor, recipe: Recipe, size: int) -> Tensor:
    """One random view of each image of x [B, 3, H, W] in [0, 1], from its row of `uniform` [B, 36]; not
    normalised. The order is the recipe's: crop, flips, jitter, grayscale, blur (flips commute with the rest)."""
    height, width = x.shape[-2:]
    view = resized_crop(x, crop_boxes(uniform, height, width, recipe.scale, recipe.ratio), size)
    if recipe.hflip_p:
        view = flip_where(view, uniform[:, _HFLIP] < recipe.hflip_p, -1)
    if recipe.vflip_p:
        view = flip_where(view, uniform[:, _VFLIP] < recipe.vflip_p, -2)
    if recipe.jitter_p:
        factors = jitter_factors(uniform[:, _FACTORS], recipe.jitter)
        jittered = color_jitter(view, factors, uniform[:, _ORDER].argsort(dim=1))
        view = torch.where((uniform[:, _JITTER_ON] < recipe.jitter_p).view(-1, 1, 1, 1), jittered, view)
    if recipe.grayscale_p:
        view = torch.where((uniform[:, _GRAY] < recipe.grayscale_p).view(-1, 1, 1, 1), grayscale(view).expand_as(view), view)
    if recipe.blur_p:
        low, high = recipe.blur_sigma
        blurred = gaussian_blur(view, low + (high - low) * uniform[:, _SIGMA], recipe.blur_kernel)
        view = torch.where((uniform[:, _BLUR_ON] < recipe.blur_p).view(-1, 1, 1, 1), blurred, view)
    return view


def image_uniforms(generator: torch.Generator, local: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """This rank's rows of one uniform row per image of the global batch (local x world_size images)."""
    rows = torch.rand(local * world_size, UNIFORMS_PER_IMAGE, generator=generator, device=generator.device)
    return rows[rank * local : (rank + 1) * local]


def make_views(
    images: Tensor,
    augmentation: str,
    size: int,
    views: int,
    generator: torch.Generator,
    rank: int = 0,
    world_size: int = 1,
) -> list[Tensor]:
    """`views` normalised views [B, 3, size, size] of uint8 images [B, H, W, 3], all from one float copy.

    Each view draws its own parameters for every image (independent views and images); 'none' gives the
    evaluation view (no randomness). The generator lives on the images' device; ranks share its seed.
    """
    check_augmentation(augmentation)
    if augmentation == "none":
        view = eval_view(images, size)
        return [view] + [view.clone() for _ in range(views - 1)]
    x = to_unit(images)
    recipe = RECIPES[augmentation]
    return [normalize(augment(x, image_uniforms(generator, len(x), rank, world_size), recipe, size)) for _ in range(views)]


def view_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on `device` for the views of one epoch (seeded per epoch by the loop)."""
    return torch.Generator(device=device).manual_seed(seed)

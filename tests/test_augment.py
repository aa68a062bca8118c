"""The views made on the training device: torchvision's augmentations, per image, batched, seeded."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from proco_ray.data import augment as A

N = 20_000  # parameter draws compared with torchvision's


def uint8_images(count: int, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (count, height, width, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov distance: the largest gap between the empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


def test_views_are_normalised_float_of_the_requested_size_from_uint8():
    images = uint8_images(6, 40, 40)
    for augmentation, count in (("moco_v2", 2), ("supervised", 1), ("none", 2)):
        views = A.make_views(images, augmentation, 32, count, A.view_generator(torch.device("cpu"), 0))
        assert len(views) == count and all(v.shape == (6, 3, 32, 32) and v.dtype == torch.float32 for v in views)
        assert all(-2.2 < float(v.min()) and float(v.max()) < 2.7 for v in views)  # ImageNet-normalised [0, 1]
    with pytest.raises(ValueError, match="expected uint8 images"):
        A.make_views(images.float(), "moco_v2", 32, 2, A.view_generator(torch.device("cpu"), 0))
    with pytest.raises(ValueError, match="augmentation must be one of"):
        A.make_views(images, "randaugment", 32, 2, A.view_generator(torch.device("cpu"), 0))


@pytest.mark.parametrize("augmentation", ["moco_v2", "supervised"])
def test_every_image_and_view_gets_its_own_parameters(augmentation):
    """64 copies of one image give 64 different views, and the two views of each copy differ."""
    images = uint8_images(1).expand(64, -1, -1, -1).contiguous()
    query, key = A.make_views(images, augmentation, 32, 2, A.view_generator(torch.device("cpu"), 1))
    assert len({bytes(v.numpy().tobytes()) for v in query}) == 64
    assert all(not torch.equal(q, k) for q, k in zip(query, key))
    rows = A.image_uniforms(A.view_generator(torch.device("cpu"), 1), 4096)
    correlation = np.corrcoef(rows[:-1, A._HFLIP].numpy(), rows[1:, A._HFLIP].numpy())[0, 1]
    assert abs(correlation) < 0.05  # neighbouring images draw independently


def test_same_seed_same_views_other_seed_other_views():
    images = uint8_images(8)
    make = lambda seed: A.make_views(images, "moco_v2", 32, 2, A.view_generator(torch.device("cpu"), seed))  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(make(3), make(3)))
    assert not torch.equal(make(3)[0], make(4)[0])


def test_two_ranks_make_exactly_the_slices_of_one_ranks_views():
    """Parameters are drawn for the global batch and sliced, so W ranks see what one rank sees."""
    images = uint8_images(12)
    one = A.make_views(images, "moco_v2", 24, 2, A.view_generator(torch.device("cpu"), 9))
    for rank in (0, 1):
        mine = A.make_views(
            images[rank * 6 : (rank + 1) * 6], "moco_v2", 24, 2, A.view_generator(torch.device("cpu"), 9), rank, 2
        )
        for whole, part in zip(one, mine):
            torch.testing.assert_close(part, whole[rank * 6 : (rank + 1) * 6], rtol=0, atol=1e-6)


@pytest.mark.parametrize("height,width", [(64, 64), (48, 80)])
def test_crop_scale_and_ratio_follow_torchvision(height, width):
    """The boxes' area fraction and aspect ratio have torchvision's RandomResizedCrop distribution (KS distance
    under 0.02 on 20,000 draws each), on square and oblong images, and every box lies inside the image."""
    for scale in ((0.2, 1.0), (0.5, 1.0)):
        rows = A.image_uniforms(A.view_generator(torch.device("cpu"), 0), N)
        boxes = A.crop_boxes(rows, height, width, scale, (3 / 4, 4 / 3)).numpy().astype(np.float64)
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert np.array_equal(w, np.round(w)) and np.array_equal(boxes, np.round(boxes))  # whole pixels
        torch.manual_seed(0)
        reference = np.array(
            [T.RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), [3 / 4, 4 / 3]) for _ in range(N)]
        )
        ref_h, ref_w = reference[:, 2].astype(float), reference[:, 3].astype(float)
        assert ks_statistic(w * h / (height * width), ref_w * ref_h / (height * width)) < 0.02
        assert ks_statistic(w / h, ref_w / ref_h) < 0.02
        assert ks_statistic(boxes[:, 1] / np.maximum(height - h, 1), reference[:, 0] / np.maximum(height - ref_h, 1)) < 0.03


def test_flip_grayscale_blur_and_jitter_rates_and_ranges_follow_torchvision():
    rows = A.image_uniforms(A.view_generator(torch.device("cpu"), 2), N)
    recipe = A.RECIPES["moco_v2"]
    for column, p in (
        (A._HFLIP, recipe.hflip_p),
        (A._JITTER_ON, recipe.jitter_p),
        (A._GRAY, recipe.grayscale_p),
        (A._BLUR_ON, recipe.blur_p),
    ):
        assert abs(float((rows[:, column] < p).float().mean()) - p) < 0.015
    factors = A.jitter_factors(rows[:, A._FACTORS], recipe.jitter).numpy()
    torch.manual_seed(0)
    jitter = T.ColorJitter(*recipe.jitter)
    reference = np.array(
        [T.ColorJitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)[1:] for _ in range(N)]
    )
    for column in range(4):
        assert ks_statistic(factors[:, column], reference[:, column]) < 0.02
    orders = rows[:, A._ORDER].argsort(dim=1).numpy()
    counts = {perm: 0 for perm in itertools.permutations(range(4))}
    for order in map(tuple, orders):
        counts[order] += 1
    assert all(abs(c / N - 1 / 24) < 0.01 for c in counts.values())  # every order of the four, equally often
    sigma = recipe.blur_sigma[0] + (recipe.blur_sigma[1] - recipe.blur_sigma[0]) * rows[:, A._SIGMA]
    assert 0.1 <= float(sigma.min()) and float(sigma.max()) <= 2.0 and abs(float(sigma.mean()) - 1.05) < 0.02


def test_color_jitter_equals_torchvision_per_image_in_every_order():
    x = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    orders = torch.tensor(list(itertools.permutations(range(4))))
    factors = A.jitter_factors(torch.rand(24, 4, generator=torch.Generator().manual_seed(1)), (0.4, 0.4, 0.4, 0.1))
    functions = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    expected = []
    for image, order, factor in zip(x, orders, factors):
        for op in order.tolist():
            image = functions[op](image, float(factor[op]))
        expected.append(image)
    torch.testing.assert_close(A.color_jitter(x, factors, orders), torch.stack(expected), rtol=0, atol=2e-6)
    torch.testing.assert_close(A.grayscale(x).expand_as(x), TF.rgb_to_grayscale(x, 3), rtol=0, atol=1e-6)


def test_blur_equals_torchvision_per_image():
    x = torch.rand(5, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0])
    expected = torch.stack([TF.gaussian_blur(image, [13, 13], [float(s), float(s)]) for image, s in zip(x, sigma)])
    torch.testing.assert_close(A.gaussian_blur(x, sigma, 13), expected, rtol=0, atol=1e-6)


def test_resized_crop_is_exact_for_the_whole_image_and_averages_when_halving():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    whole = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 2)
    torch.testing.assert_close(A.resized_crop(x, whole, 16), x, rtol=0, atol=1e-6)
    torch.testing.assert_close(A.resized_crop(x, whole, 8), torch.nn.functional.avg_pool2d(x, 2), rtol=0, atol=1e-6)
    corner = torch.tensor([[4.0, 2.0, 12.0, 10.0]] * 2)
    torch.testing.assert_close(A.resized_crop(x, corner, 8), x[:, :, 2:10, 4:12], rtol=0, atol=1e-6)


@pytest.mark.parametrize("height,width,size", [(32, 32, 32), (64, 64, 32), (48, 64, 32), (40, 30, 24)])
def test_eval_view_is_pils_resize_and_centre_crop_within_one_level(height, width, size):
    """The evaluation view equals torchvision's PIL Resize(size) + CenterCrop(size) within 1/255."""
    images = uint8_images(4, height, width, seed=height + width)
    pil = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor()])
    expected = A.normalize(torch.stack([pil(Image.fromarray(image.numpy())) for image in images]))
    std = torch.tensor(A.IMAGENET_STD).view(1, 3, 1, 1)
    assert float(((A.eval_view(images, size) - expected) * std).abs().max()) <= 1 / 255 + 1e-6

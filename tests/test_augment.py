"""Tests of harness/augment.py: every aug.policy keeps the batch's contract (shape, dtype, device,
range), draws its randomness per image from the given generator, and each op on a sub-batch is
exactly torchvision's op on each image alone. Everything is small and runs on the CPU (and on
CUDA too when one is visible)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2 as T
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from harness.config.spec import AugSpec, TrialConfig
from harness.core import augment as A
from harness.core import finetune, models
from harness.data import datasets as hdata

POLICIES = ["crop", "flip_crop", "randaugment", "trivialaugment", "autoaugment", "random_erasing"]
POLICIES += ["random_resized_crop", "random_resized_crop_flip"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def images(n: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random uint8 images without zeros (so that zero padding and erasing are visible)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, c, size, size), dtype=torch.uint8, generator=g)


def run(x: torch.Tensor, seed: int, **spec) -> torch.Tensor:
    return A.augment(x, AugSpec(**spec), torch.Generator().manual_seed(seed))


def changed(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per image: did any pixel change."""
    return (out != x).flatten(1).any(1)


# --- 1. the batch contract, for every policy ------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [8, 32])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("policy", POLICIES)
def test_policy_keeps_contract_and_is_seeded(policy, channels, size, device):
    x = images(32, channels, size).to(device)
    before = x.clone()
    out = run(x, 0, policy=policy)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert out.device == x.device
    assert torch.equal(x, before), "the input batch was modified in place"
    assert torch.equal(out, run(x, 0, policy=policy)), "same generator seed, different output"
    assert not torch.equal(out, run(x, 1, policy=policy)), "different seeds, same output"
    assert changed(out, x).any(), f"{policy} left every image unchanged"


@pytest.mark.parametrize("policy", POLICIES)
def test_float_images_stay_in_unit_range(policy):
    x = images(32, 3, 16).float() / 255.0
    out = run(x, 0, policy=policy)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert changed(out, x).any()


def test_none_is_identity():
    x = images(4, 3, 8)
    assert run(x, 0, policy="none") is x


# --- 2. randomness per image, not per batch -------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_identical_images_get_different_augmentations(policy):
    x = images(1, 3, 16).expand(64, -1, -1, -1).contiguous()
    out = run(x, 0, policy=policy)
    distinct = len({o.numpy().tobytes() for o in out})
    assert distinct > 2, f"{distinct} distinct outputs: augmentations are drawn per batch"


@pytest.mark.parametrize(
    ("policy", "spec"),
    [
        ("randaugment", {"num_ops": 1}),  # one round: a per-batch draw would give one op
        ("trivialaugment", {}),
        ("autoaugment", {}),
    ],
)
def test_several_ops_within_one_batch(monkeypatch, policy, spec):
    applied: list[tuple[str, float, int]] = []
    real = A.apply_op

    def recording(x, name, magnitude):
        applied.append((name, magnitude, len(x)))
        return real(x, name, magnitude)

    monkeypatch.setattr(A, "apply_op", recording)
    x = images(1, 3, 16).expand(64, -1, -1, -1).contiguous()
    run(x, 0, policy=policy, **spec)
    assert len({name for name, _, _ in applied}) > 1, f"one op for the whole batch: {applied}"
    assert sum(n for _, _, n in applied) <= 64 * 2  # each image in one group per round
    if policy == "trivialaugment":  # magnitudes are drawn per image too
        assert len({abs(m) for _, m, _ in applied if m != 0.0}) > 1


def test_flip_crop_outputs_are_flipped_and_shifted_copies():
    image = images(1, 3, 8)[0]
    x = image.expand(300, -1, -1, -1).contiguous()
    out = run(x, 3, policy="flip_crop", crop_padding=1)
    padded = nn.functional.pad(image, (1, 1, 1, 1))
    crops = {(r, c): padded[:, r : r + 8, c : c + 8] for r in range(3) for c in range(3)}
    candidates = {(r, c, False): v for (r, c), v in crops.items()}
    candidates |= {(r, c, True): v.flip(-1) for (r, c), v in crops.items()}
    seen = set()
    for o in out:
        match = [k for k, v in candidates.items() if torch.equal(o, v)]
        assert len(match) == 1, "output is not a shifted (and maybe flipped) copy of the input"
        seen.add(match[0])
    flipped = {k[2] for k in seen}
    assert flipped == {True, False}, "flips are all-or-nothing over the batch"
    assert seen == set(candidates)  # all 9 offsets, flipped and not


def test_flip_crop_on_distinct_images_keeps_each_image():
    x = images(64, 1, 8, seed=5)
    out = run(x, 0, policy="flip_crop", crop_padding=2)
    flips = 0
    for xi, oi in zip(x, out, strict=True):
        padded = nn.functional.pad(xi, (2,) * 4)
        crops = [padded[:, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        plain = any(torch.equal(oi, c) for c in crops)
        mirrored = any(torch.equal(oi, c.flip(-1)) for c in crops)
        assert plain or mirrored, "an output is not a copy of its own input"
        flips += mirrored and not plain
    assert 10 < flips < 54  # p = 0.5 per image


# --- 3. random erasing ----------------------------------------------------------------------
def test_random_erasing_erases_about_p_of_the_images_one_rectangle_each():
    x = images(400, 3, 32, seed=2)
    out = run(x, 0, policy="random_erasing", erasing_p=0.5)
    diff = (out != x).any(1)  # (n, h, w): erased pixels (the input has no zeros)
    erased = diff.flatten(1).any(1)
    assert 0.3 < erased.float().mean().item() < 0.7
    areas = []
    for d, o in zip(diff[erased], out[erased], strict=True):
        rows, cols = d.any(1).nonzero()[:, 0], d.any(0).nonzero()[:, 0]
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        box = torch.zeros_like(d)
        box[r0:r1, c0:c1] = True
        assert torch.equal(d, box), "the erased region is not one rectangle"
        assert (o[:, r0:r1, c0:c1] == 0).all(), "erased pixels are not zero in every channel"
        areas.append(((r1 - r0) * (c1 - c0)).item() / (32 * 32))
        ratio = ((r1 - r0) / (c1 - c0)).item()
        assert 0.2 < ratio < 5.0
    assert min(areas) > 0.01 and max(areas) < 0.40
    assert max(areas) - min(areas) > 0.1, "every image got the same box size"


def test_random_erasing_probability_one_erases_every_image():
    x = images(100, 1, 32, seed=4)
    assert changed(run(x, 0, policy="random_erasing", erasing_p=1.0), x).all()


def test_random_erasing_boxes_fit_strictly_inside_small_images():
    """On 8x8 many tries do not fit (torchvision retries them): no box spans a whole side."""
    x = images(300, 1, 8, seed=6)
    diff = (run(x, 0, policy="random_erasing", erasing_p=1.0) != x)[:, 0]
    rows, cols = diff.any(2).sum(1), diff.any(1).sum(1)
    assert (rows < 8).all() and (cols < 8).all()
    assert (diff.flatten(1).sum(1) <= 25).all()  # round(sqrt(0.33 * 64 * r)) sides: at most 5x5
    assert (rows > 0).float().mean() > 0.9


# --- 4. golden: a sub-batch equals torchvision's op on each image alone ---------------------
def test_rotate_group_equals_torchvision_per_image():
    x = images(12, 3, 16, seed=7)
    n = len(x)
    space, names = A.RANDAUGMENT_SPACE, list(A.RANDAUGMENT_SPACE)
    op = torch.full((n,), names.index("Rotate"))
    bins = torch.full((n,), 9)
    negative = torch.zeros(n, dtype=torch.bool)
    out = A._apply_grouped(x, space, A.NUM_BINS, op, bins, negative)
    angle = float(torch.linspace(0.0, 30.0, 31)[9])
    for xi, oi in zip(x, out, strict=True):
        want = TF.rotate(xi, angle=angle, interpolation=InterpolationMode.NEAREST)
        assert torch.equal(oi, want)
    assert not torch.equal(out, x)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    ("space", "num_bins", "torchvision_cls"),
    [
        (A.RANDAUGMENT_SPACE, A.NUM_BINS, T.RandAugment),
        (A.TRIVIALAUGMENT_SPACE, A.NUM_BINS, T.TrivialAugmentWide),
        (A.AUTOAUGMENT_SPACE, A.AUTOAUGMENT_BINS, T.AutoAugment),
    ],
    ids=["randaugment", "trivialaugment", "autoaugment"],
)
def test_mixed_groups_equal_torchvision_per_image(space, num_bins, torchvision_cls, channels):
    """Every op, bin and sign mixed in one batch: each image gets torchvision's own transform
    (the private `_apply_image_or_video_transform` that its AutoAugment classes call)."""
    g = torch.Generator().manual_seed(11)
    n, size = 96, 12
    x = images(n, channels, size, seed=3)
    names = list(space)
    op = torch.randint(len(names), (n,), generator=g)
    bins = torch.randint(num_bins, (n,), generator=g)
    negative = torch.rand(n, generator=g) < 0.5
    out = A._apply_grouped(x, space, num_bins, op, bins, negative)
    reference = torchvision_cls()
    for i in range(n):
        name = names[op[i]]
        magnitude = A.op_magnitude(space, name, int(bins[i]), bool(negative[i]), num_bins, 12, 12)
        want = reference._apply_image_or_video_transform(
            x[i], name, magnitude, interpolation=reference.interpolation, fill=reference._fill
        )
        assert torch.equal(out[i], want), f"image {i}: {name} {magnitude}"


def test_op_tables_match_torchvision():
    for ours, theirs, bins in [
        (A.RANDAUGMENT_SPACE, T.RandAugment._AUGMENTATION_SPACE, 31),
        (A.TRIVIALAUGMENT_SPACE, T.TrivialAugmentWide._AUGMENTATION_SPACE, 31),
        (A.AUTOAUGMENT_SPACE, T.AutoAugment._AUGMENTATION_SPACE, 10),
    ]:
        assert list(ours) == list(theirs)
        for name, (fn, signed) in ours.items():
            assert signed == theirs[name][1], name
            for h, w in [(8, 8), (32, 24)]:
                a, b = fn(bins, h, w), theirs[name][0](bins, h, w)
                assert (a is None and b is None) or torch.equal(a, b), name
    assert T.AutoAugment()._policies == A.IMAGENET_POLICY
    assert A.TRIVIAL_LEVELS.tolist() == [0, 4, 9, 13, 17, 21, 26, 30]


def test_color_leaves_greyscale_unchanged_and_changes_colour():
    grey, colour = images(8, 1, 8), images(8, 3, 8)
    assert torch.equal(A.apply_op(grey, "Color", 0.9), grey)
    assert not torch.equal(A.apply_op(colour, "Color", 0.9), colour)


# --- 5. devices -----------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("policy", ["crop", "flip_crop", "random_erasing"])
def test_cuda_draws_match_cpu(policy):
    x = images(64, 3, 16)
    assert torch.equal(run(x, 0, policy=policy), run(x.cuda(), 0, policy=policy).cpu())


# --- 6. never at eval -----------------------------------------------------------------------
def test_evaluate_never_augments(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("augment was called")

    monkeypatch.setattr(A, "augment", forbidden)
    if hasattr(finetune, "augment"):  # the core's own reference to it
        monkeypatch.setattr(finetune, "augment", forbidden)
    config = TrialConfig.model_validate(
        {"name": "t", "seed": 0, "train": {"epochs": 1, "device": "cpu"}, "aug": {"policy": "crop"}}
    )
    task = hdata.load_target(config.data, 0)
    model = models.build_model(config.model, 5, config.reg.dropout)
    loss, correct = finetune.evaluate(model, task.x_val, task.y_val)
    assert math.isfinite(loss.item()) and 0 <= correct.item() <= len(task.x_val)
    # the same patch does catch the training path (so the check above can fail)
    with pytest.raises(AssertionError, match="augment was called"):
        finetune.fit(config, model, task)


def test_random_resized_crop_takes_each_image_s_own_box_and_keeps_the_full_box_exact():
    """The whole image as the box gives the image back (roi_align, aligned sampling); a
    constant image stays constant; each image draws its own box."""
    x = images(16, 3, 24)
    full = A.random_resized_crop(
        x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0)
    )
    assert torch.equal(full, x)
    flat = torch.full((4, 1, 20, 20), 77, dtype=torch.uint8)
    assert torch.equal(A.random_resized_crop(flat, torch.Generator().manual_seed(1)), flat)
    out = A.random_resized_crop(x, torch.Generator().manual_seed(2))
    assert changed(out, x).all()  # 16 boxes, none the whole image
    assert len({o.float().mean().item() for o in out}) > 1

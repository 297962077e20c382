"""Data augmentation on the training device, batched, with randomness drawn per image.

`augment(x, spec, generator)` takes a batch (N, C, H, W), C = 1 or 3, uint8 (the core's images)
or float in [0, 1], on any device, and returns a batch of the same shape, dtype and device;
the eval path never calls it. A torchvision v2 transform called on a whole batch draws one set
of parameters for all of it; here every random draw is per image, made with `generator` (a CPU
generator seeded by the core) on the CPU, and only small index/parameter tensors move to the
device. Pixel work runs batched on the device.

| aug.policy       | on a batch, per image                                                         |
|------------------|-------------------------------------------------------------------------------|
| `none`           | unchanged                                                                     |
| `crop`           | zero-pad by `crop_padding`, crop at its own random offset (a translation)     |
| `flip_crop`      | `crop`, then a horizontal flip with probability 0.5                           |
| `randaugment`    | `num_ops` rounds; each round one of 14 ops (torchvision RandAugment's list,   |
|                  | Identity included) at bin `magnitude` of 31, random sign for signed ops       |
| `trivialaugment` | one of 14 ops (torchvision TrivialAugmentWide's list and ranges) at a uniform |
|                  | random magnitude, quantized to 8 of the 31 bins (0, 4, 9, 13, 17, 21, 26, 30) |
| `autoaugment`    | one of the 25 sub-policies of torchvision's ImageNet AutoAugment policy: two  |
|                  | ops, each applied with its own probability, magnitude bin and random sign     |
| `random_erasing` | with probability `erasing_p`, one rectangle (area 2-33 %, aspect 0.3-3.3, as  |
|                  | torchvision RandomErasing, up to 10 tries) set to zero                        |

Ops (randaugment, trivialaugment, autoaugment) are torchvision.transforms.v2.functional's, with
torchvision's interpolation (nearest) and fill (0): images that drew the same (op, magnitude,
sign) are transformed together as one sub-batch and scattered back, so each image gets exactly
what torchvision would give it alone. Greyscale (C = 1) images: Color (saturation) is drawn as
often as on colour images and leaves them unchanged, as torchvision and PIL do.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from harness.config.spec import AugSpec

# --- op spaces: name -> (magnitudes(num_bins, height, width) -> 1-D tensor | None, signed) ---
# Copied from torchvision.transforms.v2 (RandAugment, TrivialAugmentWide, AutoAugment); a test
# checks that they still agree.
Magnitudes = Callable[[int, int, int], torch.Tensor | None]


def _posterize_bits(levels: int) -> Magnitudes:
    return lambda n, h, w: (8 - (torch.arange(n) / ((n - 1) / levels))).round().int()


RANDAUGMENT_SPACE: dict[str, tuple[Magnitudes, bool]] = {
    "Identity": (lambda n, h, w: None, False),
    "ShearX": (lambda n, h, w: torch.linspace(0.0, 0.3, n), True),
    "ShearY": (lambda n, h, w: torch.linspace(0.0, 0.3, n), True),
    "TranslateX": (lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * w, n), True),
    "TranslateY": (lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * h, n), True),
    "Rotate": (lambda n, h, w: torch.linspace(0.0, 30.0, n), True),
    "Brightness": (lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Color": (lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Contrast": (lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Sharpness": (lambda n, h, w: torch.linspace(0.0, 0.9, n), True),
    "Posterize": (_posterize_bits(4), False),
    "Solarize": (lambda n, h, w: torch.linspace(1.0, 0.0, n), False),
    "AutoContrast": (lambda n, h, w: None, False),
    "Equalize": (lambda n, h, w: None, False),
}
AUTOAUGMENT_SPACE = {k: v for k, v in RANDAUGMENT_SPACE.items() if k != "Identity"}
AUTOAUGMENT_SPACE["Invert"] = (lambda n, h, w: None, False)
TRIVIALAUGMENT_SPACE: dict[str, tuple[Magnitudes, bool]] = {
    "Identity": (lambda n, h, w: None, False),
    "ShearX": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "ShearY": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "TranslateX": (lambda n, h, w: torch.linspace(0.0, 32.0, n), True),
    "TranslateY": (lambda n, h, w: torch.linspace(0.0, 32.0, n), True),
    "Rotate": (lambda n, h, w: torch.linspace(0.0, 135.0, n), True),
    "Brightness": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "Color": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "Contrast": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "Sharpness": (lambda n, h, w: torch.linspace(0.0, 0.99, n), True),
    "Posterize": (_posterize_bits(6), False),
    "Solarize": (lambda n, h, w: torch.linspace(1.0, 0.0, n), False),
    "AutoContrast": (lambda n, h, w: None, False),
    "Equalize": (lambda n, h, w: None, False),
}
NUM_BINS = 31  # RandAugment's and TrivialAugmentWide's magnitude bins
AUTOAUGMENT_BINS = 10
# TrivialAugmentWide draws one of 31 bins per image; drawing one of these 8 (evenly spread,
# both ends kept) bounds the number of (op, magnitude, sign) groups per batch to 163.
TRIVIAL_LEVELS = torch.linspace(0, NUM_BINS - 1, 8).round().long()

# torchvision's AutoAugmentPolicy.IMAGENET: 25 pairs of (op, probability, magnitude bin).
IMAGENET_POLICY: list[tuple[tuple[str, float, int | None], tuple[str, float, int | None]]] = [
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
]

ERASING_SCALE = (0.02, 0.33)
ERASING_RATIO = (0.3, 3.3)
ERASING_TRIES = 10


# --- one op on a (sub-)batch: torchvision's _AutoAugmentBase._apply_image_or_video_transform ---
def apply_op(x: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    """torchvision's op `name` at signed `magnitude` on every image of `x` (nearest, fill 0).

    Every op acts on each image of a batch on its own (affine maps, per-pixel maps, and per-image
    statistics for Contrast, AutoContrast and Equalize), so a sub-batch gives what each image
    would give alone.
    """
    nearest = InterpolationMode.NEAREST
    if name == "Identity":
        return x
    if name in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        return F.affine(
            x,
            angle=0.0,
            translate=[0, 0],
            scale=1.0,
            shear=[shear, 0.0] if name == "ShearX" else [0.0, shear],
            interpolation=nearest,
            center=[0, 0],
        )
    if name in ("TranslateX", "TranslateY"):
        t = int(magnitude)
        return F.affine(
            x,
            angle=0.0,
            translate=[t, 0] if name == "TranslateX" else [0, t],
            scale=1.0,
            shear=[0.0, 0.0],
            interpolation=nearest,
        )
    if name == "Rotate":
        return F.rotate(x, angle=magnitude, interpolation=nearest)
    if name == "Brightness":
        return F.adjust_brightness(x, brightness_factor=1.0 + magnitude)
    if name == "Color":  # saturation: a greyscale image is returned unchanged
        return F.adjust_saturation(x, saturation_factor=1.0 + magnitude)
    if name == "Contrast":
        return F.adjust_contrast(x, contrast_factor=1.0 + magnitude)
    if name == "Sharpness":
        return F.adjust_sharpness(x, sharpness_factor=1.0 + magnitude)
    if name == "Posterize":
        return F.posterize(x, bits=int(magnitude))
    if name == "Solarize":
        bound = 1.0 if x.is_floating_point() else float(torch.iinfo(x.dtype).max)
        return F.solarize(x, threshold=bound * magnitude)
    if name == "AutoContrast":
        return F.autocontrast(x)
    if name == "Equalize":
        return F.equalize(x)
    if name == "Invert":
        return F.invert(x)
    raise ValueError(f"unknown augmentation op {name!r}")


def op_magnitude(
    space: dict[str, tuple[Magnitudes, bool]],
    name: str,
    bin_index: int,
    negative: bool,
    num_bins: int,
    height: int,
    width: int,
) -> float:
    """The signed magnitude torchvision uses for `name` at `bin_index` (0.0 for ops without)."""
    magnitudes_fn, signed = space[name]
    magnitudes = magnitudes_fn(num_bins, height, width)
    if magnitudes is None:
        return 0.0
    magnitude = float(magnitudes[bin_index])
    return -magnitude if signed and negative else magnitude


def _apply_grouped(
    x: torch.Tensor,
    space: dict[str, tuple[Magnitudes, bool]],
    num_bins: int,
    op: torch.Tensor,
    bin_index: torch.Tensor,
    negative: torch.Tensor,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """One round: image i gets op `op[i]` at (`bin_index[i]`, `negative[i]`) where `active[i]`.

    The per-image draws (CPU tensors) are grouped by distinct (op, bin, sign); each group's
    images are transformed together as one sub-batch on x's device and copied back into place.
    """
    names = list(space)
    _, _, h, w = x.shape
    # canonical keys: ops without a magnitude ignore the bin, unsigned ops ignore the sign
    has_mag = torch.tensor([space[k][0](2, h, w) is not None for k in names])[op]
    signed = torch.tensor([space[k][1] for k in names])[op]
    bin_index = torch.where(has_mag, bin_index, 0)
    negative = negative & signed & has_mag
    key = (op * num_bins + bin_index) * 2 + negative.long()
    skip = torch.tensor([k == "Identity" or (k == "Color" and x.shape[1] == 1) for k in names])
    keep = ~skip[op] if active is None else active & ~skip[op]
    key = torch.where(keep, key, -1)
    key_sorted, order = torch.sort(key, stable=True)
    groups, counts = torch.unique_consecutive(key_sorted, return_counts=True)
    order = to_device(order, x.device)
    out = x.clone()
    start = 0
    for group, count in zip(groups.tolist(), counts.tolist(), strict=True):
        idx = order[start : start + count]
        start += count
        if group < 0:
            continue
        op_id, rest = divmod(group, num_bins * 2)
        b, neg = divmod(rest, 2)
        name = names[op_id]
        magnitude = op_magnitude(space, name, b, bool(neg), num_bins, h, w)
        out.index_copy_(0, idx, apply_op(x.index_select(0, idx), name, magnitude))
    return out


# --- the policies ------------------------------------------------------------------------------
def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small tensor of random draws (made on the host from the seeded generator) moved to the
    training device without waiting for it: a copy from pageable memory would synchronise the
    host with the device on every batch; from pinned memory it is queued like a kernel."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image random translation of a batch: zero-pad, then crop each image at its own offset.

    (A torchvision v2 transform called on a batch draws one offset for the whole batch.)
    """
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    offsets = to_device(torch.randint(0, 2 * padding + 1, (2, n), generator=generator), x.device)
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # (n, h)
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # (n, w)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


def random_resized_crop(
    x: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Per-image random-resized crop (Inception-style, as torchvision's RandomResizedCrop): each
    image draws an area share in `scale` and a log-uniform aspect in `ratio`, the box is
    clamped into the image and resized back to the image's side (bilinear, torchvision's
    roi_align), in one batched call. With `data.cache_size` the image is larger than what
    the network sees, so the crop keeps more detail than cropping the final pixels."""
    from torchvision.ops import roi_align

    n, _, h, w = x.shape
    draws = torch.rand((3, n), generator=generator, dtype=torch.float64)
    area = (scale[0] + (scale[1] - scale[0]) * draws[0]) * h * w
    log_r = torch.log(torch.tensor(ratio, dtype=torch.float64))
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * draws[1])
    cw = torch.sqrt(area * aspect).clamp(1, w)
    ch = torch.sqrt(area / aspect).clamp(1, h)
    offset = torch.rand((2, n), generator=generator, dtype=torch.float64)
    left, top = offset[0] * (w - cw), offset[1] * (h - ch)
    boxes = torch.stack([torch.arange(n, dtype=torch.float64), left, top, left + cw, top + ch], 1)
    boxes = to_device(boxes.float(), x.device)
    out = roi_align(x.float(), boxes, output_size=(h, w), spatial_scale=1.0, aligned=True)
    return out.round().clamp(0, 255).to(x.dtype) if x.dtype == torch.uint8 else out


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Each image flipped left-right on its own with probability `p`."""
    flip = to_device(torch.rand(len(x), generator=generator) < p, x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def rand_augment(
    x: torch.Tensor, num_ops: int, magnitude: int, generator: torch.Generator
) -> torch.Tensor:
    """RandAugment: `num_ops` rounds, each image drawing its own op and sign every round."""
    n = len(x)
    names = list(RANDAUGMENT_SPACE)
    for _ in range(num_ops):
        op = torch.randint(len(names), (n,), generator=generator)
        negative = torch.rand(n, generator=generator) <= 0.5
        bins = torch.full((n,), magnitude, dtype=torch.long)
        x = _apply_grouped(x, RANDAUGMENT_SPACE, NUM_BINS, op, bins, negative)
    return x


def trivial_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """TrivialAugmentWide: one op per image at a random (quantized) magnitude bin and sign."""
    n = len(x)
    op = torch.randint(len(TRIVIALAUGMENT_SPACE), (n,), generator=generator)
    bins = TRIVIAL_LEVELS[torch.randint(len(TRIVIAL_LEVELS), (n,), generator=generator)]
    negative = torch.rand(n, generator=generator) <= 0.5
    return _apply_grouped(x, TRIVIALAUGMENT_SPACE, NUM_BINS, op, bins, negative)


def auto_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """AutoAugment (ImageNet policy): each image draws a sub-policy, then each of its two ops
    is applied with its probability (and a random sign)."""
    n = len(x)
    names = list(AUTOAUGMENT_SPACE)
    policy = torch.randint(len(IMAGENET_POLICY), (n,), generator=generator)
    applied = torch.rand(n, 2, generator=generator)
    negative = torch.rand(n, 2, generator=generator) <= 0.5
    for stage in range(2):
        steps = [pair[stage] for pair in IMAGENET_POLICY]
        op = torch.tensor([names.index(name) for name, _, _ in steps])[policy]
        prob = torch.tensor([p for _, p, _ in steps])[policy]
        bins = torch.tensor([b or 0 for _, _, b in steps])[policy]
        active = applied[:, stage] <= prob
        x = _apply_grouped(
            x, AUTOAUGMENT_SPACE, AUTOAUGMENT_BINS, op, bins, negative[:, stage], active
        )
    return x


def random_erasing(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Each image, with probability `p`, gets one random rectangle set to zero.

    The box is drawn as torchvision's RandomErasing draws it (area fraction in ERASING_SCALE,
    log-uniform aspect ratio in ERASING_RATIO, the first of 10 tries that fits strictly inside
    the image; none fits: not erased), per image, and applied as one batched mask.
    """
    n, _, h, w = x.shape
    lo, hi = ERASING_SCALE
    log_lo, log_hi = math.log(ERASING_RATIO[0]), math.log(ERASING_RATIO[1])
    area = h * w * (lo + (hi - lo) * torch.rand(n, ERASING_TRIES, generator=generator))
    ratio = torch.exp(
        log_lo + (log_hi - log_lo) * torch.rand(n, ERASING_TRIES, generator=generator)
    )
    bh = torch.sqrt(area * ratio).round().long()
    bw = torch.sqrt(area / ratio).round().long()
    fits = (bh < h) & (bw < w)
    first = fits.long().argmax(1, keepdim=True)  # the first try that fits
    bh, bw = bh.gather(1, first)[:, 0], bw.gather(1, first)[:, 0]
    top = (torch.rand(n, generator=generator) * (h - bh + 1)).floor().long()
    left = (torch.rand(n, generator=generator) * (w - bw + 1)).floor().long()
    erase = (torch.rand(n, generator=generator) < p) & fits.any(1)
    bh, bw = bh * erase, bw * erase  # not erased: an empty box
    box = to_device(torch.stack([top, top + bh, left, left + bw]), x.device)  # one transfer
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    in_rows = (rows >= box[0][:, None]) & (rows < box[1][:, None])  # (n, h)
    in_cols = (cols >= box[2][:, None]) & (cols < box[3][:, None])  # (n, w)
    mask = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (n, 1, h, w)
    return x.masked_fill(mask, 0)


def augment(x: torch.Tensor, spec: AugSpec, generator: torch.Generator) -> torch.Tensor:
    """The policy `spec.policy` applied to a training batch (same shape, dtype and device)."""
    policy = spec.policy
    if policy == "none":
        return x
    if policy == "crop":
        return random_crop(x, spec.crop_padding, generator)
    if policy == "flip_crop":
        return random_flip(random_crop(x, spec.crop_padding, generator), generator)
    if policy == "randaugment":
        return rand_augment(x, spec.num_ops, spec.magnitude, generator)
    if policy == "trivialaugment":
        return trivial_augment(x, generator)
    if policy == "autoaugment":
        return auto_augment(x, generator)
    if policy == "random_erasing":
        return random_erasing(x, spec.erasing_p, generator)
    if policy == "random_resized_crop":
        return random_resized_crop(x, generator)
    if policy == "random_resized_crop_flip":
        return random_flip(random_resized_crop(x, generator), generator)
    raise ValueError(f"aug.policy: unknown policy {policy!r}")

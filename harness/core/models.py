"""Build a model: the small CNN or any torchvision classifier, with a new head (dropout, then a
linear layer for the target's classes), pretrained weights, and the input its weights expect.

A built model is an `ImageModel`: `prep` (uint8 images -> float, channels, size, normalization,
on the device, per batch) then `net` (the network). `head_module` is the part replaced for the
target task; `stages` are the backbone's blocks from input to head, which partition every
backbone parameter. Weights come from `model.pretrained: imagenet` (the torchvision weights
enum member `model.weights`, read from torchvision's cache: no download happens offline) and/or
a local state_dict file (`pretrained=`): every weight but the head's is loaded.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm
from torchvision.models import WeightsEnum
from torchvision.models.vision_transformer import interpolate_embeddings
from torchvision.ops import StochasticDepth

from harness.config.spec import STOCHASTIC_DEPTH_ARCHS, TORCHVISION_ARCHS, ModelSpec, TrialConfig
from harness.core import checkpoints
from harness.core.layouts import head_path, layout_of, submodule
from harness.core.small_cnn import SmallCNN
from harness.data.sources import DIGITS_MEAN, DIGITS_STD


class WeightsUnavailable(ValueError):
    """Torchvision weights that are not in the local cache and cannot be downloaded here."""


# --- Inputs and preprocessing ------------------------------------------------------------------
@dataclass(frozen=True)
class Inputs:
    """What the data looks like: channels, side length, per-channel mean and std in [0, 1]."""

    channels: int = 1
    size: int = 8
    mean: tuple[float, ...] = DIGITS_MEAN
    std: tuple[float, ...] = DIGITS_STD

    @classmethod
    def of(cls, task) -> Inputs:
        return cls(task.channels, task.image_size, tuple(task.mean), tuple(task.std))


class Preprocess(nn.Module):
    """uint8 (N, C, H, W) -> float in [0, 1] -> `channels` -> `size` x `size` -> normalized."""

    def __init__(self, channels: int, size: int | None, mean, std, eval_crop: float = 1.0):
        super().__init__()
        self.channels, self.size = channels, size
        self.eval_crop = eval_crop  # eval mode: the center eval_crop of each side first
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[1] != self.channels:  # a grey image for a colour network
            x = x.expand(-1, self.channels, -1, -1)
        if self.eval_crop < 1.0 and not self.training:  # data.cache_size: the center crop
            h, w = x.shape[-2:]
            ch, cw = round(h * self.eval_crop), round(w * self.eval_crop)
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top : top + ch, left : left + cw]
        if self.size is not None and x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return (x - self.mean) / self.std


# --- The model and its layout --------------------------------------------------------------------


class ImageModel(nn.Module):
    def __init__(self, prep: Preprocess, net: nn.Module, arch: str = "small_cnn"):
        super().__init__()
        self.prep, self.net = prep, net
        self.arch = arch
        self.layout = layout_of(net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.prep(x))


class Stage(nn.Module):
    """Several parts of a network taken as one stage; it shares, not copies, their parameters."""

    def __init__(self, net: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.names = names
        for name in names:
            key = name.replace(".", "_")
            try:
                self.add_module(key, net.get_submodule(name))
            except AttributeError:  # a bare parameter (a ViT's class token, position embedding)
                self.register_parameter(key, net.get_parameter(name))


def head_module(model: ImageModel) -> nn.Module:
    return model.net.get_submodule(model.layout.head)


def stages(model: ImageModel) -> list[nn.Module]:
    """The backbone's blocks with parameters, from the input to the head (head excluded).

    A stage that is one module of the network is that module; a stage made of several parts
    (a ResNet's conv1 + bn1, a ViT's patch projection + class token + position embedding) is a
    `Stage` that holds them. Every backbone parameter belongs to exactly one stage.
    """
    out = []
    for names in model.layout.stages:
        module = submodule(model.net, names[0]) if len(names) == 1 else None
        out.append(module if module is not None else Stage(model.net, names))
    return out


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    head = {id(p) for p in head_module(model).parameters()}
    return [p for p in model.parameters() if id(p) not in head]


# --- Layouts per family ------------------------------------------------------------------------


# --- torchvision weights ---------------------------------------------------------------------
def imagenet_weights(spec: ModelSpec) -> WeightsEnum | None:
    """The torchvision weights enum member of `model.weights` when `model.pretrained: imagenet`."""
    if spec.pretrained != "imagenet":
        return None
    if spec.arch not in TORCHVISION_ARCHS:
        raise ValueError(
            f"model.pretrained: imagenet weights exist for torchvision models only, not {spec.arch}"
        )
    enum = tvm.get_model_weights(spec.arch)
    try:
        return enum[spec.weights]
    except KeyError:
        raise ValueError(
            f"model.weights: {spec.weights!r} is not a weights of {spec.arch}; "
            f"{enum.__name__} has {', '.join(enum.__members__)}"
        ) from None


def weights_path(weights: WeightsEnum) -> Path:
    """Where torchvision looks for `weights` offline: $TORCH_HOME/hub/checkpoints/<file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def imagenet_state(weights: WeightsEnum) -> dict[str, torch.Tensor]:
    """The weights' state_dict through torchvision's own loader (its cache, else a download)."""
    path = weights_path(weights)
    try:
        return weights.get_state_dict(progress=False, map_location="cpu", weights_only=True)
    except Exception as err:
        name = f"{type(weights).__name__}.{weights.name}"
        if not path.is_file():
            raise WeightsUnavailable(
                f"model.weights: {name} is not on this machine and cannot be downloaded "
                f"({type(err).__name__}: {err}). Fetch {weights.url} on a connected machine "
                f"and put it at {path} (torchvision's cache, $TORCH_HOME/hub/checkpoints/)."
            ) from None
        raise ValueError(f"model.weights: {name}: cannot read {path}: {err}") from err


# --- Input size --------------------------------------------------------------------------------
FIXED_SIZE = 224  # a ViT's or MaxViT's input size without weights (their builders' default)


def _fixed_size(arch: str) -> bool:
    """Networks built for one input size (position embeddings, attention partitions)."""
    return arch.startswith(("vit_", "maxvit_"))


def input_size(
    spec: ModelSpec, inputs: Inputs = Inputs(), image_size: int | None = None
) -> int | None:
    """The side length the network is fed (Preprocess resizes to it); None: the data's own.

    `image_size` (data.image_size) when given; else the imagenet weights' crop size; else a
    ViT's or MaxViT's 224; else the data's own size, raised to the architecture's minimum
    (torchvision's `min_size`, e.g. 32 for ConvNeXt and VGG, 75 for Inception v3).
    """
    if image_size is not None:
        return image_size
    if spec.arch not in TORCHVISION_ARCHS:
        return None
    weights = imagenet_weights(spec)
    if weights is not None:
        return weights.transforms().crop_size[0]
    if _fixed_size(spec.arch):
        return FIXED_SIZE
    least = tvm.get_model_weights(spec.arch).DEFAULT.meta["min_size"][0]
    return None if inputs.size >= least else least


# --- Stochastic depth ----------------------------------------------------------------------------
_SD_NATIVE = ("convnext_", "efficientnet_")  # the builders take stochastic_depth_prob
_SD_RESCALED = ("swin_", "maxvit_")  # the builders fix it: the built rates are rescaled


def _set_stochastic_depth(net: nn.Module, rate: float) -> None:
    """torchvision's schedule (0 at the first block, linear to `rate` at the last), scaled."""
    layers = [m for m in net.modules() if isinstance(m, StochasticDepth)]
    top = max((m.p for m in layers), default=0.0)
    for m in layers:
        m.p = m.p * rate / top if top > 0 else 0.0


# --- Building ----------------------------------------------------------------------------------
# Builders with a dropout of their own (0.2 to 0.5) before or inside the classifier: off, so
# that `reg.dropout` (before the new head) is the only dropout a trial adds.
# fmt: off
_OWN_DROPOUT = (
    "alexnet", "vgg", "squeezenet", "googlenet", "inception", "mobilenet", "mnasnet",
    "efficientnet",
)
# fmt: on


def _torchvision_net(
    arch: str, weights: WeightsEnum | None, size: int | None, stochastic_depth: float
) -> nn.Module:
    kwargs: dict = {}
    if arch.startswith(_OWN_DROPOUT):
        kwargs["dropout"] = 0.0
    if arch in ("googlenet", "inception_v3"):
        # no auxiliary classifiers; torchvision's weights expect their transform_input
        kwargs.update(aux_logits=False, init_weights=True, transform_input=weights is not None)
    if arch.startswith(_SD_NATIVE):
        kwargs["stochastic_depth_prob"] = stochastic_depth
    if arch.startswith("vit_"):
        patch = int(arch.rsplit("_", 1)[1])
        if size % patch:
            raise ValueError(f"data.image_size: {size} is not a multiple of {arch}'s patch {patch}")
        kwargs["image_size"] = size
    if arch.startswith("maxvit_"):
        kwargs["input_size"] = (size, size)
    try:
        net = tvm.get_model(arch, weights=None, **kwargs)
    except ValueError as err:  # MaxViT: a size its attention partitions do not divide
        raise ValueError(f"data.image_size: {size} does not fit {arch}: {err}") from None
    if arch.startswith(_SD_RESCALED):
        _set_stochastic_depth(net, stochastic_depth)
    return net


def _new_head(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))


def _replace_head(net: nn.Module, num_classes: int, dropout: float) -> None:
    if isinstance(net, tvm.SqueezeNet):
        # its classifier is a 1x1 conv to the classes, ReLU, global pooling: pooling, then the
        # new head (the same linear map, without a ReLU on the logits)
        channels = net.classifier[1].in_channels
        net.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), _new_head(channels, num_classes, dropout)
        )
        return
    path = head_path(net)
    old = net.get_submodule(path)
    parent, _, name = path.rpartition(".")
    setattr(net.get_submodule(parent), name, _new_head(old.in_features, num_classes, dropout))


def _fix_legacy_keys(net: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's DenseNet files name layers `norm.1`; the modules are `norm1` now."""
    if not isinstance(net, tvm.DenseNet):
        return state
    pattern = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
    )
    out = {}
    for key, value in state.items():
        match = pattern.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def _load_backbone(
    model: ImageModel, loaded: dict[str, torch.Tensor], what: str, target: str
) -> None:
    """Load every weight but the head's; a file that does not fit names the keys and shapes."""
    net, layout = model.net, model.layout
    skip = (layout.head, *layout.ignore)

    def kept(key: str) -> bool:
        return not any(key == p or key.startswith(p + ".") for p in skip)

    state = {k.removeprefix("net."): v for k, v in loaded.items()}
    state = {k: v for k, v in _fix_legacy_keys(net, state).items() if kept(k)}
    own = {k: v for k, v in net.state_dict().items() if kept(k)}
    pos = "encoder.pos_embedding"
    if (
        isinstance(net, tvm.VisionTransformer)
        and pos in state
        and state[pos].shape != own[pos].shape
    ):
        state = dict(interpolate_embeddings(net.image_size, net.patch_size, OrderedDict(state)))
    # older torchvision files have no BatchNorm counters: load_state_dict then sets them to 0
    missing = [k for k in own if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{what} does not fit {target}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, shapes differ {shapes[:3]}"
        )
    net.load_state_dict(state, strict=False)


def build_model(
    spec: ModelSpec,
    num_classes: int,
    dropout: float = 0.0,
    pretrained: str | Path | None = None,
    inputs: Inputs = Inputs(),
    *,
    stochastic_depth: float = 0.0,
    image_size: int | None = None,
    load_weights: bool = True,
    eval_crop: float = 1.0,
) -> ImageModel:
    """A fresh model for `num_classes`: the backbone, then dropout and a new linear head.

    `spec.pretrained == "imagenet"`: the torchvision weights `spec.weights` are loaded (offline
    from torchvision's cache; `WeightsUnavailable` names the file to put there), and the input
    follows them (their crop size and mean/std). `pretrained`: a local state_dict file, a
    harness weights file (keys `net.*`) or a bare network state_dict; every weight but the head's
    is loaded. `stochastic_depth`: the drop rate of the last block, for the architectures in
    `STOCHASTIC_DEPTH_ARCHS` (0 turns torchvision's default rates off). `image_size`: the side
    the network is fed (default: `input_size`). `load_weights=False`: the same architecture and
    input (the weights' size and statistics included) without loading any weights, for a
    checkpoint that is loaded next.
    """
    arch = spec.arch
    if stochastic_depth > 0 and arch not in STOCHASTIC_DEPTH_ARCHS:
        raise ValueError(
            f"reg.stochastic_depth: {arch} has no stochastic depth; the architectures that have "
            f"it: {', '.join(STOCHASTIC_DEPTH_ARCHS)}"
        )
    size = input_size(spec, inputs, image_size)
    if arch == "small_cnn":
        net = SmallCNN(num_classes, width=spec.width, dropout=dropout, in_ch=inputs.channels)
        prep = Preprocess(inputs.channels, size, inputs.mean, inputs.std, eval_crop)
        model = ImageModel(prep, net, arch)
        target = f"{arch} (width {spec.width})"
    else:
        weights = imagenet_weights(spec)
        net = _torchvision_net(arch, weights, size, stochastic_depth)
        _replace_head(net, num_classes, dropout)
        mean, std = inputs.mean, inputs.std
        if weights is not None:
            preset = weights.transforms()
            mean, std = tuple(preset.mean), tuple(preset.std)
        model = ImageModel(Preprocess(3, size, mean, std, eval_crop), net, arch)
        target = arch
        if weights is not None and load_weights:
            name = f"model.weights: {type(weights).__name__}.{weights.name}"
            _load_backbone(model, imagenet_state(weights), name, target)
    if pretrained is not None and load_weights:
        _load_backbone(
            model, checkpoints.load_weights(pretrained), f"model.pretrained: {pretrained}", target
        )
    return model


def data_size_hint(config: TrialConfig) -> int | None:
    """The side an image folder is loaded at for this config: the model's input size."""
    return input_size(config.model, Inputs(channels=3, size=0), config.data.image_size) or None


def model_for(
    config: TrialConfig, data, pretrained: str | Path | None = None, load_weights: bool = True
) -> ImageModel:
    """`build_model` with everything a trial's config says (dropout, stochastic depth, size)."""
    return build_model(
        config.model,
        data.num_classes,
        config.reg.dropout,
        pretrained,
        Inputs.of(data),
        stochastic_depth=config.reg.stochastic_depth,
        image_size=config.data.image_size,
        load_weights=load_weights,
        eval_crop=eval_crop(config.data),
    )


def eval_crop(data) -> float:
    """The share of each side evaluation keeps (the center): image_size / data.cache_size."""
    return data.image_size / data.cache_size if data.cache_size else 1.0

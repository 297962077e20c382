"""Where the stages and the head are in a network, by qualified name: one rule per torchvision
family (ResNet, RegNet, EfficientNet, ViT, Swin, ...) and a generic one for the rest."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn
from torchvision import models as tvm
from torchvision.models.densenet import _DenseBlock, _Transition
from torchvision.models.googlenet import Inception
from torchvision.models.inception import InceptionA, InceptionB, InceptionC, InceptionD, InceptionE
from torchvision.models.squeezenet import Fire

from harness.core.small_cnn import SmallCNN


@dataclass(frozen=True)
class Layout:
    """Where things are in a network, by qualified name (modules or parameters)."""

    head: str  # the replaced head
    stages: tuple[tuple[str, ...], ...]  # each stage: the modules / parameters it holds
    ignore: tuple[str, ...] = ()  # key prefixes of a weights file never loaded (old heads, aux)


def submodule(net: nn.Module, name: str) -> nn.Module | None:
    try:
        return net.get_submodule(name)
    except AttributeError:
        return None


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _each(net: nn.Module, container: str, skip: str = "") -> list[tuple[str, ...]]:
    """One stage per child of `container` that has parameters (`skip`: the head)."""
    return [
        (_join(container, name),)
        for name, child in net.get_submodule(container).named_children()
        if _has_params(child) and _join(container, name) != skip
    ]


def _runs(
    net: nn.Module, container: str, is_block: Callable[[nn.Module], bool], skip: str = ""
) -> list[tuple[str, ...]]:
    """Blocks of `container` each a stage; the loose layers between them grouped into one."""
    out, loose = [], []
    for name, child in net.get_submodule(container).named_children():
        full = _join(container, name)
        if full == skip or not _has_params(child):
            continue
        if is_block(child):
            if loose:
                out.append(tuple(loose))
                loose = []
            out.append((full,))
        else:
            loose.append(full)
    return out + ([tuple(loose)] if loose else [])


def _split_at(net: nn.Module, container: str, cut: type) -> list[tuple[str, ...]]:
    """The layers of `container` with parameters, grouped between the `cut` layers (pools)."""
    out, group = [], []
    for name, child in net.get_submodule(container).named_children():
        if isinstance(child, cut):
            if group:
                out.append(tuple(group))
            group = []
        elif _has_params(child):
            group.append(_join(container, name))
    return out + ([tuple(group)] if group else [])


def _generic(net: nn.Module, head: str, prefix: str = "") -> Iterator[tuple[str, ...]]:
    """Each child with parameters; a child that holds the head is split the same way."""
    module = net.get_submodule(prefix)
    own = tuple(_join(prefix, n) for n, _ in module.named_parameters(recurse=False))
    if own:
        yield own
    for name, child in module.named_children():
        full = _join(prefix, name)
        if full == head or not _has_params(child):
            continue
        if head.startswith(full + "."):
            yield from _generic(net, head, full)
        else:
            yield (full,)


def _last_linear(net: nn.Module) -> str:
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(net).__name__}: no linear classifier layer to replace")
    return names[-1]


# Where each torchvision family keeps its classifier (the layer replaced by dropout + linear).
def head_path(net: nn.Module) -> str:
    if isinstance(net, tvm.ResNet | tvm.RegNet | tvm.ShuffleNetV2 | tvm.GoogLeNet | tvm.Inception3):
        return "fc"
    if isinstance(net, tvm.DenseNet):
        return "classifier"
    if isinstance(net, tvm.VisionTransformer):
        return "heads.head"
    if isinstance(net, tvm.SwinTransformer):
        return "head"
    if isinstance(net, tvm.SqueezeNet):
        return "classifier.2"  # after `_replace_head`: pool, flatten, head
    if isinstance(
        net,
        tvm.MobileNetV2
        | tvm.MobileNetV3
        | tvm.EfficientNet
        | tvm.ConvNeXt
        | tvm.VGG
        | tvm.AlexNet
        | tvm.MNASNet
        | tvm.MaxVit,
    ):
        return f"classifier.{len(net.classifier) - 1}"
    return _last_linear(net)


def layout_of(net: nn.Module) -> Layout:
    """The head and the stages of a network (after its head has been replaced)."""
    if isinstance(net, SmallCNN):
        return Layout("head", tuple(_each(net, "stages")))
    head = head_path(net)
    if isinstance(net, tvm.ResNet):
        layers = [(f"layer{i}",) for i in range(1, 5)]
        return Layout(head, (("conv1", "bn1"), *layers))
    if isinstance(net, tvm.RegNet):
        return Layout(head, (("stem",), *_each(net, "trunk_output")))
    if isinstance(net, tvm.ShuffleNetV2):
        return Layout(head, tuple(_each(net, "", skip=head)))
    if isinstance(net, tvm.GoogLeNet):
        block = _runs(net, "", lambda m: isinstance(m, Inception), skip=head)
        return Layout(head, tuple(block), ignore=("aux1", "aux2"))
    if isinstance(net, tvm.Inception3):
        mixed = (InceptionA, InceptionB, InceptionC, InceptionD, InceptionE)
        block = _runs(net, "", lambda m: isinstance(m, mixed), skip=head)
        return Layout(head, tuple(block), ignore=("AuxLogits",))
    if isinstance(net, tvm.MobileNetV2 | tvm.MobileNetV3 | tvm.EfficientNet | tvm.ConvNeXt):
        return Layout(head, (*_each(net, "features"), *_each(net, "classifier", skip=head)))
    if isinstance(net, tvm.MNASNet):
        stacks = _runs(net, "layers", lambda m: isinstance(m, nn.Sequential))
        return Layout(head, tuple(stacks))
    if isinstance(net, tvm.DenseNet):
        blocks = (_DenseBlock, _Transition)
        return Layout(head, tuple(_runs(net, "features", lambda m: isinstance(m, blocks))))
    if isinstance(net, tvm.VGG | tvm.AlexNet):
        convs = _split_at(net, "features", nn.MaxPool2d)
        return Layout(head, (*convs, *_each(net, "classifier", skip=head)))
    if isinstance(net, tvm.SqueezeNet):
        fires = _runs(net, "features", lambda m: isinstance(m, Fire))
        return Layout(head, tuple(fires), ignore=("classifier.1",))  # the old 1x1 conv
    if isinstance(net, tvm.VisionTransformer):
        stem = ("conv_proj", "class_token", "encoder.pos_embedding")
        layers = _each(net, "encoder.layers")
        return Layout(head, (stem, *layers, ("encoder.ln",), *_each(net, "heads", skip=head)))
    if isinstance(net, tvm.SwinTransformer):
        return Layout(head, (*_each(net, "features"), ("norm",)))
    if isinstance(net, tvm.MaxVit):
        blocks = _each(net, "blocks")
        return Layout(head, (("stem",), *blocks, *_each(net, "classifier", skip=head)))
    return Layout(head, tuple(_generic(net, head)))

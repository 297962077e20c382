"""Tests of the model builder for torchvision architectures: the new head, the stages, imagenet
weights read offline from torchvision's cache, weight files, input size and normalization,
stochastic depth. Structure is checked on networks built on the meta device (no memory, no
initialization cost); forward passes run on the CPU with tiny batches."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import StochasticDepth

from harness.config.spec import TORCHVISION_ARCHS, ModelSpec
from harness.core import models, small_cnn

NUM_CLASSES = 3
DROPOUT = 0.25
# Too slow to build for a unit test (several seconds each on the CPU); RegNets cannot be
# built on the meta device, so they are built for real, one at a time.
HEAVY = {"regnet_y_128gf", "regnet_y_32gf", "regnet_x_32gf", "regnet_y_16gf"}
# The replaced head and the first stage, per family.
HEADS = {
    "resnet18": ("fc", ("conv1", "bn1"), 5),
    "resnet50": ("fc", ("conv1", "bn1"), 5),
    "mobilenet_v3_small": ("classifier.3", ("features.0",), 14),  # + classifier.0 (a Linear)
    "efficientnet_b0": ("classifier.1", ("features.0",), 9),
    "convnext_tiny": ("classifier.2", ("features.0",), 9),  # + classifier.0 (LayerNorm2d)
    "vit_b_16": ("heads.head", ("conv_proj", "class_token", "encoder.pos_embedding"), 14),
    "swin_t": ("head", ("features.0",), 9),  # features children + norm
    "densenet121": ("classifier", ("features.conv0", "features.norm0"), 9),
    "vgg11": ("classifier.6", ("features.0",), 7),  # 5 conv blocks, fc6, fc7
    "squeezenet1_0": ("classifier.2", ("features.0",), 9),
    "googlenet": ("fc", ("conv1", "conv2", "conv3"), 10),
    "inception_v3": (
        "fc",
        tuple(f"Conv2d_{n}" for n in ("1a_3x3", "2a_3x3", "2b_3x3", "3b_1x1", "4a_3x3")),
        12,
    ),
}


def spec(arch: str, **fields) -> ModelSpec:
    return ModelSpec(arch=arch, pretrained=fields.pop("pretrained", "none"), **fields)


@functools.cache
def meta_model(arch: str) -> models.ImageModel:
    """Each architecture built once, without weights, on the meta device."""
    with torch.device("meta"):
        return models.build_model(spec(arch), NUM_CLASSES, DROPOUT)


def uint8_batch(n: int = 2, channels: int = 1, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8)


def assert_stages_partition_backbone(model: models.ImageModel) -> None:
    owners: dict[int, int] = {}
    for i, stage in enumerate(models.stages(model)):
        params = list(stage.parameters())
        assert params, f"stage {i} holds no parameters"
        for p in params:
            assert id(p) not in owners, f"a parameter in stages {owners[id(p)]} and {i}"
            owners[id(p)] = i
    backbone = {id(p) for p in models.backbone_parameters(model)}
    assert set(owners) == backbone
    head = {id(p) for p in models.head_module(model).parameters()}
    assert not head & set(owners)


def test_archs_are_torchvisions():
    assert sorted(torchvision.models.list_models(module=torchvision.models)) == sorted(
        TORCHVISION_ARCHS
    )


# --- heads and stages ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(HEADS))
def test_head_is_dropout_then_linear_for_the_classes(arch):
    model = meta_model(arch)
    head_path, first_stage, n_stages = HEADS[arch]
    assert model.layout.head == head_path
    head = models.head_module(model)
    assert head is model.net.get_submodule(head_path)
    assert isinstance(head, nn.Sequential) and len(head) == 2
    assert isinstance(head[0], nn.Dropout) and head[0].p == DROPOUT
    assert isinstance(head[1], nn.Linear) and head[1].out_features == NUM_CLASSES
    assert model.layout.stages[0] == first_stage
    assert len(models.stages(model)) == n_stages
    # no other dropout is left switched on: reg.dropout is the only one the builder adds
    others = [m for m in model.net.modules() if isinstance(m, nn.Dropout) and m is not head[0]]
    assert all(m.p == 0.0 for m in others), arch


@pytest.mark.parametrize("arch", sorted(set(TORCHVISION_ARCHS) - HEAVY))
def test_stages_partition_the_backbone(arch):
    if arch.startswith("regnet"):
        model = models.build_model(spec(arch), NUM_CLASSES, DROPOUT)
    else:
        model = meta_model(arch)
    assert_stages_partition_backbone(model)
    head = models.head_module(model)
    assert head[1].out_features == NUM_CLASSES and head[0].p == DROPOUT


def test_resnet_stages_are_stem_then_layers():
    model = meta_model("resnet18")
    parts = models.stages(model)
    assert isinstance(parts[0], models.Stage)
    assert parts[0].conv1 is model.net.conv1 and parts[0].bn1 is model.net.bn1
    assert parts[1:] == [getattr(model.net, f"layer{i}") for i in range(1, 5)]
    vit = meta_model("vit_b_16")
    stem, *layers, ln = models.stages(vit)
    assert stem.class_token is vit.net.class_token
    assert stem.encoder_pos_embedding is vit.net.encoder.pos_embedding
    assert layers == list(vit.net.encoder.layers) and ln is vit.net.encoder.ln


def test_auxiliary_classifiers_are_off():
    assert meta_model("googlenet").net.aux1 is None
    assert meta_model("inception_v3").net.AuxLogits is None


# --- forward passes --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch, channels, size",
    [
        ("resnet18", 3, 32),
        ("mobilenet_v3_small", 1, 8),
        ("efficientnet_b0", 1, 8),
        ("squeezenet1_0", 1, 8),
        ("googlenet", 1, 8),
    ],
)
def test_forward_gives_logits_for_the_classes(arch, channels, size):
    torch.manual_seed(0)
    inputs = models.Inputs(channels, size, (0.5,) * channels, (0.25,) * channels)
    model = models.build_model(spec(arch), 5, 0.1, inputs=inputs)
    assert model.prep.channels == 3  # torchvision networks take colour images
    model.eval()
    with torch.no_grad():
        out = model(uint8_batch(2, channels, size))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_input_size_rules():
    digits = models.Inputs()  # 1 x 8 x 8
    assert models.input_size(spec("small_cnn")) is None
    assert models.input_size(spec("small_cnn"), digits, 16) == 16
    assert models.input_size(spec("resnet18"), digits) is None  # any size fits a ResNet
    assert models.input_size(spec("convnext_tiny"), digits) == 32  # its minimum
    assert models.input_size(spec("inception_v3"), digits) == 75
    assert models.input_size(spec("vit_b_16"), digits) == 224  # fixed
    assert models.input_size(spec("maxvit_t"), digits) == 224
    assert models.input_size(spec("vit_b_16"), digits, 64) == 64
    assert models.input_size(spec("resnet18", pretrained="imagenet")) == 224
    assert models.input_size(spec("efficientnet_b3", pretrained="imagenet")) == 300
    vit_swag = spec("vit_b_16", pretrained="imagenet", weights="IMAGENET1K_SWAG_E2E_V1")
    assert models.input_size(vit_swag) == 384
    assert models.input_size(vit_swag, digits, 224) == 224


def test_vit_size_follows_image_size_and_is_checked():
    with torch.device("meta"):
        model = models.build_model(spec("vit_b_16"), 4, image_size=32)
        assert model.net.image_size == 32 and model.prep.size == 32
        with pytest.raises(ValueError, match="patch 16"):
            models.build_model(spec("vit_b_16"), 4, image_size=40)
        with pytest.raises(ValueError, match="data.image_size: 32 does not fit maxvit_t"):
            models.build_model(spec("maxvit_t"), 4, image_size=32)
    assert meta_model("vit_b_16").prep.size == 224


# --- imagenet weights, offline -----------------------------------------------------------------
def _checkpoint(tmp_path: Path, weights) -> Path:
    return tmp_path / "hub" / "checkpoints" / os.path.basename(urlparse(weights.url).path)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """TORCH_HOME in tmp_path, and any download fails as it does without a network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, *args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


def test_missing_imagenet_weights_name_the_file_to_fill(offline):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    path = _checkpoint(offline, weights)
    assert path.name == "resnet18-f37072fd.pth"
    assert models.weights_path(weights) == path
    with pytest.raises(models.WeightsUnavailable) as err:
        models.build_model(spec("resnet18", pretrained="imagenet"), 5)
    assert str(path) in str(err.value) and weights.url in str(err.value)
    assert isinstance(err.value, ValueError)


def test_unknown_weights_name_lists_the_enum(offline):
    with pytest.raises(ValueError, match="IMAGENET1K_V1, DEFAULT"):
        models.build_model(spec("resnet18", pretrained="imagenet", weights="IMAGENET1K_V9"), 5)
    with pytest.raises(ValueError, match="IMAGENET1K_SWAG_E2E_V1"):
        models.imagenet_weights(spec("regnet_y_16gf", pretrained="imagenet", weights="V1"))


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "DEFAULT"])
def test_imagenet_weights_load_from_the_cache(offline, name):
    weights = torchvision.models.ResNet18_Weights[name]
    torch.manual_seed(123)
    state = torchvision.models.resnet18().state_dict()  # random, in place of the real file
    path = _checkpoint(offline, weights)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    torch.manual_seed(7)
    model = models.build_model(spec("resnet18", pretrained="imagenet", weights=name), 5, 0.1)
    own = model.net.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(own[key], value), key
    head = models.head_module(model)
    assert head[1].weight.shape == (5, 512) and head[0].p == 0.1
    assert not torch.equal(head[1].weight, state["fc.weight"][:5])
    preset = weights.transforms()
    assert model.prep.size == 224 and model.prep.channels == 3
    assert torch.allclose(model.prep.mean.flatten(), torch.tensor(preset.mean))
    assert torch.allclose(model.prep.std.flatten(), torch.tensor(preset.std))
    resized = models.build_model(
        spec("resnet18", pretrained="imagenet", weights=name), 5, image_size=64
    )
    assert resized.prep.size == 64
    assert torch.allclose(resized.prep.mean.flatten(), torch.tensor(preset.mean))


# --- weight files ------------------------------------------------------------------------------
def test_bare_torchvision_state_dict_as_pretrained(tmp_path):
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "resnet18.pt")
    model = models.build_model(spec("resnet18"), 4, pretrained=tmp_path / "resnet18.pt")
    own = model.net.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert models.head_module(model)[1].weight.shape == (4, 512)
    # the Preprocess of a model without imagenet weights follows the data
    assert model.prep.size is None and model.prep.mean.flatten().tolist() == [
        pytest.approx(models.Inputs().mean[0])
    ]


def test_harness_checkpoint_as_pretrained_and_mismatch(tmp_path):
    torch.manual_seed(2)
    source = models.build_model(spec("resnet18"), 7)
    torch.save(source.state_dict(), tmp_path / "source.pt")
    target = models.build_model(spec("resnet18"), 3, pretrained=tmp_path / "source.pt")
    for key, value in source.state_dict().items():
        if not key.startswith("net.fc."):
            assert torch.equal(target.state_dict()[key], value), key
    with pytest.raises(ValueError, match=r"model.pretrained: .* does not fit resnet34: missing"):
        models.build_model(spec("resnet34"), 3, pretrained=tmp_path / "source.pt")


def test_densenet_file_with_torchvisions_old_key_names(tmp_path):
    """torchvision's DenseNet files: `norm.1` for `norm1`, and no BatchNorm counters."""
    torch.manual_seed(3)
    state = torchvision.models.densenet121().state_dict()
    old = {
        k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }
    assert any(".norm.1." in k for k in old)
    torch.save(old, tmp_path / "densenet.pt")
    model = models.build_model(spec("densenet121"), 4, pretrained=tmp_path / "densenet.pt")
    own = model.net.state_dict()
    for key, value in state.items():
        if not key.startswith("classifier") and not key.endswith("num_batches_tracked"):
            assert torch.equal(own[key], value), key


def test_googlenet_file_with_aux_classifiers_loads(tmp_path):
    torch.manual_seed(4)
    net = torchvision.models.googlenet(aux_logits=True, init_weights=True)
    torch.save(net.state_dict(), tmp_path / "g.pt")
    model = models.build_model(spec("googlenet"), 4, pretrained=tmp_path / "g.pt")
    assert torch.equal(model.net.conv1.conv.weight, net.conv1.conv.weight)


# --- stochastic depth ----------------------------------------------------------------------------
def _rates(model: models.ImageModel) -> list[float]:
    return [m.p for m in model.net.modules() if isinstance(m, StochasticDepth)]


@pytest.mark.parametrize("arch", ["convnext_tiny", "efficientnet_b0", "swin_t", "maxvit_t"])
def test_stochastic_depth_is_applied(arch):
    with torch.device("meta"):
        on = models.build_model(spec(arch), 4, stochastic_depth=0.3)
        off = models.build_model(spec(arch), 4)
    rates = _rates(on)
    assert rates and rates[0] == 0.0 and 0.0 < max(rates) <= 0.3 + 1e-9
    if arch != "efficientnet_b0":  # EfficientNet's schedule stops one block short of the rate
        assert max(rates) == pytest.approx(0.3)
    assert all(b >= a - 1e-9 for a, b in zip(rates, rates[1:], strict=False))  # grows with depth
    assert all(p == 0.0 for p in _rates(off))  # torchvision's default rates are off at 0


@pytest.mark.parametrize("arch", ["resnet18", "vit_b_16", "small_cnn"])
def test_stochastic_depth_unsupported_raises(arch):
    with pytest.raises(ValueError, match=rf"reg.stochastic_depth: {arch} .*convnext_tiny"):
        models.build_model(spec(arch), 4, stochastic_depth=0.1)


# --- small_cnn -----------------------------------------------------------------------------------
def test_small_cnn_is_unchanged():
    model = models.build_model(ModelSpec(pretrained="none"), 5, 0.5)
    assert isinstance(model.net, small_cnn.SmallCNN)
    assert models.head_module(model) is model.net.head
    assert models.stages(model) == list(model.net.stages)
    assert model.prep.size is None and model.prep.channels == 1
    assert_stages_partition_backbone(model)
    assert model(uint8_batch(4)).shape == (4, 5)
    rgb = models.build_model(ModelSpec(), 5, inputs=models.Inputs(3, 32, (0.5,) * 3, (0.2,) * 3))
    assert rgb.net.stages[0][0][0].in_channels == 3 and rgb.prep.channels == 3
    assert models.build_model(ModelSpec(), 5, image_size=16).prep.size == 16


def test_vit_position_embeddings_follow_the_image_size():
    torch.manual_seed(5)
    source = models.build_model(spec("vit_b_32"), 4)  # 224: 7 x 7 patches
    target = models.build_model(spec("vit_b_32"), 4, image_size=64)  # 2 x 2 patches
    models._load_backbone(target, source.state_dict(), "weights", "vit_b_32")
    assert target.net.encoder.pos_embedding.shape == (1, 5, 768)
    assert torch.equal(target.net.conv_proj.weight, source.net.conv_proj.weight)
    assert torch.equal(
        target.net.encoder.pos_embedding[:, 0], source.net.encoder.pos_embedding[:, 0]
    )

"""Model adapters: unwrapping, normalization, input size, image checks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import timm
import torch
from archs import GEMMA4, hooks_left, open_clip_model, open_clip_tower
from PIL import Image

import captum_vit as cv
from captum_vit.models import ImageModel, check_images, fixed_input_size, input_config


def test_timm_config_and_size_precedence():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    config = input_config(model)
    assert config.size == (32, 32)  # the model's own size wins over pretrained_cfg's 224
    assert config.mean == pytest.approx(model.pretrained_cfg["mean"])
    assert config.std == pytest.approx(model.pretrained_cfg["std"])
    assert input_config(model, image_size=48).size == (48, 48)
    assert input_config(model, mean=0.5, std=(0.25,)).std == (0.25, 0.25, 0.25)
    cnn = timm.create_model("resnet18")
    assert input_config(cnn).size == (224, 224)  # from pretrained_cfg
    with pytest.raises(ValueError, match="std must be positive"):
        input_config(model, std=0)


def test_a_patch_embedding_behind_a_stem_does_not_set_the_input_size():
    """Visformer's ``patch_embed1`` embeds its stem's 16-channel map at half the image
    size: its ``img_size`` (80 for a 160 px model) was taken as the model's, and every
    call without images (feature visualization, the default layouts) failed inside timm
    with "Input height (40) doesn't match model (80)"."""
    model = timm.create_model("visformer_tiny", img_size=160).eval()
    assert model.patch_embed1.img_size == (80, 80)
    assert input_config(model).size == (160, 160)
    layout = cv.resolve_layout(model, "stage2")  # default inputs at the model's size
    x = torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        oracle = model.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
    assert layout.grid == tuple(oracle.shape[-2:]) == (10, 10)
    hybrid = timm.create_model("vit_small_r26_s32_224", img_size=64)  # its embedding sees the image
    assert input_config(hybrid).size == (64, 64)


class _Backbone(torch.nn.Module):
    """A user's wrapper around a timm model (a Lightning module, say): no config of its own."""

    def __init__(self, inner: torch.nn.Module, normalize: bool = False) -> None:
        super().__init__()
        self.backbone = inner
        self.normalize = normalize

    def forward(self, x):
        if self.normalize:
            cfg = self.backbone.pretrained_cfg
            x = (x - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[
                :, None, None
            ]
        return self.backbone(x)


def test_a_wrapper_around_a_normalizing_model_says_what_it_assumed():
    """A wrapper without a config of its own got images unnormalized without a word,
    though its timm backbone declares ImageNet-style mean / std."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    vit.eval()
    x = torch.rand(2, 3, 32, 32)
    mean, std = vit.pretrained_cfg["mean"], vit.pretrained_cfg["std"]
    with pytest.warns(UserWarning, match=r"'backbone' \(VisionTransformer\) expects mean=\(0\.5"):
        cv.PatchActivationMap(_Backbone(vit), "backbone.blocks.1")
    direct = cv.PatchActivationMap(vit, "blocks.1").attribute(x, target=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # either choice, made explicit, is silent
        outside = cv.PatchActivationMap(_Backbone(vit), "backbone.blocks.1", mean=mean, std=std)
        inside = cv.PatchActivationMap(
            _Backbone(vit, normalize=True), "backbone.blocks.1", mean=(0, 0, 0), std=(1, 1, 1)
        )
        torch.testing.assert_close(outside.attribute(x, target=3), direct)
        torch.testing.assert_close(inside.attribute(x, target=3), direct)
        cv.ImageModel(vit)  # a model with its own config: nothing to say
        declared = _Backbone(vit)  # how a module:function for the command line says it
        declared.pretrained_cfg = {"mean": mean, "std": std}
        torch.testing.assert_close(
            cv.PatchActivationMap(declared, "backbone.blocks.1").attribute(x, target=3), direct
        )


def test_torchvision_vit_gets_imagenet_normalization_and_its_cls_token_named():
    """torchvision models carry no config: they got no normalization (their weights expect
    ImageNet's) and the class token was named 'prefix0'."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    ).eval()
    config = input_config(vit)
    assert (config.mean, config.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    layer = "encoder.layers.encoder_layer_1"
    assert cv.resolve_layout(vit, layer).prefix_names == ("cls",)
    x = torch.rand(2, 3, 32, 32)
    normalized = (x - torch.tensor(config.mean)[:, None, None]) / torch.tensor(config.std)[
        :, None, None
    ]
    tokens = cv.capture_layers(vit, layer, normalized)  # (B, 1 + 16, C): cls first
    expected = tokens[:, 1:, 5].reshape(2, 4, 4)
    torch.testing.assert_close(cv.PatchActivationMap(vit, layer).attribute(x, target=5), expected)
    # Its forward asserts its own size: a bare AssertionError before.
    assert fixed_input_size(vit) == (32, 32)
    with pytest.raises(ValueError, match="takes 32x32 images only, got 48x48"):
        cv.PatchActivationMap(vit, layer).attribute(torch.rand(1, 3, 48, 48), target=5)


def test_a_model_without_a_size_needs_one_only_where_no_images_are_given():
    """A torchvision CNN records no input size (it takes any). The methods that get images
    refused it at construction before ("pass image_size"); only what makes images from
    nothing needs one."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    cnn = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.rand(2, 3, 48, 48)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    mean, std = (torch.tensor(v)[:, None, None] for v in imagenet)
    features = cv.capture_layers(cnn, "layer3", (x - mean) / std)  # (2, 256, 3, 3)
    maps = cv.PatchActivationMap(cnn, "layer3").attribute(x, target=7)
    torch.testing.assert_close(maps, features[:, 7])
    examples = cv.TopActivatingExamples(cnn, "layer3", k=1).attribute([x], target=[7])
    best = features[:, 7].amax(dim=(-2, -1)).argmax()
    assert examples.indices[0, 0] == best
    with pytest.raises(ValueError, match="input size of ResNet.*pass image_size"):
        cv.FeatureVisualization(cnn, "layer3").attribute(target=7, steps=1)
    made = cv.FeatureVisualization(cnn, "layer3").attribute(target=7, steps=1, image_size=40)
    assert made.shape == (1, 3, 40, 40)
    with pytest.raises(ValueError, match="input size of ResNet"):
        input_config(cnn)
    with pytest.raises(ValueError, match="input size of ResNet"):
        _ = ImageModel(cnn).image_size
    config = ImageModel(cnn, image_size=40).config
    assert (config.mean, config.std, config.size) == (*imagenet, (40, 40))


def test_open_clip_unwraps_and_reads_preprocess_cfg():
    model = open_clip_model()
    wrapped = ImageModel(model)
    assert wrapped.model is model.visual
    assert wrapped.image_size == (32, 32)
    model.visual.preprocess_cfg = {"mean": (0.1, 0.2, 0.3), "std": (0.5, 0.5, 0.5), "size": 32}
    assert input_config(model).mean == (0.1, 0.2, 0.3)
    bare = input_config(open_clip_tower())  # no config: open_clip's OpenAI defaults
    assert bare.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_image_model_normalizes_inside():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).eval()
    wrapped = ImageModel(model, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model((x - mean) / std))
    assert ImageModel(wrapped).model is model


def test_an_image_model_passed_in_keeps_its_normalization_and_size():
    """A user's ImageModel with its own mean / std / size, given to a method, silently got
    the wrapped model's config back (the wrapper was looked through)."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).eval()
    chosen = dict(mean=(0.2, 0.3, 0.4), std=(0.9, 0.8, 0.7))
    wrapped = ImageModel(model, **chosen)
    assert input_config(wrapped) == input_config(model, **chosen)
    assert ImageModel(wrapped).config == wrapped.config
    x = torch.rand(2, 3, 32, 32)
    expected = cv.PatchActivationMap(model, "blocks.0", **chosen).attribute(x, target=3)
    maps = cv.PatchActivationMap(wrapped, "blocks.0").attribute(x, target=3)
    torch.testing.assert_close(maps, expected)
    assert not torch.allclose(maps, cv.PatchActivationMap(model, "blocks.0").attribute(x, target=3))
    # arguments given again still win, one by one
    again = ImageModel(wrapped, std=(1, 1, 1), image_size=48)
    assert again.config == cv.models.InputConfig(chosen["mean"], (1.0, 1.0, 1.0), (48, 48))
    with pytest.raises(ValueError, match="std must be positive"):
        ImageModel(wrapped, std=(1, 0, 1))


def test_a_model_for_other_than_three_channels_is_refused_up_front():
    """A grey (in_chans=1) timm model: one-channel images were refused as not RGB, and RGB
    images then died in the patch embedding's channel-mismatch RuntimeError."""
    grey = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, in_chans=1)
    reason = "VisionTransformer takes 1-channel images .*patch_embed.proj has in_channels=1"
    with pytest.raises(ValueError, match=reason):
        cv.PatchActivationMap(grey, "blocks.0")
    with pytest.raises(ValueError, match="1-channel images"):
        cv.FeatureVisualization(grey.eval(), "blocks.0")
    assert hooks_left(grey) == 0
    # Gemma 4 projects flattened patches with an nn.Linear, which timm names as first_conv
    if timm.is_model("gemma4_vit_167m"):  # not in older timm
        gemma = timm.create_model(
            "gemma4_vit_167m", **dict(GEMMA4, depth=1, in_chans=1), num_classes=5
        ).eval()
        reason = "takes 1-channel images .*linear patch embedding .*takes 1 x 8 x 8 values"
        with pytest.raises(ValueError, match=reason):
            cv.PatchActivationMap(gemma, "encoder.blocks.0")
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_channels=4,
    )
    with pytest.raises(ValueError, match="ViTModel takes 4-channel images .*num_channels=4"):
        cv.PatchActivationMap(transformers.ViTModel(config), "layers.0")
    # a wrapper that maps RGB to the model's one channel is the user's to write, and works
    wrapper = torch.nn.Sequential(_Grey(), grey).eval()
    maps = cv.PatchActivationMap(wrapper, "1.blocks.0", mean=(0, 0, 0), std=(1, 1, 1))
    assert maps.attribute(torch.rand(2, 3, 32, 32), target=0).shape == (2, 4, 4)


def test_a_space_to_depth_stem_takes_rgb():
    """TResNet's stem stacks each 4x4 block of pixels into channels before its first
    convolution (48 input channels for RGB): the whole family was refused as "takes
    48-channel images". It now reads as RGB, equal to timm's forward_intermediates, and a
    grey TResNet is still refused, as 1-channel."""
    torch.manual_seed(0)
    model = timm.create_model("tresnet_m").eval()
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stages = model.forward_intermediates(ImageModel(model).normalize(pixels), indices=[2])
    maps = cv.PatchActivationMap(model, "body.layer2").attribute(pixels)
    torch.testing.assert_close(maps, stages[1][0], rtol=0, atol=0)
    grey = timm.create_model("tresnet_m", in_chans=1)
    with pytest.raises(ValueError, match="TResNet takes 1-channel images .*4x4 space-to-depth"):
        cv.PatchActivationMap(grey, "body.layer2")


class _Grey(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=1, keepdim=True)


#: timm models built for one input size that they keep as no ``patch_embed.img_size``:
#: (name, construction arguments, a layer of theirs). At 64 px every one of them fails
#: inside timm at 224, the size that was taken for theirs.
_BUILT_FOR_ONE_SIZE = [
    ("mixer_s16_224", {}, "blocks.1"),  # its "stem"
    ("gmlp_ti16_224", {}, "blocks.1"),
    ("tnt_s_legacy_patch16_224", dict(depth=2), "pixel_embed.proj"),  # its "pixel_embed"
    ("gcvit_xxtiny", {}, "stages.1"),
    ("mvitv2_tiny", {}, "stages.1"),
    ("efficientformerv2_s0", {}, "stages.1"),
    ("levit_128s", dict(depth=(1, 1, 1)), "stages.1"),
    ("hiera_tiny_224", dict(stages=(1, 1, 1, 1)), "blocks.1"),
    ("volo_d1_224", {}, "network.0"),  # its position embedding
]


@pytest.mark.parametrize(
    "name, kwargs, layer", _BUILT_FOR_ONE_SIZE, ids=[case[0] for case in _BUILT_FOR_ONE_SIZE]
)
def test_a_model_built_for_another_size_is_taken_at_that_size(name, kwargs, layer):
    """Built with img_size=64, these were taken for 224 (pretrained_cfg): a feature
    visualization or a layout without images failed inside timm, and images of another
    size reached the model's own assertion instead of the package's message."""
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=64, **kwargs).eval()
    assert input_config(model).size == (64, 64)
    assert fixed_input_size(model) == (64, 64)
    images = cv.FeatureVisualization(model, layer).attribute(target=0, steps=1)
    assert images.shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="takes 64x64 images only, got 96x96"):
        cv.PatchActivationMap(model, layer).attribute(torch.rand(1, 3, 96, 96), target=0)


def test_fixed_input_size():
    fixed = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    dynamic = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, dynamic_img_size=True
    )
    assert fixed_input_size(fixed) == (32, 32)
    assert fixed_input_size(dynamic) is None
    assert fixed_input_size(timm.create_model("resnet18")) is None
    assert fixed_input_size(open_clip_model()) == (32, 32)


@pytest.mark.parametrize(
    "images,error,match",
    [
        (torch.rand(2, 1, 32, 32), ValueError, r"RGB.*grey images.*expand\(-1, 3, -1, -1\)"),
        (torch.rand(2, 4, 32, 32), ValueError, r"RGBA images.*images\[:, :3\]"),
        (torch.rand(3, 32, 32), ValueError, r"\(B, 3, H, W\).*images\[None\]"),
        (torch.rand(2, 32, 32, 3), ValueError, r"channels last\? use images.permute\(0, 3, 1, 2\)"),
        (np.zeros((1, 32, 32, 3), np.uint8), TypeError, r"ndarray; convert with torch.from_numpy"),
        ([torch.rand(3, 32, 32)], TypeError, r"list; stack .* torch.stack\(images\)"),
        (
            Image.new("RGB", (32, 32)),
            TypeError,
            r"Image; convert with .*to_tensor\(image\)\[None\]",
        ),
        (torch.full((1, 3, 32, 32), float("nan")), ValueError, "NaN"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, "float"),
        (torch.rand(1, 3, 16, 32), ValueError, "32x32 images only"),
        ([1, 2], TypeError, "torch.Tensor"),
        (torch.rand(1, 3, 32, 32) * 255, ValueError, "divide 0-255 images by 255"),
        (torch.rand(1, 3, 32, 32) * 4 - 2, ValueError, r"\[0, 1\].*mean / std"),
        (torch.rand(1, 3, 32, 32) + 0.01, ValueError, "clamp"),
    ],
)
def test_check_images(images, error, match):
    with pytest.raises(error, match=match):
        check_images(images, size=(32, 32))


def test_check_images_accepts_the_range_up_to_rounding():
    edges = torch.tensor([0.0, 1.0, -1e-4, 1 + 1e-4]).repeat(8).view(1, 1, 1, 32)
    check_images(edges.expand(1, 3, 32, 32), size=(32, 32))
    check_images(torch.rand(1, 3, 32, 32, dtype=torch.bfloat16))


def test_public_methods_refuse_0_255_images():
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2
    ).eval()
    x = torch.rand(2, 3, 32, 32) * 255
    with pytest.raises(ValueError, match="255"):
        cv.PatchActivationMap(model, "blocks.0").attribute(x, target=0)
    with pytest.raises(ValueError, match="255"):
        cv.TopActivatingExamples(model, "blocks.0", k=1).attribute(x)


def test_full_clip_text_tower_names_are_refused_with_the_vision_path():
    clip = open_clip_model()  # image tower: 2 blocks; text tower: 1 block
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"'visual\.transformer\.resblocks\.0\.mlp\.gelu'"):
        cv.PatchActivationMap(clip, "transformer.resblocks.0.mlp.gelu")
    with pytest.raises(ValueError, match="ambiguous"):
        cv.SpatialLocalityProbe(clip, layers=["transformer.resblocks.0"])
    with pytest.raises(ValueError, match="ambiguous"):
        cv.resolve_layout(clip, "transformer.resblocks.0", torch.rand(1, 3, 32, 32))
    for text_only in ("ln_final", clip.transformer.resblocks[0]):
        with pytest.raises(ValueError, match=r"image tower.*'visual\.transformer\.resblocks\.0'"):
            cv.TopActivatingExamples(clip, text_only)
    # The image tower's path, or a name only the image tower has, resolves.
    ours = cv.PatchActivationMap(clip, "visual.transformer.resblocks.0.mlp.gelu")
    tower = cv.PatchActivationMap(clip.visual, "transformer.resblocks.0.mlp.gelu")
    assert ours.layer is clip.visual.transformer.resblocks[0].mlp.gelu
    torch.testing.assert_close(ours.attribute(x, target=3), tower.attribute(x, target=3))
    assert (
        cv.PatchActivationMap(clip, "transformer.resblocks.1").layer
        is (clip.visual.transformer.resblocks[1])
    )
    assert cv.PatchActivationMap(clip, clip.visual.conv1).layer_name == "conv1"


def test_a_model_that_is_no_module_and_odd_sizes_are_refused():
    from captum_vit import zoo

    for method in (cv.FeatureVisualization, cv.PatchActivationMap, cv.TopActivatingExamples):
        with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
            method("vit_tiny_patch16_224", "blocks.1")  # was AttributeError: named_modules
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        cv.SpatialLocalityProbe("vit")
    vit = zoo.load_model("vit")
    with pytest.raises(TypeError, match="got '64'"):  # a string read as the size (6, 4)
        ImageModel(vit, image_size="64")
    with pytest.raises(ValueError, match="at least 1 pixel, got 0"):
        ImageModel(vit, image_size=0)
    assert ImageModel(vit, image_size=(32, 48)).config.size == (32, 48)

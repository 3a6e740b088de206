"""Hugging Face transformers models as a model source: layouts against the models' own
output_hidden_states, outputs unwrapped, results equal to timm's with the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from archs import hooked, hooks_left

import captum_vit as cv

transformers = pytest.importorskip("transformers")

SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    patch_size=8,
    layer_norm_eps=1e-6,
)


def build(kind):
    torch.manual_seed(0)
    T = transformers
    if kind == "vit":
        model = T.ViTForImageClassification(T.ViTConfig(**SMALL, image_size=(32, 48), num_labels=5))
    elif kind == "vit_model":
        model = T.ViTModel(T.ViTConfig(**SMALL, image_size=32))
    elif kind == "deit":
        model = T.DeiTForImageClassificationWithTeacher(
            T.DeiTConfig(**SMALL, image_size=32, num_labels=5)
        )
    elif kind == "dinov2_reg":
        model = T.Dinov2WithRegistersModel(
            T.Dinov2WithRegistersConfig(**SMALL, image_size=32, num_register_tokens=4)
        )
    elif kind == "dinov3":
        model = T.DINOv3ViTModel(T.DINOv3ViTConfig(**SMALL, image_size=32, num_register_tokens=4))
    elif kind == "clip_vision":
        model = T.CLIPVisionModel(T.CLIPVisionConfig(**SMALL, image_size=32))
    elif kind == "clip":
        model = T.CLIPModel(
            T.CLIPConfig(
                vision_config=dict(SMALL, image_size=32),
                text_config=dict(SMALL, vocab_size=64, max_position_embeddings=8),
                projection_dim=16,
            )
        )
    elif kind == "swin":
        model = T.SwinForImageClassification(
            T.SwinConfig(
                image_size=(32, 48),
                patch_size=4,
                embed_dim=16,
                depths=[2, 2],
                num_heads=[2, 2],
                window_size=4,
                num_labels=5,
            )
        )
    return model.eval()


def size_of(kind):
    return (32, 48) if kind in ("vit", "swin") else (32, 32)


def pixels(kind, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size_of(kind), generator=generator)


def hidden_states(model, x):
    with torch.no_grad():
        if hasattr(model, "get_image_features"):
            return model.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
        return model(pixel_values=x, output_hidden_states=True).hidden_states


# kind -> (layer path, index in hidden_states, prefix names, grid)
LAYERS = {
    "vit": ("vit.layers.1", 2, ("cls",), (4, 6)),
    "vit_model": ("layers.0", 1, ("cls",), (4, 4)),
    "deit": ("deit.layers.0", 1, ("cls", "dist"), (4, 4)),
    "dinov2_reg": ("encoder.layer.1", 2, ("cls", "reg0", "reg1", "reg2", "reg3"), (4, 4)),
    "dinov3": ("model.layer.1", 2, ("cls", "reg0", "reg1", "reg2", "reg3"), (4, 4)),
    "clip_vision": ("encoder.layers.0", 1, ("cls",), (4, 4)),
    "clip": ("vision_model.encoder.layers.1", 2, ("cls",), (4, 4)),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_layout_split_equals_the_models_own_hidden_states(kind):
    model = build(kind)
    path, index, names, grid = LAYERS[kind]
    x = pixels(kind)
    layout = cv.resolve_layout(model, path, x)
    assert layout.prefix_names == names and layout.grid == grid
    output = cv.capture_layers(model, path, x) if kind != "clip" else None
    if kind == "clip":
        output = cv.capture_layers(cv.hf.vision_tower(model), path, x)
    spatial, prefix = layout.split(output)
    hidden = hidden_states(model, x)[index]
    p = len(names)
    expected = hidden[:, p:].reshape(2, *grid, -1).permute(0, 3, 1, 2)
    assert torch.equal(spatial, expected)
    assert torch.equal(prefix, hidden[:, :p])


def test_swin_stage_layout_equals_reshaped_hidden_states():
    model = build("swin")
    x = pixels("swin")
    layout = cv.resolve_layout(model, "swin.encoder.layers.0", x)
    with torch.no_grad():
        reshaped = model(pixel_values=x, output_hidden_states=True).reshaped_hidden_states
    spatial, _ = layout.split(cv.capture_layers(model, "swin.encoder.layers.0", x))
    assert torch.equal(spatial, reshaped[1])
    block = cv.resolve_layout(model, "swin.encoder.layers.0.blocks.1", x)
    assert block.grid == (8, 12) and block.num_prefix_tokens == 0
    with pytest.raises(ValueError, match="windows"):
        cv.AttentionRollout(model)


@pytest.mark.parametrize("batch", [1, 2])
def test_swin_v2_later_stages_and_single_images(batch):
    """Swin-V2's later stages show their grid only in the (h, w, h_out, w_out) stage
    dimensions: their token layers were refused. With one image it was worse: the
    position-bias MLP's (1, 7, 7, C) table passed for a map of that image, and stage 1's
    8x8 = 64 tokens were read as 7x7 patches after 15 prefix tokens."""
    torch.manual_seed(0)
    config = transformers.Swinv2Config(
        embed_dim=16,
        depths=[1, 1],
        num_heads=[1, 2],
        image_size=64,
        patch_size=4,
        window_size=4,
    )
    model = transformers.Swinv2Model(config).eval()
    x = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pam = cv.PatchActivationMap(model, "encoder.layers.1.blocks.0")
    with torch.no_grad():
        reshaped = model(pam.normalize(x), output_hidden_states=True).reshaped_hidden_states
    assert reshaped[2].shape == (batch, 32, 8, 8)  # the last stage, no downsampling
    # stage 0 before its patch merging, by a plain hook: (B, 256, 16) in raster order
    before = hooked(model, "encoder.layers.0", pam.normalize(x))[1]
    stage0 = before.reshape(batch, 16, 16, 16).permute(0, 3, 1, 2)
    units = torch.tensor([3, 14][:batch])
    for stage, oracle, grid in [(0, stage0, (16, 16)), (1, reshaped[2], (8, 8))]:
        block = f"encoder.layers.{stage}.blocks.0"
        maps = cv.PatchActivationMap(model, block).attribute(x, target=units)
        torch.testing.assert_close(maps, oracle[torch.arange(batch), units])
        layout = cv.resolve_layout(model, f"{block}.intermediate.dense", x)
        assert (layout.grid, layout.num_prefix_tokens) == (grid, 0)
    assert hooks_left(model) == 0


def test_mobilevit_unfolded_patches_of_one_image_are_refused():
    """MobileViT's transformer runs on unfolded patches, (batch * patch_area, patches, C):
    (4, 1, C) for one 64 px image at its last stage (its 2x2 grid is one 2x2 patch), which
    passed for the 4 tokens of a 2x2 grid in sequence-first order (NBC: the batch of 1 on
    the second axis)."""
    model = transformers.MobileViTModel(transformers.MobileViTConfig(image_size=64)).eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    dense = "encoder.layer.4.transformer.layer.0.intermediate.dense"
    assert hooked(model, dense, x).shape[:2] == (4, 1)
    with pytest.raises(ValueError, match="first axis is a multiple of the batch"):
        cv.resolve_layout(model, dense, x)
    pam = cv.PatchActivationMap(model, "encoder.layer.4")
    oracle = hooked(model, "encoder.layer.4", pam.normalize(x))
    assert oracle.shape[-2:] == (2, 2)
    torch.testing.assert_close(pam.attribute(x, target=7), oracle[:, 7])


@pytest.mark.parametrize("kind", ["resnet", "segformer"])
def test_models_whose_config_records_no_size_take_any_size(kind):
    """ResNet, RegNet, PoolFormer and SegFormer configs have no image_size: these models
    take any size, but every call raised "config has no image_size", even with
    image_size= given. Maps equal the models' own hidden states; what needs a size
    without images asks for one and names the user's model."""
    torch.manual_seed(0)
    T = transformers
    if kind == "resnet":
        config = T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1])
        model, layer = T.ResNetForImageClassification(config).eval(), "resnet.encoder.stages.1"
    else:
        config = T.SegformerConfig(
            hidden_sizes=[16, 32],
            depths=[1, 1],
            num_encoder_blocks=2,
            num_attention_heads=[1, 2],
            sr_ratios=[2, 1],
            patch_sizes=[7, 3],
            strides=[4, 2],
            mlp_ratios=[2, 2],
        )
        model, layer = T.SegformerModel(config).eval(), "stages.1.layer_norm"
    assert getattr(config, "image_size", None) is None
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    pam = cv.PatchActivationMap(model, layer)
    with torch.no_grad():
        hidden = model(pam.normalize(x), output_hidden_states=True).hidden_states[-1]
    theirs = hooks_left(model)  # transformers keeps hooks of its own after that call
    assert hidden.shape[-2:] == (8, 6)
    units = torch.tensor([3, 9])
    torch.testing.assert_close(pam.attribute(x, target=units), hidden[torch.arange(2), units])
    with pytest.raises(ValueError, match=rf"size of {type(model).__name__}: its config has no"):
        cv.input_config(model)
    assert cv.input_config(model, image_size=40).size == (40, 40)
    fv = cv.FeatureVisualization(model, layer)
    with pytest.raises(ValueError, match="pass image_size"):
        fv.attribute(target=[0, 1], steps=2)
    assert fv.attribute(target=[0, 1], steps=2, image_size=32).shape == (2, 3, 32, 32)
    assert hooks_left(model) == theirs


def test_outputs_are_unwrapped_and_normalization_comes_from_the_config():
    vit, clip = build("vit"), build("clip")
    images = torch.rand(2, 3, 32, 48)
    config = cv.input_config(vit)
    assert config.mean == (0.5, 0.5, 0.5) and config.size == (32, 48)
    with torch.no_grad():
        logits = cv.ImageModel(vit)(images)
        assert torch.equal(logits, vit(pixel_values=(images - 0.5) / 0.5).logits)
        clip_images = torch.rand(2, 3, 32, 32)
        embeds = cv.ImageModel(clip)(clip_images)
        normalized = cv.ImageModel(clip).normalize(clip_images)
        expected = clip.get_image_features(pixel_values=normalized).pooler_output
    assert embeds.shape == (2, 16) and torch.allclose(embeds, expected)
    assert cv.input_config(clip).mean[0] == pytest.approx(0.48145466)


def timm_twin(hf):
    """timm vit_tiny with the HF ViT classifier's weights."""
    import timm

    timm_model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=(32, 48),
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        mlp_ratio=2.0,
        num_classes=5,
    ).eval()
    src = hf.state_dict()
    dst = {
        "cls_token": src["vit.embeddings.cls_token"],
        "pos_embed": src["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": src["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": src["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": src["vit.layernorm.weight"],
        "norm.bias": src["vit.layernorm.bias"],
        "head.weight": src["classifier.weight"],
        "head.bias": src["classifier.bias"],
    }
    for i in range(2):
        s, d = f"vit.layers.{i}.", f"blocks.{i}."
        for param in ("weight", "bias"):
            dst[d + "norm1." + param] = src[s + "layernorm_before." + param]
            dst[d + "norm2." + param] = src[s + "layernorm_after." + param]
            dst[d + "attn.qkv." + param] = torch.cat(
                [src[s + f"attention.{p}_proj." + param] for p in "qkv"]
            )
            dst[d + "attn.proj." + param] = src[s + "attention.o_proj." + param]
            dst[d + "mlp.fc1." + param] = src[s + "mlp.fc1." + param]
            dst[d + "mlp.fc2." + param] = src[s + "mlp.fc2." + param]
    timm_model.load_state_dict(dst)
    return timm_model


def test_results_agree_with_timm_built_with_the_same_weights():
    hf = build("vit")
    twin = timm_twin(hf)
    images = torch.rand(2, 3, 32, 48)
    mean_std = dict(mean=(0.5,) * 3, std=(0.5,) * 3)
    with torch.no_grad():
        assert torch.allclose(
            cv.ImageModel(hf)(images), cv.ImageModel(twin, **mean_std)(images), atol=1e-5
        )
    hf_map = cv.PatchActivationMap(hf, "vit.layers.0.mlp.fc1").attribute(images, target=7)
    timm_map = cv.PatchActivationMap(twin, "blocks.0.mlp.fc1", **mean_std).attribute(
        images, target=7
    )
    assert hf_map.shape == (2, 4, 6) and torch.allclose(hf_map, timm_map, atol=1e-5)
    hf_roll = cv.AttentionRollout(hf).attribute(images)
    timm_roll = cv.AttentionRollout(twin, **mean_std).attribute(images)
    assert torch.allclose(hf_roll, timm_roll, atol=1e-6)
    x = cv.ImageModel(hf).normalize(images)
    from captum.attr import LayerGradCam

    with cv.patch_grid(hf, "vit.layers.0", x) as grid:
        hf_cam = LayerGradCam(cv.hf.vision_tower(hf), grid).attribute(x, target=2)
    with cv.patch_grid(twin, "blocks.0", x) as grid:
        timm_cam = LayerGradCam(twin, grid).attribute(x, target=2)
    assert hf_cam.shape == (2, 1, 4, 6)
    assert torch.allclose(hf_cam, timm_cam, atol=1e-5, rtol=1e-3)
    assert hooks_left(hf) == 0


@pytest.mark.parametrize("kind", ["deit", "dinov2_reg", "clip"])
def test_package_methods_run_on_hf_models(kind):
    model = build(kind)
    path = LAYERS[kind][0]
    images = torch.rand(3, 3, 32, 32)
    maps = cv.PatchActivationMap(model, path + ".mlp.fc1").attribute(images, target=5)
    assert maps.shape == (3, 4, 4)
    examples = cv.TopActivatingExamples(model, path, k=2).attribute([images], target=[0, 1])
    assert examples.scores.shape == (2, 2)
    fv = cv.FeatureVisualization(model, path + ".mlp.fc1")
    viz = fv.attribute(target=[3], steps=2, preset=None, image_size=32)
    assert viz.shape == (1, 3, 32, 32)
    report = cv.SpatialLocalityProbe(model, layers=[path]).attribute(images[:1])
    assert report.locality.shape == (1,)
    rollout = cv.AttentionRollout(model).attribute(images)
    assert rollout.shape == (3, 4, 4)
    assert (rollout > 0).all() and (rollout.sum(dim=(1, 2)) <= 1 + 1e-6).all()
    assert hooks_left(model) == 0


def test_unknown_layer_names_the_users_model_and_its_own_paths():
    """The methods wrap a Hugging Face model; the error named the wrapper (HFVisionModel)
    and listed the wrapper's paths (model.vit.layers.1.mlp) instead of the user's."""
    model = build("vit")
    with pytest.raises(ValueError) as caught:
        cv.PatchActivationMap(model, "vit.encoder.layer.1.mlp")  # an older naming
    message = str(caught.value)
    assert f"in {type(model).__name__}." in message and "HFVisionModel" not in message
    suggested = message.split("Closest names: ")[1].split(",")[0]
    assert suggested == "vit.layers.1.mlp"
    x = torch.rand(2, 3, 32, 48)
    assert cv.PatchActivationMap(model, suggested).attribute(x, target=0).shape == (2, 4, 6)
    zoo_model = build_zoo()
    with pytest.raises(ValueError, match=r"in VisionTransformer\. Closest names: blocks\.5,"):
        cv.patch_grid(cv.ImageModel(zoo_model), "blocks.9").__enter__()
    with pytest.raises(ValueError, match=r"'vit.layers' is a ModuleList.*'vit.layers.0', 'vit"):
        cv.PatchActivationMap(model, "vit.layers").attribute(x, target=0)


def build_zoo():
    from captum_vit import zoo

    return zoo.load_model("vit")


def test_a_text_model_is_refused_as_not_an_image_model():
    """BertModel was told its config had no image_size and to pass image_size=(H, W)."""
    config = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    with pytest.raises(TypeError, match="BertModel is not an image model"):
        cv.PatchActivationMap(transformers.BertModel(config), "encoder.layer.0")


def output_attentions(model, x):
    with torch.no_grad():
        return list(model(pixel_values=x, output_attentions=True).attentions)


def test_rollout_of_beit_and_siglip_equals_the_models_own_attentions():
    """BEiT passes its relative position bias as the attention mask (refused before as
    "an attention mask"); SigLIP's attention-pooling head was rolled out as a block and
    failed. Oracle: the models' own ``output_attentions`` (eager attention)."""
    from test_rollout import hand_rollout

    torch.manual_seed(0)
    T = transformers
    beit = T.BeitForImageClassification(
        T.BeitConfig(**SMALL, image_size=32, num_labels=5, attn_implementation="eager")
    ).eval()
    with torch.no_grad():  # zero at init: random tables make a rollout without them wrong
        for name, param in beit.named_parameters():
            if "relative_position_bias_table" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    siglip = T.SiglipVisionModel(
        T.SiglipVisionConfig(**SMALL, image_size=32, attn_implementation="eager")
    ).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for model, prefix, row in ((beit, 1, "cls"), (siglip, 0, "mean")):
        maps = cv.AttentionRollout(model).attribute(x)
        assert hooks_left(model) == 0  # before the oracle: transformers leaves its recorders
        probs = output_attentions(model, cv.ImageModel(model).normalize(x))
        torch.testing.assert_close(
            maps, hand_rollout(probs, prefix, (4, 4), row), atol=1e-6, rtol=0
        )


def test_vit_mae_patches_stay_in_image_order():
    """ViT-MAE shuffles its patch tokens by argsort of random noise in every forward, even
    with mask_ratio=0 (how its encoder is used for features): the maps came out scrambled.
    Oracle: the model's own patch-embedding convolution plus position embeddings, which
    are in image order."""
    torch.manual_seed(0)
    model = transformers.ViTMAEModel(
        transformers.ViTMAEConfig(**SMALL, image_size=32, mask_ratio=0.0)
    ).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    normalized = cv.ImageModel(model).normalize(x)
    with torch.no_grad():
        conv = model.embeddings.patch_embeddings.projection(normalized)  # (B, C, 4, 4)
        pos = model.embeddings.position_embeddings[0, 1:].T.reshape(1, -1, 4, 4)
    maps = cv.PatchActivationMap(model, "embeddings").attribute(x, target=None)
    torch.testing.assert_close(maps, conv + pos, atol=1e-5, rtol=1e-5)
    masking = transformers.ViTMAEModel(transformers.ViTMAEConfig(**SMALL, image_size=32)).eval()
    with pytest.raises(ValueError, match=r"drops 75% of the patch tokens.*mask_ratio = 0.0"):
        cv.PatchActivationMap(masking, "layers.1").attribute(x, target=0)


@pytest.mark.parametrize("kind", ["vit_model", "clip"])
def test_other_image_sizes_interpolate_the_position_embeddings(kind):
    """ViT and CLIP refuse another size than their config's unless asked to interpolate
    their position embeddings; the methods failed with "Input image size (48*48) doesn't
    match model (32*32)". Oracle: the model's own hidden states with the flag."""
    model = build(kind)
    path, index, names, _ = LAYERS[kind]
    x = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    maps = cv.PatchActivationMap(model, path).attribute(x, target=3)
    assert hooks_left(model) == 0  # before the oracle: transformers leaves its recorders
    tower = model.vision_model if kind == "clip" else model
    with torch.no_grad():
        hidden = tower(
            pixel_values=cv.ImageModel(model).normalize(x),
            output_hidden_states=True,
            interpolate_pos_encoding=True,
        ).hidden_states[index]
    expected = hidden[:, len(names) :, 3].reshape(2, 6, 5)
    torch.testing.assert_close(maps, expected)


def test_pooling_experiments_on_hf_classifiers_equal_timm_with_the_same_weights():
    """Table 1 said "undefined for HFVisionModel" for a Hugging Face ViT classifier."""
    hf = build("vit")
    twin = timm_twin(hf)
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(12, 3, 32, 48, generator=generator)
    labels = torch.randint(0, 5, (12,), generator=generator)
    batches = [(images[:6], labels[:6]), (images[6:], labels[6:])]
    ours = cv.pooling_experiments(hf, batches)
    expected = cv.pooling_experiments(twin, batches, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert ours.natural == expected.natural and ours.natural.top1 > 0
    assert ours.isolated_cls == expected.isolated_cls and ours.tear == expected.tear
    assert torch.equal(ours.patch_accuracy, expected.patch_accuracy)
    assert hooks_left(hf) == 0
    # DeiT with a teacher head averages the cls and distillation heads: its natural
    # accuracy is the model's own.
    deit = build("deit")
    x = torch.rand(8, 3, 32, 32, generator=generator)
    y = torch.randint(0, 5, (8,), generator=generator)
    with torch.no_grad():
        own = deit(pixel_values=cv.ImageModel(deit).normalize(x)).logits.argmax(1)
    report = cv.pooling_experiments(deit, [(x, y)], tear=[])
    assert report.natural.top1 == pytest.approx(100.0 * (own == y).float().mean().item())
    assert report.isolated_cls[0] == report.natural
    with pytest.raises(ValueError, match="not Dinov2WithRegistersModel"):
        cv.pooling_experiments(build("dinov2_reg"), [(x, y)])


@pytest.mark.parametrize("kind", ["vit_model", "swin"])
def test_interpolated_maps_of_other_sizes_lie_on_the_covered_pixels(kind):
    """ViT's convolution drops the pixels past the last whole patch (36x44: a 4x5 grid of
    8-px patches); Swin pads to whole patches (9x11 of 4 px, 5x6 cells of 8 px after the
    merge). Each pixel shows the cell that covers it, the dropped ones the nearest."""
    from test_activation_map import nearest_cell

    model = build(kind)
    layer, grid, cell = {
        "vit_model": ("layers.1", (4, 5), 8),
        "swin": ("swin.encoder.layers.1", (5, 6), 8),
    }[kind]
    x = torch.rand(2, 3, 36, 44)
    pam = cv.PatchActivationMap(model, layer)
    maps = pam.attribute(x, target=0)
    assert maps.shape == (2, *grid)
    up = pam.attribute(x, target=0, interpolate=True, interpolate_mode="nearest")
    torch.testing.assert_close(up, nearest_cell(maps, (36, 44), cell))


def test_reports_name_layers_by_the_hugging_face_models_own_paths():
    """Reports said ``model.vit.layers.0``, the path inside the package's wrapper."""
    model = build("vit")
    x = torch.rand(2, 3, *size_of("vit"))
    report = cv.SpatialLocalityProbe(model).attribute(x)
    assert report.layers == ["vit.layers.0", "vit.layers.1"]
    assert all(name in dict(model.named_modules()) for name in report.layers)
    examples = cv.TopActivatingExamples(model, "vit.layers.1", k=1).attribute([x])
    assert examples.layer == "vit.layers.1"
    assert cv.resolve_layout(model, "vit.layers.1", x).layer == "vit.layers.1"
    with cv.patch_grid(model, "model.vit.layers.1", x) as grid:  # the wrapper's path works too
        assert grid.layout.layer == "vit.layers.1"
    with pytest.raises(ValueError, match="^layer 'classifier' outputs a 2-D tensor"):
        cv.PatchActivationMap(model, "classifier").attribute(x, target=0)


def test_dinov3_mlp_hidden_layers_are_the_atlas_defaults():
    """DINOv3 names its MLP activation 'mlp.act_fn': the atlas fell back to whole blocks."""
    from captum_vit.atlas import default_layers

    model = build("dinov3")
    assert default_layers(model) == [f"model.layer.{i}.mlp.act_fn" for i in range(2)]
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    hidden = cv.capture_layers(model, "model.layer.1.mlp.act_fn", cv.ImageModel(model).normalize(x))
    expected = hidden[:, 5:, 7].reshape(2, 4, 4)  # cls and 4 registers first
    maps = cv.PatchActivationMap(model, "model.layer.1.mlp.act_fn").attribute(x, target=7)
    torch.testing.assert_close(maps, expected)


def test_a_naflex_model_is_refused_as_taking_no_images():
    """SigLIP 2's NaFlex models take patchified pixels: the refusal said to pass
    image_size, which no argument could fix."""
    config = transformers.Siglip2VisionConfig(**{**SMALL, "num_patches": 16})
    model = transformers.Siglip2VisionModel(config).eval()
    with pytest.raises(TypeError, match="NaFlex.*not \\(B, 3, H, W\\) images"):
        cv.PatchActivationMap(model, "vision_model.encoder.layers.0")


def test_a_non_square_position_grid_takes_its_own_size_only():
    """transformers interpolates position embeddings from a square grid only: a ViT
    configured for 32x48 images (4x6 patches) failed on 36x44 with a bare reshape
    RuntimeError inside transformers; it is refused up front, as for a fixed-size model."""
    model = build("vit")
    pam = cv.PatchActivationMap(model, "vit.layers.1")
    assert pam.attribute(torch.rand(2, 3, 32, 48), target=0).shape == (2, 4, 6)
    with pytest.raises(ValueError, match="takes 32x48 images only, got 36x44; resize"):
        pam.attribute(torch.rand(2, 3, 36, 44), target=0)
    with pytest.raises(ValueError, match="takes 32x48 images only"):
        cv.AttentionRollout(model).attribute(torch.rand(1, 3, 40, 40))


def test_yolos_detection_tokens_after_the_patches_are_refused():
    """YOLOS appends its detection tokens after the patch tokens. With up to 31 of them
    the token count fitted "cls + detection tokens as prefix", and the maps were silently
    read from the wrong tokens (cls and the detection tokens taken as prefix, the first
    patches dropped); with YOLOS's usual 100 the refusal gave no reason."""
    config = transformers.YolosConfig(**SMALL, image_size=[32, 32], num_detection_tokens=5)
    model = transformers.YolosModel(config).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        hidden = model(cv.ImageModel(model).normalize(x), output_hidden_states=True)
    patches = hidden.hidden_states[1][:, 1:17]  # cls, 16 patches, 5 detection tokens
    assert hidden.hidden_states[1].shape[1] == 1 + 16 + 5
    assert not torch.allclose(patches, hidden.hidden_states[1][:, 6:], atol=1e-3)
    before = hooks_left(model)  # transformers keeps its own hidden-state hooks
    for layer in ("encoder.layer.0", "encoder.layer.1.intermediate"):
        with pytest.raises(ValueError, match="appends 5 detection tokens after its patch"):
            cv.PatchActivationMap(model, layer).attribute(x)
    assert hooks_left(model) == before


def test_backbone_outputs_are_one_vector_per_image():
    """A backbone's output stands for one vector per image: PoolFormer's (B, C, H, W) map
    was read as its first "token", channel 0's map, so target=c picked row c of it;
    PP-LCNet's classifier returns its logits as last_hidden_state (B, classes), which
    became logit 0 alone."""
    T = transformers
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pool = T.PoolFormerModel(T.PoolFormerConfig(hidden_sizes=[8, 16, 24, 32], depths=[1] * 4))
    pool.eval()
    wrapped = cv.ImageModel(pool)
    with torch.no_grad():
        hidden = pool(wrapped.normalize(x)).last_hidden_state
        assert hidden.shape == (2, 32, 2, 2)
        torch.testing.assert_close(wrapped(x), hidden.mean(dim=(-2, -1)))
    lcnet = T.PPLCNetForImageClassification(T.PPLCNetConfig(num_labels=5)).eval()
    wrapped = cv.ImageModel(lcnet, image_size=64)
    with torch.no_grad():
        logits = lcnet(wrapped.normalize(x)).last_hidden_state
        assert logits.shape == (2, 5)
        assert torch.equal(wrapped(x), logits)


def test_clip_classifier_reads_its_vision_config():
    """CLIPForImageClassification keeps its image size under vision_config without being
    a CLIP pair (no text model): its size was not found."""
    T = transformers
    config = T.CLIPConfig(
        vision_config=dict(SMALL, image_size=32),
        text_config=dict(SMALL, vocab_size=64, max_position_embeddings=8),
        num_labels=3,
    )
    model = T.CLIPForImageClassification(config).eval()
    found = cv.input_config(model)
    assert found.size == (32, 32) and found.mean[0] == pytest.approx(0.48145466)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(cv.ImageModel(model).normalize(x)).logits
        assert torch.equal(cv.ImageModel(model)(x), expected)


def test_normalization_comes_from_the_checkpoints_image_processor(tmp_path):
    """A checkpoint's preprocessor_config.json says how its images were normalized; the
    family default was used instead (SigLIP got ImageNet's instead of 0.5 / 0.5). An
    EfficientNet-style processor rescales to [-1, 1] first (rescale_offset); MobileViT's
    feeds BGR, which the model then got as RGB."""
    T = transformers
    config = T.SiglipVisionConfig(**SMALL, image_size=32)
    assert cv.input_config(T.SiglipVisionModel(config)).mean == (0.5, 0.5, 0.5)
    mobilenet = T.MobileNetV2Model(T.MobileNetV2Config(image_size=32))
    assert cv.input_config(mobilenet).std == (0.5, 0.5, 0.5)
    T.SiglipVisionModel(config).save_pretrained(tmp_path / "plain")
    T.ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(
        tmp_path / "plain"
    )
    loaded = T.SiglipVisionModel.from_pretrained(tmp_path / "plain").eval()
    found = cv.input_config(loaded)
    assert found.mean == pytest.approx((0.1, 0.2, 0.3))
    assert found.std == pytest.approx((0.4, 0.5, 0.6))
    x = torch.rand(1, 3, 32, 32)
    processed = T.ViTImageProcessor.from_pretrained(tmp_path / "plain")(
        (x[0] * 255).round().to(torch.uint8), return_tensors="pt", do_resize=False
    )["pixel_values"]
    torch.testing.assert_close(cv.ImageModel(loaded).normalize((x * 255).round() / 255), processed)

    processor = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
    processor |= {"rescale_factor": 1 / 127.5, "rescale_offset": True}
    (tmp_path / "plain" / "preprocessor_config.json").write_text(json.dumps(processor))
    found = cv.input_config(T.SiglipVisionModel.from_pretrained(tmp_path / "plain"))
    # x in [0, 1] -> 2x - 1 -> ((2x - 1) - 0.5) / 0.25 = (x - 0.75) / 0.125
    assert found.mean == pytest.approx((0.75,) * 3) and found.std == pytest.approx((0.125,) * 3)

    # MobileViT's processor does not normalize and flips the channels to BGR
    folder = tmp_path / "mobilevit"
    T.MobileViTModel(T.MobileViTConfig(image_size=32)).save_pretrained(folder)
    processor = T.MobileViTImageProcessor(do_resize=False, do_center_crop=False)
    processor.save_pretrained(folder)
    mobilevit = T.MobileViTModel.from_pretrained(folder).eval()
    found = cv.input_config(mobilevit)
    assert found.mean == (0.0, 0.0, 0.0) and found.std == (1.0, 1.0, 1.0)
    pixels = (x * 255).round() / 255
    expected = processor((pixels[0] * 255).to(torch.uint8), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(cv.ImageModel(mobilevit).normalize(pixels), expected)
    assert not torch.equal(expected, pixels)  # the processor did flip the channels


def test_timm_models_in_transformers_timm_wrapper():
    """timm's hub checkpoints load in transformers as TimmWrapper models; their
    normalization is timm's pretrained_cfg (0.5 / 0.5 for this ViT), not the ImageNet
    default the wrapper got. Maps equal timm's own forward_intermediates."""
    T = transformers
    torch.manual_seed(0)
    args = dict(img_size=64, depth=2, embed_dim=48, num_heads=2)
    config = T.TimmWrapperConfig(architecture="vit_tiny_patch16_224", num_labels=5, model_args=args)
    model = T.TimmWrapperForImageClassification(config).eval()
    found = cv.input_config(model)
    assert found.mean == (0.5, 0.5, 0.5) and found.size == (64, 64)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pam = cv.PatchActivationMap(model, "timm_model.blocks.1")
    with torch.no_grad():
        oracle = model.timm_model.forward_intermediates(
            (x - 0.5) / 0.5, indices=[1], intermediates_only=True
        )[0]
        assert torch.equal(cv.ImageModel(model)(x), model((x - 0.5) / 0.5).logits)
    units = torch.tensor([3, 30])
    torch.testing.assert_close(pam.attribute(x, target=units), oracle[torch.arange(2), units])
    assert hooks_left(model) == 0


def test_messages_name_the_users_model_not_the_packages_wrapper():
    """Messages named the package's internal wrapper ("none of the blocks of
    HFVisionModel", "unknown layer ... in HFVisionModel" for a CLIPModel)."""
    mobilevit = transformers.MobileViTModel(transformers.MobileViTConfig(image_size=64)).eval()
    x = torch.rand(2, 3, 64, 64)
    with pytest.raises(ValueError, match="none of the blocks of MobileViTModel has a patch grid"):
        cv.SpatialLocalityProbe(mobilevit).attribute(x)
    with pytest.raises(ValueError, match="unknown layer 'nope' in CLIPModel"):
        cv.resolve_layout(build("clip"), "nope", torch.rand(2, 3, 32, 32))

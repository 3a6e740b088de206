"""TokenLayout / resolve_layout against independent oracles.

Oracles: timm's ``forward_intermediates`` (NCHW maps of block / stage outputs) and a manual
reshape of a layer output captured with a plain hook, with prefix counts written down by
hand for each architecture.
"""

from __future__ import annotations

import pytest
import torch
from archs import (
    TIMM_ARCHS,
    hooked,
    hooks_left,
    images,
    open_clip_model,
    open_clip_timm_trunk,
    open_clip_tower,
)

import captum_vit as cv

# arch -> list of (block / stage path, index into forward_intermediates, prefix names)
BLOCK_CASES = {
    "vit": [("blocks.0", 0, ("cls",)), ("blocks.1", 1, ("cls",))],
    "vit_avg": [("blocks.0", 0, ()), ("blocks.1", 1, ())],
    "vit_map": [("blocks.0", 0, ()), ("blocks.1", 1, ())],
    "vit_dynamic": [("blocks.0", 0, ("cls",)), ("blocks.1", 1, ("cls",))],
    "deit_distilled": [("blocks.0", 0, ("cls", "dist")), ("blocks.1", 1, ("cls", "dist"))],
    "dinov2_reg": [("blocks.1", 1, ("cls", "reg0", "reg1", "reg2", "reg3"))],
    "deit3": [("blocks.1", 1, ("cls",))],
    "beit": [("blocks.0", 0, ("cls",)), ("blocks.1", 1, ("cls",))],
    "eva02": [("blocks.0", 0, ("cls",)), ("blocks.1", 1, ("cls",))],
    "cait": [("blocks.0", 0, ()), ("blocks.1", 1, ())],
    "convit": [("blocks.0", 0, ()), ("blocks.1", 1, ()), ("blocks.2", 2, ("cls",))],
    "pit": [
        ("transformers.0", 0, ("cls",)),
        ("transformers.1", 1, ("cls",)),
        ("transformers.2", 2, ("cls",)),
    ],
    "swin": [("layers.0", 0, ()), ("layers.1", 1, ())],
    "twins_pcpvt": [
        ("blocks.0.1", 0, ()),
        ("blocks.1.1", 1, ()),
        ("blocks.2.1", 2, ()),
        ("blocks.3.1", 3, ()),
        ("pos_block.2", None, ()),
    ],
    "twins_svt": [
        ("blocks.0.1", 0, ()),
        ("blocks.1.1", 1, ()),
        ("blocks.2.1", 2, ()),
        ("blocks.3.1", 3, ()),
    ],
    "coat_lite": [
        ("serial_blocks1.1", 0, ("cls",)),
        ("serial_blocks2.1", 1, ("cls",)),
        ("serial_blocks3.1", 2, ("cls",)),
        ("serial_blocks4.1", 3, ("cls",)),
    ],
    "resnet": [("layer1", 1, ()), ("layer2", 2, ()), ("layer4", 4, ())],
    "qwen3": [("encoder.blocks.0", 0, ()), ("encoder.blocks.1", 1, ())],
    # No convolution shows Gemma 4's grid: its patch embedding's coordinates do.
    "gemma4": [("encoder.blocks.0", 0, ()), ("encoder.blocks.1", 1, ())],
}

# arch -> list of (hidden layer path, use the layer's input?, prefix count, grid)
HIDDEN_CASES = {
    "vit": [("blocks.1.mlp.fc1", False, 1, (4, 4)), ("blocks.1.mlp.act", False, 1, (4, 4))],
    "vit_avg": [("blocks.0.mlp.fc1", False, 0, (4, 4))],
    "vit_map": [("blocks.1.mlp.fc1", False, 0, (4, 4)), ("attn_pool.kv", False, 0, (4, 4))],
    "vit_dynamic": [("blocks.1.mlp.fc1", False, 1, (5, 8))],
    "deit_distilled": [("blocks.1.mlp.fc1", False, 2, (4, 4))],
    "dinov2_reg": [("blocks.0.mlp.fc1", False, 5, (4, 4))],
    "deit3": [("blocks.0.mlp.fc1", False, 1, (4, 4))],
    "beit": [("blocks.1.mlp.fc1", False, 1, (4, 4))],
    # SwiGLU: the hidden layer act(gate) * value is the input of fc2.
    "eva02": [("blocks.1.mlp.fc2", True, 1, (4, 4)), ("blocks.1.mlp.fc1", False, 1, (4, 4))],
    "cait": [("blocks.1.mlp.fc1", False, 0, (4, 4))],
    "convit": [("blocks.1.mlp.fc1", False, 0, (4, 4)), ("blocks.2.mlp.fc1", False, 1, (4, 4))],
    "pit": [
        ("transformers.0.blocks.1.mlp.fc1", False, 1, (7, 7)),
        ("transformers.2.blocks.0.mlp.fc1", False, 1, (2, 2)),
    ],
    "swin": [
        ("layers.0.blocks.1.mlp.fc1", False, 0, (14, 21)),
        ("layers.1.blocks.0.mlp.act", False, 0, (7, 11)),
    ],
    "twins_pcpvt": [
        ("blocks.0.0.mlp.fc1", False, 0, (16, 16)),
        ("blocks.2.0.mlp.fc1", False, 0, (4, 4)),
    ],
    "twins_svt": [
        ("blocks.1.0.mlp.fc1", False, 0, (8, 8)),
        ("blocks.3.1.mlp.fc1", False, 0, (2, 2)),
    ],
    "coat_lite": [
        ("serial_blocks1.0.mlp.fc1", False, 1, (16, 16)),
        ("serial_blocks3.1.mlp.fc1", False, 1, (4, 4)),
    ],
    # Gemma 4's gated MLP: the hidden layer act(gate) * up is the input of down_proj.
    "gemma4": [
        ("encoder.blocks.1.mlp.down_proj", True, 0, (6, 6)),
        ("encoder.blocks.0.mlp.act", False, 0, (6, 6)),
    ],
    "coat": [("serial_blocks2.0.mlp.fc1", False, 1, (8, 8))],
}


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(arch):
        if arch not in cache:
            factory, size = TIMM_ARCHS[arch]
            cache[arch] = (factory(), images(size))
        return cache[arch]

    return get


BLOCK_PARAMS = [(a, p, i, n) for a, cases in BLOCK_CASES.items() for p, i, n in cases]


@pytest.mark.parametrize("arch,path,index,names", BLOCK_PARAMS)
def test_block_split_equals_forward_intermediates(built, arch, path, index, names):
    model, x = built(arch)
    layout = cv.resolve_layout(model, path, x)
    raw = hooked(model, path, x)
    if index is None:  # not a stage output: manual reshape with the grid timm reports
        grid = tuple(model.forward_intermediates(x, intermediates_only=True)[2].shape[-2:])
        expected = raw.reshape(raw.shape[0], *grid, -1).permute(0, 3, 1, 2)
    else:
        with torch.no_grad():
            expected = model.forward_intermediates(x, intermediates_only=True)[index]
    spatial, prefix = layout.split(raw)
    assert layout.layer == path
    assert layout.grid == tuple(expected.shape[-2:])
    assert layout.prefix_names == names
    assert layout.num_prefix_tokens == len(names)
    torch.testing.assert_close(spatial, expected, rtol=0, atol=0)
    if names:
        assert prefix.shape == (x.shape[0], len(names), spatial.shape[1])
    else:
        assert prefix is None


HIDDEN_PARAMS = [(a, *c) for a, cases in HIDDEN_CASES.items() for c in cases]


@pytest.mark.parametrize("arch,path,use_input,n_prefix,grid", HIDDEN_PARAMS)
def test_hidden_layer_split_equals_manual_reshape(built, arch, path, use_input, n_prefix, grid):
    model, x = built(arch)
    layout = cv.resolve_layout(model, path, x, attribute_to_layer_input=use_input)
    raw = hooked(model, path, x, use_input)
    tokens = raw.reshape(raw.shape[0], -1, raw.shape[-1])  # Swin MLP may be (B, h*w, C)
    h, w = grid
    assert layout.kind == "BNC"
    assert layout.grid == grid
    assert layout.num_prefix_tokens == n_prefix
    assert tokens.shape[1] == n_prefix + h * w
    manual = tokens[:, n_prefix:].reshape(raw.shape[0], h, w, -1).permute(0, 3, 1, 2)
    spatial, prefix = layout.split(raw)
    torch.testing.assert_close(spatial, manual, rtol=0, atol=0)
    if n_prefix:
        torch.testing.assert_close(prefix, tokens[:, :n_prefix], rtol=0, atol=0)


def test_eva02_swiglu_hidden_width(built):
    model, x = built("eva02")
    fc1 = cv.resolve_layout(model, "blocks.0.mlp.fc1", x)
    hidden = cv.resolve_layout(model, "blocks.0.mlp.fc2", x, attribute_to_layer_input=True)
    assert fc1.num_channels == 2 * hidden.num_channels  # packed [gate, value]


def test_swin_block_is_bhwc_and_window_attention_is_refused(built):
    model, x = built("swin")
    layout = cv.resolve_layout(model, "layers.1.blocks.1", x)
    assert (layout.kind, layout.grid, layout.num_prefix_tokens) == ("BHWC", (7, 11), 0)
    for path in ("layers.1.blocks.1.attn", "layers.0.blocks.0.attn.qkv"):
        with pytest.raises(ValueError, match="windows"):
            cv.resolve_layout(model, path, x)


def test_pit_stage_tuple_carries_the_cls_token(built):
    model, x = built("pit")
    layout = cv.resolve_layout(model, "transformers.1", x)
    out = hooked(model, "transformers.1", x)
    spatial, prefix = layout.split(out)
    assert (layout.kind, layout.element, layout.prefix_element) == ("BCHW", 0, 1)
    assert prefix is out[1]
    assert spatial is out[0]
    conv = cv.resolve_layout(model, "transformers.1.pool.conv", x)
    assert (conv.kind, conv.grid) == ("BCHW", (4, 4))  # pooling opens stage 1: 7x7 -> 4x4


@pytest.mark.parametrize(
    "arch,path",
    [
        ("cait", "blocks_token_only.0"),
        ("cait", "blocks_token_only.0.mlp.fc1"),
        ("vit_map", "attn_pool"),
        ("vit_map", "attn_pool.q"),
        ("vit", "head"),
        ("vit", "fc_norm"),
        ("resnet", "global_pool"),
        ("resnet", "fc"),
    ],
)
def test_non_spatial_layers_raise(built, arch, path):
    model, x = built(arch)
    with pytest.raises(ValueError, match="not spatial|no patch|pooled"):
        cv.resolve_layout(model, path, x)


def test_coat_shared_module_calls(built):
    """coat_tiny's parallel blocks share one MLP across scales 2-4: it runs three times per
    block, once per scale; ``call`` selects which, each with its own grid."""
    model, x = built("coat")
    module = model.parallel_blocks[0].mlp2
    assert module is model.parallel_blocks[0].mlp3 is model.parallel_blocks[0].mlp4
    store = []
    handle = module.fc1.register_forward_hook(lambda m, a, o: store.append(o))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert len(store) == 3
    for call, grid in enumerate([(8, 8), (4, 4), (2, 2)]):
        layout = cv.resolve_layout(model, "parallel_blocks.0.mlp2.fc1", x, call=call)
        assert (layout.grid, layout.num_prefix_tokens, layout.call) == (grid, 1, call)
        spatial, _ = layout.split(store[call])
        manual = store[call][:, 1:].reshape(2, *grid, -1).permute(0, 3, 1, 2)
        torch.testing.assert_close(spatial, manual, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="ran 3 time"):
        cv.resolve_layout(model, "parallel_blocks.0.mlp2.fc1", x, call=3)


def test_coat_parallel_block_tuple_element(built):
    model, x = built("coat")
    default = cv.resolve_layout(model, "parallel_blocks.1", x)
    third = cv.resolve_layout(model, "parallel_blocks.1", x, element=2)
    assert (default.element, default.grid) == (0, (16, 16))
    assert (third.element, third.grid, third.prefix_names) == (2, (4, 4), ("cls",))


def test_split_rejects_other_input_size(built):
    model, x = built("vit_dynamic")
    layout = cv.resolve_layout(model, "blocks.0", x)
    other = hooked(model, "blocks.0", images((32, 32)))
    with pytest.raises(ValueError, match="resolve the layout again"):
        layout.split(other)


def test_unknown_layer_lists_close_matches(built):
    model, x = built("vit")
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1"):
        cv.resolve_layout(model, "blocks.1.mlp.fc", x)
    with pytest.raises(TypeError, match="dotted path"):
        cv.resolve_layout(model, 3, x)
    # One image without its batch dimension was "not enough values to unpack".
    with pytest.raises(ValueError, match=r"got \(3, 32, 32\); for one image .*images\[None\]"):
        cv.resolve_layout(model, "blocks.1", x[0])


# ----------------------------------------------------------------------------- open_clip


@pytest.mark.parametrize("batch_first", [True, False])
def test_open_clip_tower(batch_first):
    tower = open_clip_tower(batch_first)
    x = images((32, 32))
    reference = open_clip_tower(True)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, intermediates_only=True)[
            "image_intermediates"
        ]
    for index in range(2):
        path = f"transformer.resblocks.{index}"
        layout = cv.resolve_layout(tower, path, x)
        assert layout.kind == ("BNC" if batch_first else "NBC")
        assert (layout.grid, layout.prefix_names) == ((4, 4), ("cls",))
        spatial, prefix = layout.split(hooked(tower, path, x))
        torch.testing.assert_close(spatial, expected[index], rtol=1e-5, atol=1e-5)
        assert prefix.shape == (2, 1, 32)
    fc = cv.resolve_layout(tower, "transformer.resblocks.1.mlp.c_fc", x)
    raw = hooked(tower, "transformer.resblocks.1.mlp.c_fc", x)
    tokens = raw if batch_first else raw.transpose(0, 1)
    manual = tokens[:, 1:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(fc.split(raw)[0], manual, rtol=0, atol=0)


def test_open_clip_nbc_with_batch_equal_to_tokens():
    """(N, B, C) with B == N: the axis order comes from the transformer's batch_first flag."""
    tower = open_clip_tower(batch_first=False)
    x = images((32, 32), batch=17)  # 17 tokens = 1 cls + 4x4
    layout = cv.resolve_layout(tower, "transformer.resblocks.0", x)
    assert layout.kind == "NBC"


def test_open_clip_full_model_unwraps_to_vision_tower():
    model = open_clip_model()
    x = images((32, 32))
    for path in ("transformer.resblocks.1", "visual.transformer.resblocks.1"):
        layout = cv.resolve_layout(model, path, x)
        assert (layout.layer, layout.grid, layout.prefix_names) == (
            "visual.transformer.resblocks.1",
            (4, 4),
            ("cls",),
        )


def test_open_clip_timm_trunk():
    tower = open_clip_timm_trunk()
    x = images((32, 32))
    for path in ("trunk.blocks.1", "blocks.1"):
        layout = cv.resolve_layout(tower, path, x)
        assert (layout.layer, layout.grid, layout.prefix_names) == (
            "trunk.blocks.1",
            (4, 4),
            ("cls",),
        )
    with torch.no_grad():
        expected = tower.trunk.forward_intermediates(x, intermediates_only=True)[1]
    torch.testing.assert_close(layout.split(hooked(tower, "trunk.blocks.1", x))[0], expected)


def test_default_inputs_use_the_models_size(built):
    model, _ = built("deit_distilled")
    layout = cv.resolve_layout(model, "blocks.0")
    assert layout.grid == (4, 4)


@pytest.mark.parametrize("arch", ["vit", "swin", "pit", "twins_svt", "dinov2_reg"])
def test_several_layers_in_one_forward_equal_each_alone(built, arch):
    from captum_vit.layout import resolve_layouts

    model, x = built(arch)
    paths = [path for path, _, _ in BLOCK_CASES[arch]]
    paths += [p for p, use_input, _, _ in HIDDEN_CASES.get(arch, []) if not use_input]
    stem = [m for m in model.modules() if not list(m.children())][0]
    calls = []
    handle = stem.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[-1]))
    try:
        together = resolve_layouts(model, paths[::-1], x)  # any order
    finally:
        handle.remove()
    # one forward for all layers, and at most one more at a larger size where a square
    # map's side equals a token count (Twins at 64 px: a 4x4 stage after 2x2 = 4 keys)
    assert calls[:1] == [x.shape[-1]] and calls[1:] in ([], [x.shape[-1] + 32])
    for path, layout in zip(paths[::-1], together, strict=True):
        assert layout == cv.resolve_layout(model, path, x), path


def test_attention_matrices_are_not_read_as_feature_maps():
    """With explicit attention, ``attn_drop`` outputs ``(B, heads, N, N)``: it was read as
    a BCHW map of N x N "patches" with one channel per head (a silent wrong layout), and
    CaiT's talking-heads matrices were listed as grids seen."""
    model = TIMM_ARCHS["vit"][0]()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"token-to-token matrix over the 17 tokens"):
        cv.resolve_layout(model, "blocks.1.attn.attn_drop", x)
    with pytest.raises(ValueError, match="token-to-token matrix"):
        cv.PatchActivationMap(model, "blocks.1.attn.attn_drop").attribute(x, target=0)
    assert cv.resolve_layout(model, "blocks.1.attn", x).grid == (4, 4)
    cait = TIMM_ARCHS["cait"][0]()
    with pytest.raises(ValueError, match=r"last grids seen: 4x4 \(patch_embed.proj\);"):
        cv.resolve_layout(cait, "blocks_token_only.0", x)


def test_attention_over_a_maps_cells_is_not_read_as_a_feature_map():
    """EfficientFormer-V2 computes its attention on 4-D maps: over the 7x7 cells of its
    strided q / k maps, its talking heads output (B, 8, 49, 49), which was read as a
    49x49 BCHW map of 8 channels; no (B, 49, C) sequence ever showed the 49 tokens."""
    from archs import timm_model

    model = timm_model("efficientformerv2_s0")
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    mixer = "stages.2.blocks.4.token_mixer"
    assert hooked(model, f"{mixer}.q", x).shape[-2:] == (7, 7)
    for heads in ("talking_head1", "talking_head2"):
        assert hooked(model, f"{mixer}.{heads}", x).shape == (2, 8, 49, 49)
        with pytest.raises(ValueError, match="token-to-token matrix over the 49 tokens"):
            cv.resolve_layout(model, f"{mixer}.{heads}", x)
    pam = cv.PatchActivationMap(model, mixer)
    oracle = hooked(model, mixer, pam.normalize(x))
    units = torch.tensor([5, 40])
    torch.testing.assert_close(pam.attribute(x, target=units), oracle[torch.arange(2), units])
    assert oracle.shape[-2:] == (14, 14)


def test_a_square_map_as_wide_as_a_token_count_is_a_map_where_it_grows_with_the_image():
    """PVT-v2's spatial-reduction attention shows its keys as a sequence: with 4-px
    patches and reduction 4, 16 key tokens at 64 px, as many as the 16x16 first stage has
    rows. Every (B, C, 16, 16) map after them was refused as a token-to-token matrix over
    16 tokens (at 256 px the same holds for pvt_v2_b0: 64 keys, a 64x64 stage). A
    forward at another size tells them apart: a map grows in proportion to the image, a
    matrix over the image's tokens as their count."""
    from archs import timm_model

    model = timm_model("pvt_v2_b0", depths=(1, 1, 1, 1), sr_ratios=(4, 2, 2, 1))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    keys = hooked(model, "stages.0.blocks.0.attn.norm", x)
    assert keys.shape[1] == 16
    pam = cv.PatchActivationMap(model, "stages.0")
    oracle = model.forward_intermediates(pam.normalize(x), indices=[0], intermediates_only=True)
    assert oracle[0].shape == (2, 32, 16, 16)
    units = torch.tensor([4, 20])
    maps = pam.attribute(x, target=units)
    torch.testing.assert_close(maps, oracle[0][torch.arange(2), units])
    mlp = cv.resolve_layout(model, "stages.0.blocks.0.mlp.dwconv", x)
    assert (mlp.kind, mlp.grid) == ("BCHW", (16, 16))
    # a real matrix over the image's tokens is still one, at any size the model takes
    small = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    vit = timm_model("vit_tiny_patch16_224", dynamic_img_size=True, **small)
    for module in vit.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    with pytest.raises(ValueError, match="token-to-token matrix over the 17 tokens"):
        cv.resolve_layout(vit, "blocks.1.attn.attn_drop", torch.rand(2, 3, 32, 32))
    assert hooks_left(model) == hooks_left(vit) == 0


def test_per_head_tensors_are_not_read_as_feature_maps():
    """XCiT attends between channels: its attn_drop outputs (B, heads, d, d), with d the
    head width. At 224 px with 8-px patches, d = 32 fitted a 32x32 BCHW map (stride 7)
    with one channel per head, a silent wrong map; no token count is 32."""
    from archs import timm_model

    model = timm_model("xcit_nano_12_p8_224", depth=4)
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert hooked(model, "blocks.3.attn.attn_drop", x).shape == (1, 4, 32, 32)
    with pytest.raises(ValueError, match="inside XCA, whose 4 heads are its second axis"):
        cv.resolve_layout(model, "blocks.3.attn.attn_drop", x)
    pam = cv.PatchActivationMap(model, "blocks.3")
    with torch.no_grad():
        oracle = model.forward_intermediates(
            pam.normalize(x), indices=[3], intermediates_only=True
        )[0]
    torch.testing.assert_close(pam.attribute(x, target=[5]), oracle[:, 5])
    assert cv.resolve_layout(model, "blocks.3.local_mp.conv1", x).grid == (28, 28)


def test_a_channels_first_sequence_is_not_read_as_tokens():
    """EfficientViM's state-space mixer runs Conv1d over the 7x7 = 49 positions: its
    BCdt_proj outputs (B, 75, 49), channels first, which was read as 49 patch tokens after
    26 prefix tokens with 49 channels. The same positions as a 2-D map (its ``dw``) read
    right."""
    from archs import timm_model

    model = timm_model("efficientvim_m1")
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    mixer = "stages.1.blocks.0.mixer"
    assert hooked(model, f"{mixer}.BCdt_proj", x).shape == (2, 75, 49)
    for path in (f"{mixer}.BCdt_proj", f"{mixer}.BCdt_proj.conv"):
        with pytest.raises(ValueError, match=r"from a Conv1d: channels first, \(B, C, L\)"):
            cv.resolve_layout(model, path, x)
    pam = cv.PatchActivationMap(model, f"{mixer}.dw")
    oracle = hooked(model, f"{mixer}.dw", pam.normalize(x))
    assert oracle.shape == (2, 75, 7, 7)
    units = torch.tensor([1, 70])
    torch.testing.assert_close(pam.attribute(x, target=units), oracle[torch.arange(2), units])
    assert hooks_left(model) == 0


def test_a_layer_that_never_runs_says_why_for_fused_attention():
    model = TIMM_ARCHS["vit"][0]()
    with pytest.raises(RuntimeError, match=r"fused_attn=True\), which never calls attn_drop"):
        cv.capture_layers(model, "blocks.1.attn.attn_drop", torch.rand(2, 3, 32, 32))


def _described_shape(text: str, batch: int) -> tuple[int, ...]:
    shape = text.split("tensor    (")[1].split(")")[0]
    return tuple(batch if part == "B" else int(part) for part in shape.split(", "))


@pytest.mark.parametrize(
    "arch,path,tokens",
    [
        ("deit_distilled", "blocks.1", "2 prefix: cls at 0, dist at 1; then 4x4 patches in"),
        ("dinov2_reg", "blocks.1.mlp.act", "5 prefix: cls at 0, reg0 at 1, reg1 at 2, reg2 at"),
        ("vit_avg", "blocks.0", "no prefix tokens; 4x4 patches in raster order"),
        ("swin", "layers.1", "a 7x11 patch grid; no prefix tokens"),
        ("pit", "transformers.1", "1 prefix (cls) apart, (B, 1, C) at position 1 of the"),
    ],
)
def test_describe_gives_the_captured_tensors_shape_and_token_order(built, arch, path, tokens):
    """The ``layout MODEL LAYER`` command printed the dataclass repr; ``describe()`` is
    what it prints now: checked against the tensor a plain hook captures."""
    model, x = built(arch)
    layout = cv.resolve_layout(model, path, x)
    text = layout.describe()
    out = hooked(model, path, x)
    tensor = out if layout.element is None else out[layout.element]
    assert _described_shape(text, x.shape[0]) == tuple(tensor.shape)
    assert f"({layout.kind})" in text and f"channels  {layout.num_channels}" in text
    assert tokens in text and text.startswith(f"layer     {path} (its output)")


def test_describe_a_sequence_first_open_clip_layer():
    tower = open_clip_tower(batch_first=False)
    x = images((32, 32), batch=3)
    layout = cv.resolve_layout(tower, "transformer.resblocks.1", x)
    text = layout.describe()
    out = hooked(tower, "transformer.resblocks.1", x)
    assert _described_shape(text, 3) == tuple(out.shape) == (17, 3, 32)
    assert "sequence first (NBC)" in text and "1 prefix: cls at 0; then 4x4 patches" in text


class _CoordinatePatches(torch.nn.Module):
    """A linear embedding of 8-px patches that returns its tokens in ``order`` with their
    ``(row, col)`` coordinates, as timm's Gemma 4 patch embedding does."""

    def __init__(self, order):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 8 * 8, 16)
        self.order = order

    def forward(self, x):
        batch, _, height, width = x.shape
        patches = x.unfold(2, 8, 8).unfold(3, 8, 8)  # (B, 3, h, w, 8, 8)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, -1, 3 * 8 * 8)
        rows, cols = torch.meshgrid(
            torch.arange(height // 8), torch.arange(width // 8), indexing="ij"
        )
        coords = torch.stack([rows.flatten(), cols.flatten()], -1).expand(batch, -1, -1)
        return self.proj(patches)[:, self.order], coords[:, self.order]


class _CoordinateModel(torch.nn.Module):
    def __init__(self, order):
        super().__init__()
        torch.manual_seed(0)
        self.patch_embed = _CoordinatePatches(order)
        self.block = torch.nn.Linear(16, 16)

    def forward(self, x):
        tokens, _ = self.patch_embed(x)
        return self.block(tokens)


def test_raster_coordinates_witness_the_grid_and_shuffled_ones_do_not():
    """Planted: tokens in raster order with their coordinates resolve to the 3x4 grid
    (equal to the hand reshape); the same tokens shuffled, coordinates and all, must not
    be read as a grid."""
    x = images((24, 32))
    raster = _CoordinateModel(torch.arange(12))
    layout = cv.resolve_layout(raster, "block", x)
    assert layout.grid == (3, 4) and layout.num_prefix_tokens == 0
    out = hooked(raster, "block", x)
    spatial, _ = layout.split(out)
    torch.testing.assert_close(spatial, out.transpose(1, 2).reshape(2, 16, 3, 4))
    shuffled = _CoordinateModel(torch.randperm(12, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="fits no patch grid"):
        cv.resolve_layout(shuffled, "block", x)


def test_hiera_unrolled_tokens_are_read_in_raster_order(tmp_path):
    """Hiera (timm) reorders its tokens into mask units before its blocks, and each query
    pooling uses up one level of that order. Its token layers were refused (stage 0 had
    once been silently scrambled). Every block, and layers inside a pooling block on both
    sides of the pooling, now read as timm's own Reroll / forward_intermediates put them
    on the grid (exact), and the order goes back in where patch_grid reassembles a layer
    and where an objective picks a position."""
    from archs import timm_model
    from captum.attr import LayerActivation

    from captum_vit.optim.objectives import compile_objectives, neuron

    model = timm_model("hiera_tiny_224", img_size=64, embed_dim=16, num_heads=1, stages=(1,) * 4)
    assert cv.ImageModel(model).image_size == (64, 64)  # it keeps no img_size: was 224
    with pytest.raises(ValueError, match="takes 64x64 images only"):
        cv.PatchActivationMap(model, "blocks.0").attribute(torch.rand(2, 3, 96, 96))
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x = cv.ImageModel(model).normalize(pixels)
    with torch.no_grad():
        stages = model.forward_intermediates(x, indices=4, intermediates_only=True)
    raw_first = hooked(model, "blocks.0", x).transpose(1, 2).reshape(2, 16, 16, 16)
    assert not torch.allclose(raw_first, stages[0], atol=1e-2)  # unrolled is not raster
    for block, stage in enumerate(stages):
        maps = cv.PatchActivationMap(model, f"blocks.{block}").attribute(pixels)
        torch.testing.assert_close(maps, stage, rtol=0, atol=0)
    # inside the pooling block: norm1 before the pooling (stage 0), the MLP after (stage 1)
    for layer, stage in (("blocks.1.norm1", 0), ("blocks.1.mlp.act", 1), ("unroll", 0)):
        raster = model.reroll(hooked(model, layer, x), stage).permute(0, 3, 1, 2)
        maps = cv.PatchActivationMap(model, layer).attribute(pixels)
        torch.testing.assert_close(maps, raster, rtol=0, atol=0)
    layout = cv.resolve_layout(model, "blocks.1.mlp.act", x)
    assert layout.grid == (8, 8) and "8x8 patches in Hiera's unrolled order" in layout.describe()

    # an objective at a position reads that cell of the grid
    unit, cell = 5, (2, 6)
    raw = hooked(model, "blocks.1.mlp.act", x)
    scorer = compile_objectives([neuron(unit, cell)], layout, layout.num_channels)
    expected = model.reroll(raw, 1)[:, cell[0], cell[1], unit]
    torch.testing.assert_close(scorer(raw), expected)

    # patch_grid hands Captum the grid and puts the tokens back in Hiera's order
    last = hooked(model, "blocks.3", x)  # its head is zero at initialization: not the logits
    with cv.patch_grid(model, "blocks.1", inputs=pixels) as grid:
        passed = hooked(model, "blocks.3", x)
        activation = LayerActivation(model, grid).attribute(x)
    torch.testing.assert_close(passed, last, rtol=0, atol=0)
    torch.testing.assert_close(activation, stages[1], rtol=0, atol=0)
    assert hooks_left(model) == 0
    with pytest.raises(ValueError, match="returns one tensor.*element=1"):
        cv.resolve_layout(model, "blocks.0", x, element=1)

    # the atlas's default layers (the MLP hidden layers) are read now
    site = cv.build_atlas(model, pixels, out=tmp_path / "atlas", steps=1, units=1, k=1)
    assert site.name == "index.html" and site.is_file()


def test_hugging_face_hiera_reads_in_raster_order():
    """Hugging Face's Hiera unrolls with a function before its encoder; its stages
    return tuples. Each stage's tokens read as its own reshaped_hidden_states (exact), and
    at another input size (its unroll follows the image) the first layer reads as the
    embeddings' raster map through the same LayerNorm."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "HieraConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Hiera")
    config = transformers.HieraConfig(
        embed_dim=16,
        image_size=[64, 64],
        patch_size=[7, 7],
        patch_stride=[4, 4],
        patch_padding=[3, 3],
        depths=[1, 1, 1, 1],
        num_heads=[1, 2, 2, 2],
        mlp_ratio=2.0,
    )
    torch.manual_seed(0)
    hf = transformers.HieraModel(config).eval()
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf(cv.ImageModel(hf).normalize(pixels), output_hidden_states=True)
    for stage, reshaped in enumerate(out.reshaped_hidden_states[1:]):
        maps = cv.PatchActivationMap(hf, f"encoder.stages.{stage}").attribute(pixels)
        torch.testing.assert_close(maps, reshaped.permute(0, 3, 1, 2), rtol=0, atol=0)
    layout = cv.resolve_layout(hf, "encoder.stages.1.layers.0.attn", pixels)
    assert layout.element == 0 and layout.grid == (8, 8)

    larger = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    embedded = cv.PatchActivationMap(hf, "embeddings").attribute(larger)
    norm = hf.encoder.stages[0].layers[0].layernorm_before
    with torch.no_grad():
        expected = norm(embedded.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    layer = "encoder.stages.0.layers.0.layernorm_before"
    maps = cv.PatchActivationMap(hf, layer).attribute(larger)
    assert maps.shape == (2, 16, 32, 32)
    torch.testing.assert_close(maps, expected)


def test_levit_token_stages_after_its_subsampling_are_read():
    """LeViT (timm's token version, Hugging Face's) subsamples its tokens between stages
    (every second row and column of the grid, flattened again), which no map shows: its
    later stages were refused ("fits no patch grid"). The subsampling's grid is now a
    witness, and every stage equals timm's forward_intermediates / Hugging Face's hidden
    states (exact). timm's LeViT keeps no img_size either: it was taken for 224."""
    from archs import timm_model

    model = timm_model("levit_128s", img_size=64, embed_dim=(32, 48, 64), num_heads=(1, 2, 2))
    assert cv.ImageModel(model).image_size == (64, 64)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x = cv.ImageModel(model).normalize(pixels)
    with torch.no_grad():
        stages = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(stage.shape[-2:]) for stage in stages] == [(4, 4), (2, 2), (1, 1)]
    for index, stage in enumerate(stages):
        maps = cv.PatchActivationMap(model, f"stages.{index}").attribute(pixels)
        torch.testing.assert_close(maps, stage, rtol=0, atol=0)
    hidden = hooked(model, "stages.1.blocks.0.mlp.act", x)
    maps = cv.PatchActivationMap(model, "stages.1.blocks.0.mlp.act").attribute(pixels)
    torch.testing.assert_close(maps, hidden.transpose(1, 2).reshape(2, -1, 2, 2))

    transformers = pytest.importorskip("transformers")
    config = transformers.LevitConfig(
        image_size=128,
        hidden_sizes=[32, 48, 64],
        num_attention_heads=[1, 2, 2],
        depths=[1, 1, 1],
        key_dim=[8, 8, 8],
    )
    hf = transformers.LevitModel(config).eval()
    pixels = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        states = hf(cv.ImageModel(hf).normalize(pixels), output_hidden_states=True).hidden_states
    for index, grid in enumerate([(4, 4), (2, 2)]):
        maps = cv.PatchActivationMap(hf, f"encoder.stages.{index}").attribute(pixels)
        tokens = states[index + 1]
        torch.testing.assert_close(maps, tokens.transpose(1, 2).reshape(2, -1, *grid))


def test_a_one_size_model_s_square_map_is_a_map_outside_attention():
    """EfficientFormer-V2 takes one size. At 64 px its third stage is a 4x4 map after the
    2x2 = 4 tokens of its strided attention; a second forward at another size, which
    tells such a map from a 4x4 token-to-token matrix, fails, so the stage (and the
    fourth) was refused as a matrix. Outside an attention module it is read as a map now
    (equal to forward_intermediates); the talking heads inside it stay matrices."""
    from archs import timm_model

    model = timm_model("efficientformerv2_s0", img_size=64)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x = cv.ImageModel(model).normalize(pixels)
    with torch.no_grad():
        stages = model.forward_intermediates(x, intermediates_only=True)
    assert tuple(stages[2].shape[-2:]) == (4, 4)
    for index, stage in enumerate(stages):
        maps = cv.PatchActivationMap(model, f"stages.{index}").attribute(pixels)
        torch.testing.assert_close(maps, stage, rtol=0, atol=0)
    with pytest.raises(ValueError, match="token-to-token matrix over the 4 tokens"):
        cv.resolve_layout(model, "stages.2.blocks.4.token_mixer.talking_head1", x)


class _ReshapedPatches(torch.nn.Module):
    """Planted: patches cut out by reshaping and projected by an nn.Linear, so no module
    output shows the 4x4 grid; then a cls token and one token-wise layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(3 * 8 * 8, 16)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 16))
        self.block = torch.nn.Linear(16, 16)

    def forward(self, x):
        b = x.shape[0]
        patches = x.reshape(b, 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, -1)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), self.embed(patches)], dim=1)
        return self.block(tokens)


def test_a_model_that_shows_no_grid_is_not_called_non_spatial():
    """A model whose patch embedding shows the grid to nothing the package reads: the
    refusal called the layer "not spatial: pooled, class-attention or query tokens"; it
    says that no grid was seen and why."""
    with pytest.raises(ValueError, match="fits no patch grid: none was seen before it.*reshaping"):
        cv.resolve_layout(_ReshapedPatches(), "block", images((32, 32)))


def test_tnt_outer_tokens_are_read_on_the_grid_its_pixel_embedding_shows():
    """TNT's pixel embedding embeds each patch's pixels apart, (B * patches, pixels, C):
    no map showed its grid, so its outer tokens were refused ("fits no patch grid: none
    was seen"). Its per-patch rows now witness the grid; every block's outer tokens equal
    timm's forward_intermediates (exact), with the cls token named."""
    from archs import timm_model

    model = timm_model("tnt_s_patch16_224", img_size=64, depth=2)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x = cv.ImageModel(model).normalize(pixels)
    with torch.no_grad():
        blocks = model.forward_intermediates(x, intermediates_only=True)
    for index, expected in enumerate(blocks):
        maps = cv.PatchActivationMap(model, f"blocks.{index}").attribute(pixels)
        torch.testing.assert_close(maps, expected, rtol=0, atol=0)
    layout = cv.resolve_layout(model, "blocks.1.mlp.act", x)
    assert (layout.grid, layout.prefix_names) == ((4, 4), ("cls",))
    with pytest.raises(ValueError, match="multiple of the batch"):
        cv.resolve_layout(model, "blocks.0.mlp_in.act", x)  # the pixel tokens of each patch


class _ChannelsLastCube(torch.nn.Module):
    """A planted model whose ``mix`` layer outputs (B, h, w, C) with C == h == w at 64 px
    (a 16x16 grid of 16 channels) and declares no format; ``fixed`` takes 64 px only."""

    def __init__(self, fixed: bool = False) -> None:
        super().__init__()
        self.fixed = fixed
        self.stem = torch.nn.Conv2d(3, 16, 4, stride=4)
        self.mix = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        if self.fixed and x.shape[-2:] != (64, 64):
            raise ValueError("this model takes 64x64 images only")
        tokens = self.mix(self.stem(x).permute(0, 2, 3, 1))
        return self.head(tokens.mean((1, 2)))


def test_maps_whose_channels_equal_their_grid_are_oriented_by_a_second_size():
    """ConvNeXt's first stage at 384 px is (B, 96, 96, 96): 96 channels on a 96x96 grid,
    so its shape cannot say which axis holds the channels, and every layer of that stage
    was refused. The axis whose length does not follow the input size is the channel
    axis: a second forward at a larger size tells."""
    from archs import timm_model

    model = timm_model("convnext_atto", dims=(16, 32, 48, 64), depths=(1, 1, 1, 1))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pam = cv.PatchActivationMap(model, "stages.0")
    oracle = model.forward_intermediates(pam.normalize(x), intermediates_only=True)[0]
    assert oracle.shape == (2, 16, 16, 16)
    assert pam.layout_for(x).kind == "BCHW"
    units = torch.tensor([3, 11])
    torch.testing.assert_close(pam.attribute(x, target=units), oracle[torch.arange(2), units])
    assert hooks_left(model) == 0

    planted = _ChannelsLastCube().eval()
    layout = cv.resolve_layout(planted, "mix", torch.rand(2, 3, 64, 64))
    assert (layout.kind, layout.grid, layout.num_channels) == ("BHWC", (16, 16), 16)
    pam = cv.PatchActivationMap(planted, "mix", image_size=64, mean=(0.5,) * 3, std=(0.25,) * 3)
    maps = pam.attribute(x, target=units)
    tokens = hooked(planted, "mix", pam.normalize(x))
    torch.testing.assert_close(maps, tokens[torch.arange(2), :, :, units])
    assert hooks_left(planted) == 0


def test_a_cube_map_of_a_model_of_one_size_says_what_to_do():
    planted = _ChannelsLastCube(fixed=True).eval()
    with pytest.raises(ValueError, match="did not run at 96x96.*images of another size"):
        cv.resolve_layout(planted, "mix", torch.rand(2, 3, 64, 64))
    assert hooks_left(planted) == 0
    assert cv.resolve_layout(planted, "stem", torch.rand(2, 3, 64, 64)).kind == "BCHW"


def test_torchvision_maxvit_partitioned_tensors_are_refused_and_its_grid_layers_read():
    """Between its partition_op and departition_op, torchvision MaxViT's attention works on
    (B, windows, window_area, C) tensors. At 128 px its grid attention's (2, 64, 16, 16)
    fitted a 16x16 BCHW map with 64 channels by shape alone: a silent wrong map."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.MaxVit(
        input_size=(128, 128),
        stem_channels=8,
        partition_size=4,
        block_channels=[16, 32],
        block_layers=[1, 1],
        head_dim=8,
        stochastic_depth_prob=0.0,
        num_classes=5,
    ).eval()
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    base = "blocks.0.layers.0.layers.grid_attention"
    for child in ["partition_op", "partition_swap", "attn_layer", "mlp_layer", "departition_swap"]:
        with pytest.raises(ValueError, match="inside torchvision's PartitionAttentionLayer"):
            cv.resolve_layout(model, f"{base}.{child}", x)
    with pytest.raises(ValueError, match="PartitionAttentionLayer"):
        cv.resolve_layout(model, f"{base}.departition_op", x, attribute_to_layer_input=True)
    assert cv.resolve_layout(
        model, f"{base}.partition_op", x, attribute_to_layer_input=True
    ).grid == (32, 32)
    for path in [base, f"{base}.departition_op"]:
        pam = cv.PatchActivationMap(model, path, image_size=128, mean=(0.5,) * 3, std=(0.25,) * 3)
        oracle = hooked(model, path, pam.normalize(x))
        assert oracle.shape == (2, 16, 32, 32)
        units = torch.tensor([2, 9])
        torch.testing.assert_close(pam.attribute(x, target=units), oracle[torch.arange(2), units])
    assert hooks_left(model) == 0

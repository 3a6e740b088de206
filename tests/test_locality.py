"""SpatialLocalityProbe: planted ground truth (zeroed / uniform attention), a brute-force
oracle (one backward per position through timm's own forward_intermediates), every
architecture family, hygiene and errors."""

from __future__ import annotations

import math

import matplotlib
import pytest
import timm
import torch
from archs import TIMM_ARCHS, open_clip_timm_trunk, open_clip_tower

import captum_vit as cv
from captum_vit.locality import find_blocks

matplotlib.use("Agg")


def small_vit(depth: int = 4, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=64, depth=depth, embed_dim=48, num_heads=2, **kwargs
    ).eval()


def rgb(size=(64, 64), batch=2, seed=0) -> torch.Tensor:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def zero_attention(model: torch.nn.Module, blocks) -> None:
    with torch.no_grad():
        for block in blocks:
            block.attn.proj.weight.zero_()
            block.attn.proj.bias.zero_()


def uniform_attention(block: torch.nn.Module, scale: float) -> None:
    """q = k = 0 (uniform attention), v = identity, proj = scale * identity: the attention
    output of every token is ``scale`` times the mean of all normalized tokens."""
    attn = block.attn
    width = attn.qkv.weight.shape[1]
    with torch.no_grad():
        attn.qkv.weight.zero_()
        attn.qkv.bias.zero_()
        attn.qkv.weight[2 * width :] = torch.eye(width)
        attn.proj.weight.copy_(torch.eye(width) * scale)
        attn.proj.bias.zero_()


# --------------------------------------------------------------------------- ground truth


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_zeroed_attention_is_perfectly_local(pool):
    kwargs = {} if pool == "token" else dict(class_token=False, global_pool="avg")
    model = small_vit(**kwargs)
    zero_attention(model, model.blocks)
    report = cv.SpatialLocalityProbe(model).attribute(rgb())
    assert report.layers == [f"blocks.{i}" for i in range(4)]
    assert (report.locality >= 0.95).all()
    torch.testing.assert_close(report.locality, torch.ones(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_uniform_last_attention_mixes_only_that_layer(pool):
    kwargs = {} if pool == "token" else dict(class_token=False, global_pool="avg")
    model = small_vit(**kwargs)
    zero_attention(model, model.blocks[:-1])
    # The restored (random-init, weak) attention mixes a little; uniform attention of unit
    # gain mixes a lot; with a dominant gain the share tends to 1 / (h*w). The default
    # reads every block at its output, also the last block of the cls-pooled model.
    probe = cv.SpatialLocalityProbe(model)
    restored = probe.attribute(rgb()).locality
    assert restored[-1] < restored[:-1].min() - 0.01
    uniform_attention(model.blocks[-1], 1.0)
    unit = probe.attribute(rgb()).locality
    uniform_attention(model.blocks[-1], 100.0)
    strong = probe.attribute(rgb()).locality
    torch.testing.assert_close(strong[:-1], torch.ones(3), atol=1e-5, rtol=0)
    assert unit[-1] < 0.5 < 0.95 <= unit[:-1].min()
    assert abs(float(strong[-1]) - 1 / 16) < 0.01  # 4x4 grid, uniform mixing


def test_cls_pooled_last_block_is_measured_at_its_output_and_flagged():
    model = small_vit()
    zero_attention(model, model.blocks[:-1])
    uniform_attention(model.blocks[-1], 100.0)
    report = cv.SpatialLocalityProbe(model).attribute(rgb())
    # The head reads only cls from blocks.3: its patch outputs feed no prediction, yet
    # they are computed from the image, and its uniform attention mixes them globally.
    assert report.sites == ["output"] * 4
    assert report.feeds_output == [True, True, True, False]
    assert abs(float(report.locality[-1]) - 1 / 16) < 0.01
    assert "unused by the output" in str(report).splitlines()[-1]
    assert repr(report) == str(report)  # not every field tensor in full
    # Read at their inputs, the rows shift by one block: all local.
    inputs = cv.SpatialLocalityProbe(model, attribute_to_layer_input=True).attribute(rgb())
    assert inputs.sites == ["input"] * 4
    torch.testing.assert_close(inputs.locality, torch.ones(4), atol=1e-5, rtol=0)
    avg = cv.SpatialLocalityProbe(small_vit(class_token=False, global_pool="avg"))
    report = avg.attribute(rgb(batch=1), positions=1)
    assert report.sites == ["output"] * 4 and report.feeds_output == [True] * 4


def test_input_of_last_block_equals_output_of_previous_block():
    model = small_vit(depth=2)
    x = rgb()
    last = cv.SpatialLocalityProbe(
        model, layers=["blocks.1"], attribute_to_layer_input=True
    ).attribute(x)
    previous = cv.SpatialLocalityProbe(model, layers=["blocks.0"]).attribute(x)
    assert last.sites == ["input"] and previous.sites == ["output"]
    # Same seed -> same projection; the input of blocks.1 is the output of blocks.0.
    torch.testing.assert_close(last.fields, previous.fields, atol=1e-6, rtol=0)


def test_random_vit_ti_values_are_plausible_and_dominated_by_zero_attention():
    # ViT-Ti/16 (12 blocks, width 192) with random weights, at 64 px (4x4 grid).
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64).eval()
    x = rgb(batch=1)
    report = cv.SpatialLocalityProbe(model, batch_size=16).attribute(x)
    print("random ViT-Ti locality:", [round(v, 3) for v in report.locality.tolist()])
    assert report.locality.shape == (12,)
    assert report.fields.shape == (12, 4, 4, 4, 4)
    assert report.grids == [(4, 4)] * 12
    fields = report.fields.reshape(12, 16, 16)
    assert (fields >= 0).all() and (fields <= 1).all()
    torch.testing.assert_close(fields.sum(-1), torch.ones(12, 16))
    diagonal = fields.diagonal(dim1=1, dim2=2).mean(-1)
    torch.testing.assert_close(report.locality, diagonal)
    assert (report.locality > 1 / 16).all() and (report.locality < 1).all()
    zero_attention(model, model.blocks)
    local = cv.SpatialLocalityProbe(model, batch_size=16).attribute(x, positions=4).locality
    assert (local >= report.locality).all() and (local > 0.99).all()


# --------------------------------------------------------------------------- oracle


def oracle_fields(model, layer_index, x, projection, grid, cells=None):
    """One forward + backward per position through timm's forward_intermediates (no
    captum_vit code): |grad| of the [0, 1] image summed per region, as shares. Returns
    ``(len(cells), h*w)`` rows (all cells by default)."""
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    h, w = grid
    height, width = x.shape[-2:]
    rows = []
    for cell in range(h * w) if cells is None else cells.tolist():
        image = x.clone().requires_grad_(True)
        (maps,) = model.forward_intermediates(
            (image - mean) / std, indices=[layer_index], intermediates_only=True
        )
        score = (maps[:, :, cell // w, cell % w] @ projection).sum()
        (grad,) = torch.autograd.grad(score, image)
        mass = grad.abs().sum(1)
        shares = torch.zeros(x.shape[0], h, w)
        for a in range(h):
            for b in range(w):
                # pixels y with a*H/h <= y < (a+1)*H/h
                r0, r1 = math.ceil(a * height / h), math.ceil((a + 1) * height / h)
                c0, c1 = math.ceil(b * width / w), math.ceil((b + 1) * width / w)
                shares[:, a, b] = mass[:, r0:r1, c0:c1].sum((1, 2))
        rows.append(shares.flatten(1) / shares.flatten(1).sum(1, keepdim=True))
    return torch.stack(rows, 1).mean(0)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_fields_match_bruteforce_oracle(pool):
    kwargs = {} if pool == "token" else dict(class_token=False, global_pool="avg")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        **kwargs,
    ).eval()
    x = rgb((32, 32))
    report = cv.SpatialLocalityProbe(model, batch_size=5).attribute(x)
    cells = torch.tensor([0, 3, 5, 6, 9, 10, 12, 15])  # corners, edges and centre
    for index in range(2):
        expected = oracle_fields(model, index, x, report.projections[index], (4, 4), cells)
        measured = report.fields[index].reshape(16, 16)[cells]
        torch.testing.assert_close(measured, expected, atol=1e-5, rtol=1e-4)


def test_stage_grids_match_oracle_swin_and_resnet():
    for name, layers, indices in (
        ("swin", ["layers.0", "layers.1"], [0, 1]),
        ("resnet", ["layer1", "layer2"], [1, 2]),
    ):
        factory, size = TIMM_ARCHS[name]
        model = factory()
        x = rgb(size, batch=1)
        report = cv.SpatialLocalityProbe(model, layers=layers).attribute(x, positions=6)
        for slot, index in enumerate(indices):
            grid, cells = report.grids[slot], report.positions[slot]
            expected = oracle_fields(model, index, x, report.projections[slot], grid, cells)
            measured = report.field(slot).reshape(grid[0] * grid[1], -1)[cells]
            torch.testing.assert_close(measured, expected, atol=1e-5, rtol=1e-4)
        if name == "swin":  # 14x21 then 7x11 cells (84 / 11 is not an integer)
            assert report.grids == [(14, 21), (7, 11)]
            assert isinstance(report.fields, list)


def test_sampled_positions_equal_the_full_grid_rows():
    model = small_vit(depth=2)
    x = rgb()
    full = cv.SpatialLocalityProbe(model).attribute(x)
    sampled = cv.SpatialLocalityProbe(model, batch_size=3).attribute(x, positions=5)
    for index in range(2):
        cells = sampled.positions[index]
        assert len(cells) == 5
        flat = sampled.fields[index].reshape(16, 16)
        torch.testing.assert_close(flat[cells], full.fields[index].reshape(16, 16)[cells])
        others = torch.ones(16, dtype=torch.bool)
        others[cells] = False
        assert torch.isnan(flat[others]).all()
        torch.testing.assert_close(sampled.locality[index], flat[cells, cells].mean())


# --------------------------------------------------------------------------- architectures


# Many-block hierarchical models: probe only their last three blocks (block discovery is
# tested in test_find_blocks) to keep the suite fast.
HEAVY = {"coat_lite", "pit", "twins_pcpvt", "twins_svt"}


# CoaT (parallel blocks, slow to run) is left out: its last parallel block returns x1
# unchanged, so the head's gradient reaches it through the block's own inputs.
@pytest.mark.parametrize("name", sorted(set(TIMM_ARCHS) - {"coat"}))
def test_every_architecture(name):
    factory, size = TIMM_ARCHS[name]
    model = factory()
    layers = find_blocks(model)[-3:] if name in HEAVY else None
    report = cv.SpatialLocalityProbe(model, layers=layers).attribute(
        rgb(size, batch=1), positions=2
    )
    assert len(report.layers) == len(report.locality) >= 2
    assert ((report.locality >= 0) & (report.locality <= 1)).all()
    assert report.sites == ["output"] * len(report.sites)
    assert report.feeds_output[:-1] == [True] * (len(report.sites) - 1)
    # Token pooling: the head's gradient on the last block's patch tokens is exactly zero;
    # average pooling, CaiT's class attention, CNNs use them.
    if name in ("vit", "vit_dynamic", "deit_distilled", "dinov2_reg", "convit", "pit", "coat_lite"):
        assert report.feeds_output[-1] is False, report.feeds_output
    if name in ("vit_avg", "vit_map", "swin", "twins_svt", "twins_pcpvt", "resnet", "cait"):
        assert report.feeds_output[-1] is True, report.feeds_output


def test_open_clip_towers():
    for tower in (open_clip_tower(), open_clip_tower(batch_first=False), open_clip_timm_trunk()):
        report = cv.SpatialLocalityProbe(tower).attribute(rgb((32, 32), batch=1))
        assert len(report.layers) == 2 and report.sites == ["output", "output"]
        assert report.feeds_output == [True, False]  # cls pooling
        assert ((report.locality > 0) & (report.locality <= 1)).all()


def test_find_blocks():
    assert find_blocks(TIMM_ARCHS["vit"][0]()) == ["blocks.0", "blocks.1"]
    assert find_blocks(TIMM_ARCHS["swin"][0]()) == [
        "layers.0.blocks.0",
        "layers.0.blocks.1",
        "layers.1.blocks.0",
        "layers.1.blocks.1",
    ]
    assert find_blocks(TIMM_ARCHS["resnet"][0]())[:3] == ["layer1.0", "layer1.1", "layer2.0"]
    assert find_blocks(TIMM_ARCHS["twins_svt"][0]())[:2] == ["blocks.0.0", "blocks.0.1"]
    assert find_blocks(open_clip_tower()) == ["transformer.resblocks.0", "transformer.resblocks.1"]
    cait = cv.SpatialLocalityProbe(TIMM_ARCHS["cait"][0]()).attribute(rgb((32, 32), batch=1), 1)
    assert cait.layers == ["blocks.0", "blocks.1"]  # class-attention blocks have no grid


def test_layers_in_forward_order():
    model = small_vit(depth=3)
    report = cv.SpatialLocalityProbe(model, layers=["blocks.2", "blocks.0.mlp.fc1"]).attribute(
        rgb(batch=1), positions=2
    )
    assert report.layers == ["blocks.0.mlp.fc1", "blocks.2"]
    assert report.sites == ["output", "output"]


# --------------------------------------------------------------------------- hygiene, errors


def test_leaves_model_as_found_also_after_an_exception():
    model = small_vit(depth=2).train()
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    x = rgb()
    before = x.clone()
    cv.SpatialLocalityProbe(model).attribute(x, positions=2)
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    calls = []

    def explode(_module, _args, _output):
        calls.append(1)
        if len(calls) > 5:  # past the set-up passes, inside the batched probing
            raise RuntimeError("boom")

    handle = model.blocks[0].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            cv.SpatialLocalityProbe(model).attribute(x)
    finally:
        handle.remove()
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert model.training and [p.requires_grad for p in model.parameters()] == flags


def test_errors():
    model = small_vit(depth=2)
    with pytest.raises(ValueError, match="unknown layer"):
        cv.SpatialLocalityProbe(model, layers=["blocks.9"])
    with pytest.raises(TypeError, match="attribute_to_layer_input"):
        cv.SpatialLocalityProbe(model, attribute_to_layer_input="input")
    with pytest.raises(ValueError, match="batch_size"):
        cv.SpatialLocalityProbe(model, batch_size=0)
    with pytest.raises(TypeError, match="batch_size"):
        cv.SpatialLocalityProbe(model, batch_size=2.0)
    probe = cv.SpatialLocalityProbe(model)
    with pytest.raises(ValueError, match="positions"):
        probe.attribute(rgb(), positions=0)
    with pytest.raises(TypeError, match="positions"):
        probe.attribute(rgb(), positions="all")
    with pytest.raises(ValueError, match="divide 0-255 images by 255"):
        probe.attribute(rgb() * 255)
    with pytest.raises(ValueError, match="RGB"):
        probe.attribute(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="64x64"):
        probe.attribute(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="not spatial|no patch"):
        cv.SpatialLocalityProbe(model, layers=["head"]).attribute(rgb(batch=1))
    cait = TIMM_ARCHS["cait"][0]()
    with pytest.raises(ValueError, match="spatial|patch"):
        cv.SpatialLocalityProbe(cait, layers=["blocks_token_only.0"]).attribute(
            rgb((32, 32), batch=1)
        )


def test_plot(tmp_path):
    vit = cv.SpatialLocalityProbe(small_vit(depth=3)).attribute(rgb(batch=1))
    cnn_model, size = TIMM_ARCHS["resnet"]
    cnn = cv.SpatialLocalityProbe(cnn_model()).attribute(rgb(size, batch=1), positions=3)
    path = tmp_path / "locality.png"
    figure = cv.locality.plot_locality(vit, cnn, path=path, fields=3)
    assert path.stat().st_size > 10_000
    assert len(figure.axes) == 1 + 3 + 3
    cv.locality.plot_locality(vit, fields=0)


def test_reports_name_layers_as_the_users_model_does():
    """A full CLIP model's probe named its blocks tower-relative
    (``transformer.resblocks.0``), which on that model is the text transformer's block and
    is refused as ambiguous; the report and top-k names now work as ``layer=`` again."""
    from archs import open_clip_model

    model = open_clip_model()
    x = torch.rand(2, 3, 32, 32)
    report = cv.SpatialLocalityProbe(model).attribute(x)
    assert report.layers == ["visual.transformer.resblocks.0", "visual.transformer.resblocks.1"]
    torch.testing.assert_close(report.field("visual.transformer.resblocks.1"), report.field(1))
    with pytest.raises(ValueError, match="not in this report; its layers: "):
        report.field("transformer.resblocks.1")
    again = cv.SpatialLocalityProbe(model, layers=report.layers).attribute(x)
    torch.testing.assert_close(again.locality, report.locality)
    with pytest.raises(ValueError, match=r"^layer 'visual' outputs a 2-D tensor"):
        cv.SpatialLocalityProbe(model, layers=["visual"]).attribute(x)  # not "the model itself"
    examples = cv.TopActivatingExamples(model, report.layers[1], k=1).attribute([x], target=0)
    assert examples.layer == "visual.transformer.resblocks.1"
    maps = cv.PatchActivationMap(model, examples.layer).attribute(x, target=0)
    torch.testing.assert_close(examples.scores[0, 0], maps.mean((1, 2)).max())

"""LayerTap / capture_layers: values, early exit, several calls, and hygiene."""

from __future__ import annotations

import pytest
import timm
import torch
from archs import TIMM_ARCHS, hooked, hooks_left, images

import captum_vit as cv
from captum_vit.capture import HookSet, LayerTap, capture_layers, preserved_state


def vit12():
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=12, embed_dim=32, num_heads=2
    ).eval()


def count_calls(model):
    """Attach counters to every module (the test's own hooks) and return (counts, handles)."""
    counts = {}
    handles = []
    for name, module in model.named_modules():
        counts[name] = 0

        def hook(m, a, o, name=name):
            counts[name] += 1

        handles.append(module.register_forward_hook(hook))
    return counts, handles


def test_captured_values_equal_a_plain_hook():
    model, x = vit12(), images((32, 32))
    reference = {}
    handles = [
        dict(model.named_modules())[p].register_forward_hook(
            lambda m, a, o, p=p: reference.__setitem__(p, o)
        )
        for p in ("blocks.2", "blocks.5.mlp.fc1")
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    b2, fc1 = capture_layers(model, ["blocks.2", "blocks.5.mlp.fc1"], x)
    torch.testing.assert_close(b2, reference["blocks.2"], rtol=0, atol=0)
    torch.testing.assert_close(fc1, reference["blocks.5.mlp.fc1"], rtol=0, atol=0)
    fc2_in = capture_layers(model, "blocks.5.mlp.fc2", x, attribute_to_layer_input=True)
    torch.testing.assert_close(fc2_in, torch.nn.functional.gelu(fc1), rtol=1e-6, atol=1e-6)


def test_early_exit_never_runs_later_modules():
    model, x = vit12(), images((32, 32))
    counts, handles = count_calls(model)
    try:
        capture_layers(model, "blocks.3", x)
        assert counts["blocks.3"] == 1
        assert counts["blocks.4"] == 0 and counts["blocks.11"] == 0 and counts["head"] == 0
        early = sum(counts.values())
        for name in counts:
            counts[name] = 0
        with torch.no_grad():
            model(x)
        full = sum(counts.values())
        assert early < 0.45 * full  # 4 of 12 blocks plus the embedding
        for name in counts:
            counts[name] = 0
        capture_layers(model, "blocks.11", x)
        assert counts["norm"] == 0 and counts["head"] == 0 and counts["fc_norm"] == 0
        assert sum(counts.values()) < full
        # the last of several layers decides where the forward stops
        for name in counts:
            counts[name] = 0
        capture_layers(model, ["blocks.6", "blocks.1"], x)
        assert counts["blocks.6"] == 1 and counts["blocks.7"] == 0
    finally:
        for h in handles:
            h.remove()


def test_early_exit_off_runs_everything():
    model, x = vit12(), images((32, 32))
    counts, handles = count_calls(model)
    try:
        capture_layers(model, "blocks.3", x, early_exit=False)
        assert counts["head"] == 1
    finally:
        for h in handles:
            h.remove()


def test_modules_called_several_times():
    factory, size = TIMM_ARCHS["coat"]
    model, x = factory(), images(size)
    calls = capture_layers(model, "parallel_blocks.0.mlp2.fc1", x, call=None)
    assert [c.shape[1] for c in calls] == [65, 17, 5]
    second = capture_layers(model, "parallel_blocks.0.mlp2.fc1", x, call=1)
    last = capture_layers(model, "parallel_blocks.0.mlp2.fc1", x, call=-1)
    torch.testing.assert_close(second, calls[1], rtol=0, atol=0)
    torch.testing.assert_close(last, calls[2], rtol=0, atol=0)


def test_grad_flows_to_the_input_through_a_truncated_forward():
    model, x = vit12(), images((32, 32)).requires_grad_(True)
    out = capture_layers(model, "blocks.2", x, grad=True)
    out.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_tap_reuse_and_outside_use():
    model = vit12()
    tap = LayerTap(model, "blocks.1")
    with pytest.raises(RuntimeError, match="inside"):
        tap.run(images((32, 32)))
    with LayerTap(model, "blocks.1") as tap, torch.no_grad():
        a = tap.run(images((32, 32), seed=1))[0]
        b = tap.run(images((32, 32), seed=2))[0]
    assert not torch.equal(a, b)
    assert hooks_left(model) == 0


def test_an_empty_layer_path_says_what_to_give():
    """ "" was "unknown layer ''" with no close names."""
    with pytest.raises(ValueError, match="empty path.*'head'"):
        cv.PatchActivationMap(vit12(), "")


def test_layer_that_does_not_run_is_reported():
    model = vit12()
    with pytest.raises(RuntimeError, match="ran 1 time"):
        capture_layers(model, "head_drop", images((32, 32)), call=3)
    model.unused = torch.nn.Linear(1, 1)
    with pytest.raises(RuntimeError, match="ran 0 time"):
        capture_layers(model, "unused", images((32, 32)))
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match="^layer 'unused' ran 0 time"):  # not 'model.unused'
        with cv.patch_grid(cv.ImageModel(model), "unused", x):
            pass
    with pytest.raises(RuntimeError, match="^layer 'unused' did not run"):
        capture_layers(cv.ImageModel(model), "unused", x, call=None)
    assert hooks_left(model) == 0


def test_a_container_layer_names_the_modules_inside_it():
    """A ModuleList never runs: it was "ran 0 time(s) ... the model's forward does not use
    it", which does not say what to pass instead."""
    model = TIMM_ARCHS["twins_svt"][0]()
    x = torch.rand(2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"'blocks.2' is a ModuleList.*'blocks.2.0', 'blocks.2.1'"):
        cv.PatchActivationMap(model, "blocks.2").attribute(x, target=0)
    with pytest.raises(ValueError, match=r"'blocks' is a ModuleList.*'blocks.0.0', 'blocks.0.1',"):
        cv.FeatureVisualization(model, model.blocks).attribute(target=0, steps=1)
    with pytest.raises(ValueError, match=r"'blocks.1' is a ModuleList"):
        with cv.patch_grid(cv.ImageModel(model), "blocks.1", x):
            pass
    assert hooks_left(model) == 0
    maps = cv.PatchActivationMap(model, "blocks.2.1").attribute(x, target=0)
    assert maps.shape == (2, 4, 4)


class Boom(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("boom inside the forward")


@pytest.mark.parametrize("call", ["capture", "resolve"])
def test_no_hooks_left_after_an_exception(call):
    model = vit12()
    model.blocks[1].mlp.fc2 = Boom()
    model.train()
    model.blocks[0].requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    user_handle = model.blocks[2].register_forward_hook(lambda m, a, o: None)
    with pytest.raises(RuntimeError, match="boom"):
        if call == "capture":
            capture_layers(model, "blocks.2", images((32, 32)))
        else:
            cv.resolve_layout(model, "blocks.2", images((32, 32)))
    assert hooks_left(model) == 1  # only the user's own hook
    user_handle.remove()
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("arch", sorted(TIMM_ARCHS))
def test_no_hooks_and_state_unchanged_after_success(arch):
    factory, size = TIMM_ARCHS[arch]
    model = factory().train()
    first = next(model.parameters())
    first.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    hidden = ("mlp.fc1", "mlp.up_proj", "layer2")  # timm ViTs, Gemma 4, ResNet
    path = [n for n, _ in model.named_modules() if n.endswith(hidden)][0]
    cv.resolve_layout(model, path, images(size))
    capture_layers(model, path, images(size), grad=True)
    assert hooks_left(model) == 0
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_preserved_state_restores_after_exception():
    model = vit12().train()
    with pytest.raises(KeyError), preserved_state(model):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        raise KeyError("x")
    assert model.training and all(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------- later in-place ops


def cloning_hook_value(model, path, x, use_input=False):
    """Independent oracle: a plain hook that copies what it sees, full forward."""
    module = dict(model.named_modules())[path]
    store = []
    if use_input:
        handle = module.register_forward_pre_hook(lambda m, a: store.append(a[0].clone()))
    else:
        handle = module.register_forward_hook(lambda m, a, o: store.append(o.clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return store[0]


def resnet_with_live_bn2():
    """timm's resnet18 config; timm zero-initializes each block's last BatchNorm, so give
    them random scales (else bn2 outputs zeros)."""
    model = TIMM_ARCHS["resnet"][0]()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("bn2"):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
    return model


def test_values_survive_later_in_place_ops():
    # timm's BasicBlock: bn2's output is overwritten by `x += shortcut` and the in-place
    # ReLU after it; layer2 runs later, so the forward goes on past bn2.
    model = resnet_with_live_bn2()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = cloning_hook_value(model, "layer1.0.bn2", x)
    alone = capture_layers(model, "layer1.0.bn2", x)
    together, layer2 = capture_layers(model, ["layer1.0.bn2", "layer2"], x)
    assert expected.abs().amax() > 0.1
    torch.testing.assert_close(alone, expected, rtol=0, atol=0)
    torch.testing.assert_close(together, expected, rtol=0, atol=0)
    torch.testing.assert_close(layer2, cloning_hook_value(model, "layer2", x), rtol=0, atol=0)
    (late,) = capture_layers(model, ["layer1.0.bn2"], x, early_exit=False)
    torch.testing.assert_close(late, expected, rtol=0, atol=0)
    # Input capture: layer1.0.act2 is an in-place ReLU that overwrites its own input.
    relu_in = cloning_hook_value(model, "layer1.0.act2", x, use_input=True)
    assert (relu_in < 0).any()
    given, _ = capture_layers(
        model, ["layer1.0.act2", "layer1.1.act2"], x, attribute_to_layer_input=True
    )
    torch.testing.assert_close(given, relu_in, rtol=0, atol=0)


def test_keep_graph_records_the_tensor_the_output_depends_on():
    model = resnet_with_live_bn2()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with (
        torch.enable_grad(),
        LayerTap(model, "layer1.0.bn2", keep_graph=True, early_exit=False) as tap,
    ):
        outputs = []
        handle = model.register_forward_hook(lambda m, a, o: outputs.append(o))
        try:
            (bn2,) = tap.run(x)
        finally:
            handle.remove()
        (grad,) = torch.autograd.grad(outputs[0].sum(), bn2)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(bn2.detach(), cloning_hook_value(model, "layer1.0.bn2", x))
    torch.testing.assert_close(outputs[0].detach(), model(x).detach(), rtol=0, atol=0)


def test_locality_of_a_layer_overwritten_later_is_its_own():
    model = resnet_with_live_bn2()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def probe(layers):  # the same 6 positions of the first layer in every run
        return cv.SpatialLocalityProbe(model, layers=layers).attribute(x, positions=6)

    both, alone, layer2 = probe(["layer1.0.bn2", "layer2"]), probe("layer1.0.bn2"), probe("layer2")
    assert abs(float(alone.locality[0] - layer2.locality[0])) > 0.01  # the test can tell
    torch.testing.assert_close(both.field(0), alone.field(0), rtol=0, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(both.locality[0], alone.locality[0], rtol=0, atol=1e-6)


def test_on_record_hands_over_each_layer_as_it_is_produced():
    model = vit12()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    layers = ["blocks.5.mlp.fc1", "blocks.1", "blocks.1.mlp.fc1"]
    expected = capture_layers(model, layers, x)
    handed, produced = [], {}
    for path in [*layers, "blocks.6"]:  # the test's own hooks see what the model produced
        module = dict(model.named_modules())[path]
        module.register_forward_hook(lambda m, a, o, path=path: produced.setdefault(path, o))
    try:
        tap = LayerTap(
            model,
            layers,
            on_record=lambda i, value: handed.append((i, value, value.clone())),
        )
        with tap:
            assert tap.run(x) == [None, None, None]
    finally:
        for module in model.modules():
            module._forward_hooks.clear()
    assert [i for i, _, _ in handed] == [2, 1, 0]  # forward order; stopped after blocks.5
    assert "blocks.6" not in produced
    for i, value, copy in handed:
        assert value is produced[layers[i]]  # handed over, not copied
        torch.testing.assert_close(copy, expected[i], rtol=0, atol=0)
    with pytest.raises(ValueError, match="call >= 0"):
        LayerTap(model, layers, call=-1, on_record=lambda i, value: None)


def test_hook_set_removes_every_hook_also_after_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    seen = []
    with HookSet() as hooks:
        hooks.forward(model[0], lambda module, args, output: seen.append(output.shape))
        hooks.pre_forward(model[1], lambda module, args, kwargs: None, with_kwargs=True)
        assert hooks_left(model) == 2
        model(torch.zeros(2, 4))
    assert seen == [torch.Size([2, 4])] and hooks_left(model) == 0
    with pytest.raises(RuntimeError, match="boom"), HookSet() as hooks:
        hooks.forward(model[0], lambda module, args, output: None)
        raise RuntimeError("boom")
    assert hooks_left(model) == 0
    with pytest.raises(AttributeError), HookSet() as hooks:  # fails while registering
        hooks.forward(model[0], lambda module, args, output: None)
        hooks.forward(None, lambda module, args, output: None)
    assert hooks_left(model) == 0


@pytest.mark.parametrize("wrapper", ["compile", "data_parallel"])
def test_compiled_and_data_parallel_models_are_read_through_their_wrapper(wrapper):
    """``torch.compile(model)`` and ``nn.DataParallel(model)`` prefix every name
    (``_orig_mod.`` / ``module.``): "blocks.1" was an unknown layer, and the rollout of a
    compiled model failed with "ran 0 time(s)". Both spellings work and give the unwrapped
    model's results; the compiled forward itself never runs (no compilation)."""
    factory, size = TIMM_ARCHS["vit"]
    model = factory()
    wrapped = torch.compile(model) if wrapper == "compile" else torch.nn.DataParallel(model)
    prefix = "_orig_mod." if wrapper == "compile" else "module."
    batch = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    normalized = cv.ImageModel(model).normalize(batch)
    expected = hooked(model, "blocks.1", normalized)
    for layer in ("blocks.1", prefix + "blocks.1"):
        torch.testing.assert_close(cv.capture_layers(wrapped, layer, normalized), expected)
        assert cv.resolve_layout(wrapped, layer).grid == (4, 4)
        maps = cv.PatchActivationMap(wrapped, layer).attribute(batch, target=3)
        torch.testing.assert_close(maps, expected[:, 1:, 3].reshape(2, 4, 4))
    top = cv.TopActivatingExamples(wrapped, "blocks.1", k=1).attribute(batch, target=[3])
    assert top.scores.item() == pytest.approx(expected[:, 1:, 3].mean(1).max().item(), abs=1e-5)
    torch.testing.assert_close(
        cv.AttentionRollout(wrapped).attribute(batch), cv.AttentionRollout(model).attribute(batch)
    )
    mask = cv.patch_feature_mask(wrapped, batch)
    torch.testing.assert_close(mask, cv.patch_feature_mask(model, batch))
    assert hooks_left(model) == 0
    assert all(p.requires_grad for p in model.parameters())

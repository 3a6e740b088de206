"""pooling_experiments: known answers (isolation L=0 and tear after the
last block are the natural model), oracles written with the model's own API (attention
masks for isolation, forward_features + head by hand for the patch head), open_clip towers
with a zero-shot head, errors and hygiene."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from archs import TIMM_ARCHS, open_clip_coca_tower, open_clip_timm_trunk, open_clip_tower

import captum_vit as cv

DEPTH = 3


def small_vit(name: str = "vit_tiny_patch16_224", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        name,
        img_size=32,
        patch_size=8,
        depth=DEPTH,
        embed_dim=32,
        num_heads=2,
        num_classes=10,
        **kwargs,
    ).eval()


def normalize(model, x):
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def labelled(logits_fn, count=24, batch=8, seed=0, num_classes=10):
    """Batches of random images; half the labels are the model's own top-1 predictions
    (so accuracies are neither 0 nor 100), half random."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(count, 3, 32, 32, generator=generator)
    with torch.no_grad():
        labels = logits_fn(x).argmax(-1)
    labels[count // 2 :] = torch.randint(0, num_classes, (count - count // 2,), generator=generator)
    return [(x[i : i + batch], labels[i : i + batch]) for i in range(0, count, batch)]


def accuracy(logits, labels):
    """Top-1 / top-5 in percent, written independently of the package."""
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    top1 = (top[:, 0] == labels).double().mean().item() * 100
    top5 = (top == labels[:, None]).any(-1).double().mean().item() * 100
    return top1, top5


def concat(batches):
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


@torch.no_grad()
def isolated_logits(model, x, blocks_isolated):
    """Oracle: the full sequence with an attention mask that separates the prefix from the
    patches in the first L blocks (the package runs them as separate sequences)."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(normalize(model, x))))
    p, n = model.num_prefix_tokens, tokens.shape[1]
    side = torch.arange(n) < p
    mask = side[:, None] == side[None, :]
    for index, block in enumerate(model.blocks):
        tokens = block(tokens, attn_mask=mask) if index < blocks_isolated else block(tokens)
    return model.forward_head(model.norm(tokens))


@torch.no_grad()
def torn_logits(model, x, after):
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(normalize(model, x))))
    for index, block in enumerate(model.blocks):
        if index == after:
            tokens = tokens[:, : model.num_prefix_tokens]
        tokens = block(tokens)
    if after == len(model.blocks):
        tokens = tokens[:, : model.num_prefix_tokens]
    return model.forward_head(model.norm(tokens))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_known_answers_and_oracles(name):
    model = small_vit(name)
    batches = labelled(lambda x: model(normalize(model, x)))
    x, labels = concat(batches)
    report = cv.pooling_experiments(model, batches)
    natural = accuracy(model(normalize(model, x)), labels)
    assert 0 < natural[0] < 100
    assert report.natural == pytest.approx(natural, abs=1e-9)
    assert report.num_images == 24 and report.depth == DEPTH
    assert repr(report) == str(report) and "tensor" not in repr(report)
    assert sorted(report.isolated_cls) == sorted(report.tear) == list(range(DEPTH + 1))
    # Exact known answers: nothing isolated / torn after the last block = natural.
    assert report.isolated_cls[0] == report.natural
    assert report.tear[DEPTH] == report.natural
    for blocks in (1, DEPTH - 1, DEPTH):
        assert report.isolated_cls[blocks] == pytest.approx(
            accuracy(isolated_logits(model, x, blocks), labels), abs=1e-9
        )
    for after in (0, 1, DEPTH - 1):
        assert report.tear[after] == pytest.approx(
            accuracy(torn_logits(model, x, after), labels), abs=1e-9
        )
    # Patch head by hand: final tokens -> the model's own head on each position.
    with torch.no_grad():
        features = model.forward_features(normalize(model, x))
        per_position = []
        for position in range(16):
            token = features[:, model.num_prefix_tokens + position]
            if name.startswith("deit"):
                logits = (model.head(token) + model.head_dist(token)) / 2
            else:
                logits = model.head(model.fc_norm(token))
            per_position.append(accuracy(logits, labels))
    top1 = torch.tensor([a[0] for a in per_position], dtype=torch.float32).view(4, 4)
    top5 = torch.tensor([a[1] for a in per_position], dtype=torch.float32).view(4, 4)
    torch.testing.assert_close(report.patch_accuracy, top1)
    torch.testing.assert_close(report.patch_accuracy_top5, top5)
    assert report.patch_average.top1 == pytest.approx(float(top1.double().mean()))
    assert report.patch_average.top5 == pytest.approx(float(top5.double().mean()))
    assert report.patch_max.top1 == pytest.approx(float(top1.max()))
    row, col = report.patch_max_position
    assert report.patch_accuracy[row, col] == top1.max()
    print(report)


def test_sweep_selection_and_dict_batches():
    model = small_vit()
    batches = labelled(lambda x: model(normalize(model, x)))
    dicts = [{"image": images, "label": labels} for images, labels in batches]
    report = cv.pooling_experiments(model, dicts, isolate=[2], tear=[])
    assert list(report.isolated_cls) == [2] and report.tear == {}
    full = cv.pooling_experiments(model, batches, isolate=2, tear=1)
    assert full.isolated_cls[2] == report.isolated_cls[2] and list(full.tear) == [1]
    # Hugging Face's names (a data collator's batches) read the same images and labels.
    hf = [{"pixel_values": images, "labels": labels} for images, labels in batches]
    same = cv.pooling_experiments(model, hf, isolate=[2], tear=[])
    assert same.natural == full.natural and same.isolated_cls == report.isolated_cls


def test_own_head_replaces_the_classifier():
    model = small_vit()
    torch.manual_seed(1)
    head = torch.nn.Linear(32, 7)
    batches = labelled(
        lambda x: head(model.forward_head(model.forward_features(normalize(model, x)), True)),
        num_classes=7,
    )
    x, labels = concat(batches)
    report = cv.pooling_experiments(model, batches, isolate=[0], tear=[], head=head)
    with torch.no_grad():
        logits = head(model.forward_head(model.forward_features(normalize(model, x)), True))
    assert report.natural == pytest.approx(accuracy(logits, labels), abs=1e-9)
    assert report.isolated_cls[0] == report.natural


@pytest.mark.parametrize("kind", ["tower", "tower_nbc", "timm_trunk"])
def test_open_clip_with_zero_shot_head(kind):
    tower = {
        "tower": open_clip_tower,
        "tower_nbc": lambda: open_clip_tower(batch_first=False),
        "timm_trunk": open_clip_timm_trunk,
    }[kind]()
    torch.manual_seed(2)
    text = F.normalize(torch.randn(6, 16), dim=-1)

    def head(embedding):
        return F.normalize(embedding, dim=-1) @ text.T

    wrapped = cv.ImageModel(tower)
    batches = labelled(lambda x: head(wrapped(x)), num_classes=6)
    x, labels = concat(batches)
    report = cv.pooling_experiments(tower, batches, head=head)
    with torch.no_grad():
        natural = accuracy(head(wrapped(x)), labels)
    assert report.natural == pytest.approx(natural, abs=1e-9)
    assert report.isolated_cls[0] == report.natural == report.tear[2]
    assert report.patch_accuracy.shape == (4, 4)
    with pytest.raises(ValueError, match="head="):
        cv.pooling_experiments(tower, batches)


@pytest.mark.parametrize("name", ["vit_avg", "vit_map", "swin", "cait", "convit", "pit", "resnet"])
def test_undefined_architectures_raise(name):
    model = TIMM_ARCHS[name][0]()
    with pytest.raises(ValueError, match="cls|token|pool|undefined"):
        cv.pooling_experiments(model, [])


def test_open_clip_attention_pooler_is_refused_with_the_reason():
    """A CoCa-style tower has pool_type 'tok' and an attention pooler: the message said
    it "pools with 'tok'" and needs "'tok' pooling"."""
    tower = open_clip_coca_tower()
    with pytest.raises(ValueError, match="pools through an attention pooler"):
        cv.pooling_experiments(tower, [], head=lambda e: e)


def test_bad_arguments_and_hygiene():
    # Heavy dropout and drop-path: in train mode every run would differ.
    model = small_vit(drop_rate=0.5, proj_drop_rate=0.5, drop_path_rate=0.5).train()
    model.head.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    batches = labelled(lambda x: model.eval()(normalize(model, x)))
    x, labels = concat(batches)
    with torch.no_grad():
        natural = accuracy(model.eval()(normalize(model, x)), labels)
    model.train()
    with pytest.raises(ValueError, match="out of range"):
        cv.pooling_experiments(model, batches, isolate=[DEPTH + 1])
    with pytest.raises(TypeError, match="ints"):
        cv.pooling_experiments(model, batches, tear=[1.5])
    with pytest.raises(TypeError, match="labels"):
        cv.pooling_experiments(model, [torch.rand(2, 3, 32, 32)])
    with pytest.raises(ValueError, match="class indices"):
        cv.pooling_experiments(model, [(torch.rand(2, 3, 32, 32), torch.tensor([0, 10]))])
    with pytest.raises(ValueError, match="no images"):
        cv.pooling_experiments(model, [])
    with pytest.raises(ValueError, match="32x32"):
        cv.pooling_experiments(model, [(torch.rand(2, 3, 48, 48), torch.tensor([0, 1]))])
    report = cv.pooling_experiments(model, batches, isolate=[0], tear=[DEPTH])
    assert report.natural == pytest.approx(natural, abs=1e-9)
    assert report.isolated_cls[0] == report.tear[DEPTH] == report.natural
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_zoo_vit_table1_numbers():
    from captum_vit import zoo

    if not (zoo.WEIGHTS_DIR / "vit.safetensors").is_file():
        pytest.skip("the bundled zoo ViT weights are not trained yet")
    model = zoo.load_model("vit")
    depth = len(model.blocks)
    data = zoo.SyntheticScenes(128, seed=4242)
    report = cv.pooling_experiments(
        model, data.batches(64), isolate=[0, depth - 1, depth], tear=[depth - 2, depth - 1, depth]
    )
    print(f"zoo ViT, {report.num_images} held-out SyntheticScenes images:\n{report}")
    chance = 100 / len(model.class_names)
    assert report.natural.top1 > 2 * chance
    assert report.isolated_cls[0] == report.natural == report.tear[depth]
    assert 0 <= report.patch_average.top1 <= report.patch_max.top1 <= 100


def test_deprecated_probe_method_warns_and_gives_the_same_report():
    model = small_vit()
    batches = labelled(lambda x: model(normalize(model, x)), count=8)
    expected = cv.pooling_experiments(model, batches, isolate=[1], tear=[2])
    with pytest.warns(DeprecationWarning, match="pooling_experiments"):
        old = cv.SpatialLocalityProbe(model).accuracy_experiments(batches, isolate=1, tear=2)
    for field in ("natural", "isolated_cls", "patch_average", "patch_max", "tear"):
        assert getattr(old, field) == getattr(expected, field)
    torch.testing.assert_close(old.patch_accuracy, expected.patch_accuracy, rtol=0, atol=0)


def test_the_last_block_layout_defines_the_prefix():
    """Registers: 1 cls + 4 register tokens, all measured by the layout, all kept by the
    tear sweep and isolated with cls (oracle: the attention mask of isolated_logits)."""
    model = small_vit("vit_tiny_patch16_224", reg_tokens=4)
    assert model.num_prefix_tokens == 5
    batches = labelled(lambda x: model(normalize(model, x)), count=16)
    x, labels = concat(batches)
    report = cv.pooling_experiments(model, batches, isolate=[2], tear=[1])
    assert report.isolated_cls[2] == pytest.approx(
        accuracy(isolated_logits(model, x, 2), labels), abs=1e-9
    )
    assert report.tear[1] == pytest.approx(accuracy(torn_logits(model, x, 1), labels), abs=1e-9)
    assert report.patch_accuracy.shape == (4, 4)


def timm_twin_of_torchvision(tv) -> torch.nn.Module:
    """A timm VisionTransformer holding a torchvision ViT's weights (same computation)."""
    twin = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=tv.image_size,
        patch_size=tv.patch_size,
        depth=len(tv.encoder.layers),
        embed_dim=tv.hidden_dim,
        num_heads=tv.encoder.layers[0].num_heads,
        mlp_ratio=tv.mlp_dim / tv.hidden_dim,
        num_classes=tv.num_classes,
    ).eval()
    state = {
        "cls_token": tv.class_token,
        "pos_embed": tv.encoder.pos_embedding,
        "patch_embed.proj.weight": tv.conv_proj.weight,
        "patch_embed.proj.bias": tv.conv_proj.bias,
        "norm.weight": tv.encoder.ln.weight,
        "norm.bias": tv.encoder.ln.bias,
        "head.weight": tv.heads.head.weight,
        "head.bias": tv.heads.head.bias,
    }
    for i, layer in enumerate(tv.encoder.layers):
        attn = layer.self_attention
        for ours, theirs in [
            ("norm1", layer.ln_1),
            ("norm2", layer.ln_2),
            ("mlp.fc1", layer.mlp[0]),
            ("mlp.fc2", layer.mlp[3]),
            ("attn.proj", attn.out_proj),
        ]:
            state[f"blocks.{i}.{ours}.weight"] = theirs.weight
            state[f"blocks.{i}.{ours}.bias"] = theirs.bias
        state[f"blocks.{i}.attn.qkv.weight"] = attn.in_proj_weight
        state[f"blocks.{i}.attn.qkv.bias"] = attn.in_proj_bias
    twin.load_state_dict(state)
    return twin


def test_torchvision_vit_gives_the_report_of_its_timm_twin():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    tv = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=DEPTH,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=10,
    ).eval()
    with torch.no_grad():  # torchvision starts the head and the class token at zero
        torch.nn.init.normal_(tv.heads.head.weight, std=0.5)
        torch.nn.init.normal_(tv.class_token, std=0.5)
    twin = timm_twin_of_torchvision(tv)
    imagenet = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    wrapped = cv.ImageModel(twin, **imagenet)
    batches = labelled(lambda x: wrapped(x))
    x, _ = concat(batches)
    with torch.no_grad():  # the twin computes what torchvision does
        torch.testing.assert_close(twin(wrapped.normalize(x)), tv(wrapped.normalize(x)))
    report = cv.pooling_experiments(tv, batches)  # ImageNet normalization by default
    expected = cv.pooling_experiments(twin, batches, **imagenet)
    assert 0 < report.natural.top1 < 100
    assert report.natural == expected.natural
    for sweep in ("isolated_cls", "tear"):
        ours, theirs = getattr(report, sweep), getattr(expected, sweep)
        assert ours.keys() == theirs.keys()
        for blocks in ours:
            assert tuple(ours[blocks]) == pytest.approx(tuple(theirs[blocks]), abs=1e-9)
    assert report.tear[0] != report.natural  # the sweeps see the patches' effect
    assert report.patch_accuracy.unique().numel() > 1
    torch.testing.assert_close(report.patch_accuracy, expected.patch_accuracy)
    # a head of one's own gets the final norm's class token
    probe = torch.nn.Linear(32, 3)
    labels3 = [(images, labels % 3) for images, labels in batches]
    own = cv.pooling_experiments(tv, labels3, head=probe, isolate=[], tear=[])
    assert (
        own.natural
        == cv.pooling_experiments(
            twin, labels3, head=probe, isolate=[], tear=[], **imagenet
        ).natural
    )

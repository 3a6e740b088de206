"""The bundled zoo: synthetic data, the trained models, the training script, and the paper's
foreground / background and frequency experiments (checked against hand-written oracles)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from captum_vit.models import input_config
from captum_vit.zoo import (
    BACKGROUNDS,
    CLASSES,
    SyntheticScenes,
    fft_filter,
    foreground_background,
    frequency_sensitivity,
    load_model,
)
from captum_vit.zoo.registry import WEIGHTS_DIR, build_model, read_metadata
from captum_vit.zoo.train import TrainConfig, mimetic_attention_init
from captum_vit.zoo.train import main as train_main

HELD_OUT_SEED = 1  # training uses seed 0


@pytest.fixture(scope="module")
def models():
    return {name: load_model(name) for name in ("vit", "cnn")}


@pytest.fixture(scope="module")
def held_out():
    return SyntheticScenes(300, seed=HELD_OUT_SEED)


def _manual_logits(model, images):
    """Oracle forward: normalization written out from the stored config."""
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((images - mean) / std)


# ---- data -------------------------------------------------------------------------------
def test_items_are_deterministic_and_match_batches():
    data = SyntheticScenes(50, seed=3)
    again = SyntheticScenes(50, seed=3)
    other = SyntheticScenes(50, seed=4)
    batch = data.batch([7, 2, 40])
    for row, index in enumerate([7, 2, 40]):
        item, twin = data[index], again[index]
        assert torch.equal(item["image"], twin["image"])
        assert torch.equal(item["image"], batch["image"][row])
        assert torch.equal(item["mask"], batch["mask"][row])
        assert item["label"] == int(batch["label"][row])
        assert not torch.equal(item["image"], other[index]["image"])
    assert data[-1]["label"] == data[49]["label"]
    with pytest.raises(IndexError):
        data[50]


def test_scenes_refuse_indices_and_sizes_they_cannot_honour():
    data = SyntheticScenes(8, seed=1)
    # batch() drew any index, in range or not: item 100 of an 8-item dataset.
    with pytest.raises(IndexError, match="index 100 out of range for 8 items"):
        data.batch([3, 100])
    assert torch.equal(data.batch([-1])["image"], data.batch([7])["image"])
    assert data.batch(torch.tensor([1, 2]))["label"].tolist() == [
        data[1]["label"],
        data[2]["label"],
    ]
    with pytest.raises(TypeError, match=r"batch\(range\(1, 3, 1\)\) for this slice"):
        data[1:3]
    with pytest.raises(TypeError, match="an index must be an int, got float"):
        data[1.0]
    with pytest.raises(ValueError, match=r"batch_size must be a positive int \(.*\), got 0"):
        next(data.batches(0))
    assert len(list(data.batches(np.int64(4)))) == 2  # numpy integers count too
    with pytest.raises(TypeError, match="length must be an int, got 2.5"):
        SyntheticScenes(2.5)
    assert repr(data) == "SyntheticScenes(8, seed=1)"
    small = SyntheticScenes(4, image_size=32, background_bias=0.0, num_classes=3)
    assert repr(small) == (
        "SyntheticScenes(4, seed=0, image_size=32, background_bias=0.0, num_classes=3)"
    )


def test_item_contents_are_consistent():
    data = SyntheticScenes(64, seed=5)
    batch = data.batch(range(64))
    images, masks = batch["image"], batch["mask"]
    assert images.shape == (64, 3, 64, 64) and masks.shape == (64, 1, 64, 64)
    assert images.dtype == torch.float32 and 0.0 <= images.min() and images.max() <= 1.0
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    area = masks.sum((1, 2, 3))
    assert (area > 40).all() and (area < 64 * 64 / 2).all()
    # The foreground is painted in one flat colour: every mask pixel has the same RGB.
    for image, mask in zip(images, masks, strict=True):
        pixels = image[:, mask[0] > 0]
        assert (pixels - pixels[:, :1]).abs().max() < 1e-6
    assert set(batch["label"].tolist()) == set(range(len(CLASSES)))
    assert set(batch["background"].tolist()) <= set(range(len(BACKGROUNDS)))


def test_shapes_are_what_the_labels_say():
    """Planted geometry: rings and frames have a hole at their centre, circles and squares
    do not, and a circle fills about pi/4 of its bounding box."""
    data = SyntheticScenes(400, seed=6)
    batch = data.batch(range(400))
    for label, mask in zip(batch["label"].tolist(), batch["mask"][:, 0], strict=True):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        cy, cx = int(ys.float().mean().round()), int(xs.float().mean().round())
        name = CLASSES[label]
        if name in ("ring", "frame"):
            assert mask[cy, cx] == 0, name
        if name in ("circle", "square", "cross"):
            assert mask[cy, cx] == 1, name
        if name == "circle":
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            assert abs(mask.sum() / box - math.pi / 4) < 0.06


@pytest.mark.parametrize("bias, expected", [(1.0, 1.0), (0.0, 1 / 8), (0.5, 0.5 + 0.5 / 8)])
def test_background_bias_knob(bias, expected):
    data = SyntheticScenes(2000, seed=7, background_bias=bias)
    own = np.mean([p["label"] == p["background"] for p in map(data._params, range(2000))])
    assert abs(own - expected) < 0.04


def test_fft_filter_against_sinusoids():
    size = 64
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    # 8 cycles across 64 px = 0.125 cycles/px = 0.25 of the Nyquist frequency.
    wave = 0.5 + 0.3 * torch.cos(2 * math.pi * 8 * x / size)
    image = wave.expand(1, 3, size, size).clone()
    assert torch.allclose(fft_filter(image, 0.3, "low"), image, atol=1e-5)
    assert torch.allclose(fft_filter(image, 0.2, "low"), torch.full_like(image, 0.5), atol=1e-5)
    assert torch.allclose(fft_filter(image, 0.2, "high"), image, atol=1e-5)
    assert torch.allclose(fft_filter(image, 0.3, "high"), torch.full_like(image, 0.5), atol=1e-5)
    # Low + high - mean gives the image back (no clamping in this range).
    noise = 0.5 + 0.05 * torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    mean = noise.mean((-2, -1), keepdim=True)
    total = fft_filter(noise, 0.4, "low") + fft_filter(noise, 0.4, "high") - mean
    assert torch.allclose(total, noise, atol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        fft_filter(image, 0.3, "band")
    with pytest.raises(ValueError, match="Nyquist"):
        fft_filter(image, 0.0, "low")


def test_filter_knob_filters_the_items():
    plain = SyntheticScenes(4, seed=8)
    low = SyntheticScenes(4, seed=8, filter=("low", 0.2))
    assert torch.allclose(low[2]["image"], fft_filter(plain[2]["image"], 0.2, "low"))
    assert torch.equal(low[2]["mask"], plain[2]["mask"])
    with pytest.raises(ValueError):
        SyntheticScenes(4, filter=("low", 2.0))
    with pytest.raises(ValueError, match="background_bias"):
        SyntheticScenes(4, background_bias=1.5)


# ---- bundled models ----------------------------------------------------------------------
def _held_out_accuracy(model, held_out) -> float:
    batch = held_out.batch(range(len(held_out)))
    return (_manual_logits(model, batch["image"]).argmax(1) == batch["label"]).float().mean()


def test_bundled_models_load_offline_and_match_their_record(models, held_out):
    for name, model in models.items():
        assert not model.training
        assert model.class_names == list(CLASSES)
        cfg = input_config(model)
        assert cfg.size == (64, 64) and cfg.mean == (0.5, 0.5, 0.5)
        info = model.zoo_info
        assert info["config"]["seed"] == 0 and info["config"]["eval_seed"] == HELD_OUT_SEED
        # 300 fresh held-out images agree with the 2000-image accuracy the script recorded.
        recorded = info["held_out_top1"] / 100
        assert abs(_held_out_accuracy(model, held_out) - recorded) < 0.06, name
    with pytest.raises(ValueError, match="unknown zoo model"):
        load_model("resnet50")


def test_bundled_cnn_reaches_90_percent(models, held_out):
    assert _held_out_accuracy(models["cnn"], held_out) >= 0.90


def test_bundled_vit_reaches_95_percent_on_the_held_out_protocol(models):
    """The model card's protocol: 2000 images of the held-out seed. The bundled weights are
    the one-command model (96.40% recorded by the training script); the goal is 95%."""
    accuracy = _held_out_accuracy(models["vit"], SyntheticScenes(2000, seed=HELD_OUT_SEED))
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(models["vit"].zoo_info["held_out_top1"] / 100, abs=0.005)


def test_training_script_quick_mode_gives_a_loadable_model(tmp_path):
    out = tmp_path / "cnn.safetensors"
    assert train_main(["cnn", "--quick", "--out", str(out), "--threads", "1"]) == 0
    meta = read_metadata(out)
    assert meta["info"]["config"]["steps"] == 3
    assert meta["info"]["command"].startswith("python -m captum_vit.zoo.train cnn --quick")
    model = load_model("cnn", out)
    assert not model.training and model.class_names == list(CLASSES)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, len(CLASSES))
    # The quick run really trained: its weights differ from the bundled ones and from init.
    bundled = load_model("cnn")
    assert not torch.equal(model.fc.weight, bundled.fc.weight)
    with pytest.raises(ValueError, match="holds zoo model"):
        load_model("vit", out)
    # Training on the held-out seed would report a training accuracy as held out.
    with pytest.raises(ValueError, match="held-out images would be training images"):
        TrainConfig(steps=1, seed=1)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--seed", "1"], "held-out images would be training images"),
        (["--steps", "0"], r"steps must be a positive int \(optimizer steps\), got 0"),
        (["--batch-size", "0"], r"batch_size must be a positive int \(scenes per step\), got 0"),
        (["--lr", "-1"], "lr must be a positive number, got -1.0"),
        (["--patch-drop", "1"], r"patch_drop must be in \[0, 1\), got 1.0"),
        (["--out", "{file}/x.safetensors"], "is a file, not a folder"),
        (["--out", "{folder}"], "is a folder: name the weights file"),
    ],
)
def test_training_command_refuses_bad_settings_before_training(tmp_path, capsys, flags, message):
    """Before, --steps 0 "trained" an untrained model and saved it over the bundled
    weights; the others failed with a traceback (some after training)."""
    (tmp_path / "file").write_text("not a folder")
    flags = [f.format(file=tmp_path / "file", folder=tmp_path) for f in flags]
    out = ["--out", str(tmp_path / "w.safetensors")] if "--out" not in flags else []
    before = sorted(p.name for p in tmp_path.iterdir())
    assert train_main(["cnn", "--quick", *out, *flags, "--threads", "1"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_quick_training_does_not_replace_the_bundled_weights(tmp_path, monkeypatch, capsys):
    import captum_vit.zoo.train as train_module

    bundled = (WEIGHTS_DIR / "cnn.safetensors").read_bytes()
    (tmp_path / "cnn.safetensors").write_bytes(bundled)  # a copy: a regression harms no file
    monkeypatch.setattr(train_module, "WEIGHTS_DIR", tmp_path)
    assert train_main(["cnn", "--quick", "--threads", "1"]) == 2
    assert "--quick would replace the bundled weights" in capsys.readouterr().err
    assert (tmp_path / "cnn.safetensors").read_bytes() == bundled


def test_vit_training_command_quick_mode_records_its_cost(tmp_path):
    out = tmp_path / "vit.safetensors"
    args = ["vit", "--quick", "--attention-init", "mimetic", "--label-smoothing", "0.1"]
    args += ["--seed", "1", "--eval-seed", "2"]
    assert train_main([*args, "--out", str(out), "--threads", "1"]) == 0
    info = read_metadata(out)["info"]
    assert info["config"]["steps"] == 3 and info["config"]["attention_init"] == "mimetic"
    assert (info["config"]["seed"], info["config"]["eval_seed"]) == (1, 2)
    assert info["config"]["label_smoothing"] == 0.1
    assert info["cpu_seconds"] > 0 and info["threads"] == 1
    assert set(info["load_average_1min"]) == {"mean", "min", "max"}
    model = load_model("vit", out)
    assert model.state_dict().keys() == build_model("vit").state_dict().keys()


def test_mimetic_attention_init_plants_the_products_it_promises():
    """Oracle: the products of the planted factors, recomputed from the weights, against
    the truncated SVD of the same ``alpha * Z + beta * I`` drawn from the same generator."""
    model = build_model("vit")
    names = [n for n, _ in model.named_parameters()]
    assert mimetic_attention_init(model, torch.Generator().manual_seed(3)) == 6
    assert [n for n, _ in model.named_parameters()] == names  # architecture unchanged
    generator, width, head_dim = torch.Generator().manual_seed(3), 128, 32
    attn = model.blocks[0].attn
    weight = attn.qkv.weight.detach()
    for h in range(4):
        noise = torch.randn(width, width, generator=generator) / math.sqrt(width)
        u, s, vh = torch.linalg.svd(0.7 * noise + 0.7 * torch.eye(width))
        expected = u[:, :head_dim] @ torch.diag(s[:head_dim]) @ vh[:head_dim]
        w_q = weight[h * head_dim : (h + 1) * head_dim].T
        w_k = weight[width + h * head_dim : width + (h + 1) * head_dim].T
        torch.testing.assert_close(w_q @ w_k.T, expected, atol=1e-4, rtol=1e-4)
    noise = torch.randn(width, width, generator=generator) / math.sqrt(width)
    value_proj = weight[2 * width :].T @ attn.proj.weight.detach().T  # x -> v -> proj
    torch.testing.assert_close(
        value_proj, 0.4 * noise - 0.4 * torch.eye(width), atol=1e-4, rtol=1e-4
    )


# ---- experiments ---------------------------------------------------------------------------
def _oracle_foreground_background(model, data):
    """Brute force: per image, cut the mask's bounding box with index slicing."""
    hits = np.zeros((3, 2))
    for index in range(len(data)):
        item = data[index]
        image, mask = item["image"], item["mask"][0]
        ys, xs = np.nonzero(mask.numpy())
        fg = torch.zeros_like(image)
        box = (slice(None), slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        fg[box] = image[box]
        bg = image.clone()
        bg[box] = 0
        logits = _manual_logits(model, torch.stack([image, fg, bg]))
        top5 = logits.topk(5, dim=1).indices
        hits[:, 0] += (top5[:, 0] == item["label"]).numpy()
        hits[:, 1] += (top5 == item["label"]).any(1).numpy()
    return 100 * hits / len(data)


def test_foreground_background_matches_oracle_on_both_models(models):
    data = SyntheticScenes(60, seed=HELD_OUT_SEED + 10)
    for model in models.values():
        expected = _oracle_foreground_background(model.eval(), data)
        model.train()  # the function must evaluate in eval mode and restore this
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        try:
            result = foreground_background(model, data, batch_size=25)
        finally:
            training = model.training
            model.eval()
        got = np.array(
            [
                [result.full_top1, result.full_top5],
                [result.foreground_top1, result.foreground_top5],
                [result.background_top1, result.background_top5],
            ]
        )
        np.testing.assert_allclose(got, expected, atol=1e-9)
        assert result.num_images == 60 and result.region == "box"
        assert result.normalized_foreground == pytest.approx(
            100 * result.foreground_top5 / result.full_top5
        )
        # Left as found: train mode and requires_grad flags, no hooks.
        assert training
        assert grads == {n: p.requires_grad for n, p in model.named_parameters()}
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_foreground_background_on_bundled_models_reads_the_scene(models, held_out):
    """Both models rely on the object more than on the background (box cut, as the paper);
    with the exact mask cut, the black silhouette left in a background-only image still
    carries the shape, which is why the paper's boxes (our default) are the fair cut."""
    for name, model in models.items():
        box = foreground_background(model, held_out, batch_size=150)
        assert box.foreground_top1 > box.background_top1 + 10, name
        mask = foreground_background(model, held_out, region="mask", batch_size=150)
        assert mask.full_top1 == box.full_top1
        assert mask.background_top1 > box.background_top1 + 10, name


def test_foreground_background_accepts_tuples_and_rejects_bad_data(models):
    model = models["cnn"]
    batch = SyntheticScenes(20, seed=9).batch(range(20))
    as_dict = foreground_background(model, [batch], region="mask")
    as_tuple = foreground_background(
        model, [(batch["image"], batch["label"], batch["mask"])], region="mask"
    )
    assert as_dict == as_tuple
    with pytest.raises(ValueError, match="masks"):
        foreground_background(model, [(batch["image"], batch["label"])])
    with pytest.raises(ValueError, match="region"):
        foreground_background(model, [batch], region="outline")
    with pytest.raises(ValueError, match="do not match"):
        foreground_background(model, [(batch["image"], batch["label"], batch["mask"][:3])])
    # A bare tensor was read as a stream of single images, and the error said to pass
    # the tensor itself.
    with pytest.raises(TypeError, match="needs labels and foreground masks, which a tensor"):
        foreground_background(model, batch["image"])
    with pytest.raises(TypeError, match=r"needs labels, which a tensor .* \(images, labels\)$"):
        frequency_sensitivity(model, batch["image"])


def test_frequency_sensitivity_matches_oracle_on_both_models(models):
    data = SyntheticScenes(50, seed=HELD_OUT_SEED + 20)
    batch = data.batch(range(50))
    cutoffs = (0.1, 0.5, 1.0)
    for name, model in models.items():
        result = frequency_sensitivity(model, data, cutoffs, batch_size=20)
        assert result.cutoffs == cutoffs and result.num_images == 50

        def acc(images, model=model):
            return (
                100
                * (_manual_logits(model, images).argmax(1) == batch["label"]).float().mean().item()
            )

        assert result.clean_top1 == pytest.approx(acc(batch["image"]))
        for i, c in enumerate(cutoffs):
            # Oracle filter written with numpy's FFT and an explicit radial mask.
            spectrum = np.fft.fft2(batch["image"].numpy())
            f = np.fft.fftfreq(64) / 0.5
            radius = np.hypot(f[:, None], f[None, :])
            low = np.fft.ifft2(spectrum * (radius <= c)).real.clip(0, 1)
            high_mask = radius > c
            high_mask[0, 0] = True
            high = np.fft.ifft2(spectrum * high_mask).real.clip(0, 1)
            assert result.low_pass_top1[i] == pytest.approx(
                acc(torch.tensor(low, dtype=torch.float32)), abs=2.0
            ), name
            assert result.high_pass_top1[i] == pytest.approx(
                acc(torch.tensor(high, dtype=torch.float32)), abs=2.0
            ), name
        # Cut-off 1.0 keeps the whole disc of frequencies up to Nyquist: almost the clean image.
        assert abs(result.low_pass_top1[-1] - result.clean_top1) <= 6
    with pytest.raises(ValueError, match="Nyquist"):
        frequency_sensitivity(models["cnn"], data, cutoffs=(0.0,))


def test_patch_dropout_drops_tokens_for_the_first_part_of_training_only():
    from captum_vit.zoo.train import QUICK, _run_steps

    model = build_model("vit")
    original = model.patch_drop
    tokens = []
    model.blocks[0].register_forward_hook(lambda m, a, o: tokens.append(o.shape[1]))
    settings = {**QUICK, "steps": 4, "eval_images": 4, "log_every": 100}
    cfg = TrainConfig(**settings, patch_drop=0.5, patch_drop_until=0.5)
    _run_steps(model, cfg, 0, log=lambda line: None)
    model.blocks[0]._forward_hooks.clear()
    # steps 1-2 drop half of the 64 patch tokens (cls kept), steps 3-4 and the
    # held-out evaluation after the last step see all 1 + 64
    assert tokens == [1 + 32, 1 + 32, 65, 65, 65]
    assert model.patch_drop is original
    with pytest.raises(ValueError, match="no patch_drop"):
        _run_steps(build_model("cnn"), cfg, 0, log=lambda line: None)

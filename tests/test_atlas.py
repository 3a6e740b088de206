"""The atlas: its pages in a real browser (headless Chromium), its statistics against an
independent capture, image folders, and incremental runs."""

from __future__ import annotations

import io
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import Browser, chromium_path
from PIL import Image
from skimage import data as photos

from captum_vit import capture_layers, zoo
from captum_vit.atlas import ImageFiles, build_atlas, default_layers, load_model
from captum_vit.atlas.scan import LayerScan
from captum_vit.atlas.units import select_units

LAYERS = ["blocks.1.mlp.act", "blocks.4.mlp.act"]


def _photo_folder(root: Path) -> Path:
    """An ImageFolder tree of 12 photos (two classes, JPEG / PNG, one grey) and one
    unreadable file."""
    pictures = [photos.astronaut(), photos.coffee(), photos.chelsea(), photos.rocket()]
    for number in range(12):
        picture = pictures[number % 4]
        picture = picture[:, ::-1] if number // 4 == 1 else picture
        picture = picture[number * 9 :, number * 5 :] if number // 4 == 2 else picture
        folder = root / ("cats" if number % 2 else "things")
        folder.mkdir(parents=True, exist_ok=True)
        suffix = ".png" if number % 3 else ".jpg"
        Image.fromarray(np.ascontiguousarray(picture)).save(folder / f"photo{number:02d}{suffix}")
    Image.fromarray(photos.camera()).save(root / "things" / "grey.png")
    (root / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for these builds: the results do not depend on it, and on a shared
    machine it avoids threads spinning against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def atlas(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("atlas")
    folder = _photo_folder(root / "photos")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        index = build_atlas(
            load_model(zoo_name="vit"),
            folder,
            root / "site",
            layers=LAYERS,
            units=2,
            k=3,
            steps=3,
            batch_size=8,
            fv_batch=2,
            show_progress=False,
        )
    return index


def test_atlas_files_and_manifest(atlas):
    site = atlas.parent
    manifest = json.loads((site / "atlas.json").read_text())
    assert list(manifest["layers"]) == LAYERS
    for layer in LAYERS:
        units = manifest["layers"][layer]["units"]
        assert len(units) == 2
        for unit in units:
            record = json.loads((site / f"layers/{layer}/unit_{unit:04d}/unit.json").read_text())
            assert len(record["top"]) == 3 and record["num_images"] == 13
            assert sum(record["histogram"]["counts"]) == 13
            assert record["prefix_names"] == ["cls"]
    assert "1 unreadable file(s) skipped" in atlas.read_text()
    # "cats" and "things" are no zoo classes: Table 1 says so instead of mislabelling
    reason = json.loads((site / "data/model.json").read_text())["pooling"]["skipped"]
    assert "&#x27;cats&#x27;, &#x27;things&#x27;" in atlas.read_text() and "'cats'" in reason
    assert not (site / ".work").exists()


def test_scan_statistics_match_an_independent_capture():
    model = zoo.load_model("vit")
    scenes = zoo.SyntheticScenes(10, seed=3)
    from captum_vit.atlas import ZooScenes
    from captum_vit.atlas.scan import scan_layers
    from captum_vit.atlas.shard import Shard

    source = ZooScenes(10, seed=3)
    scans = scan_layers(model, LAYERS, source, k=4, batch_size=4, shard=Shard())
    assert list(scans) == LAYERS
    images = scenes.batch(range(len(scenes)))["image"]
    normalized = (images - 0.5) / 0.25  # the zoo's normalization
    for layer, scan in scans.items():
        tokens = capture_layers(model, layer, normalized)  # (B, 1 + 64, C)
        torch.testing.assert_close(scan.means, tokens[:, 1:].mean(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scan.prefix[:, 0], tokens[:, 0], atol=1e-5, rtol=1e-5)
        best = scan.means.topk(4, dim=0)
        torch.testing.assert_close(scan.examples.scores, best.values.t())
        assert scan.examples.layer == layer
    scan = scans[LAYERS[0]]
    best = scan.means.topk(4, dim=0)
    assert select_units(scan, 3) == sorted(best.values[0].topk(3).indices.tolist())
    assert select_units(scan, [5, 1, 5]) == [1, 5]
    with pytest.raises(ValueError, match="does not exist in layer"):
        select_units(scan, [10_000])
    copy = LayerScan.from_file(io.BytesIO(scan.to_bytes()))
    assert torch.equal(copy.means, scan.means) and copy.grid == (8, 8)


def test_image_files_prepare_like_the_model_and_skip_unreadable_files(tmp_path):
    # a 40x80 image: left half red, right half blue, a green column at the centre
    array = np.zeros((40, 80, 3), np.uint8)
    array[:, :40, 0] = 255
    array[:, 40:, 2] = 255
    array[:, 38:42] = (0, 255, 0)
    (tmp_path / "sub").mkdir()
    Image.fromarray(array).save(tmp_path / "wide.png")
    (tmp_path / "sub" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="skipped 1 unreadable file"):
        files = ImageFiles(tmp_path, (20, 20))
    assert files.skipped == ["sub/notes.txt"] and len(files) == 1 and files.class_names is None
    image = files.batch([0])["image"][0]
    # shorter side 40 -> 20, so the width 80 -> 40, centre crop 20: columns 10..29 of 40
    assert image.shape == (3, 20, 20)
    assert image[1, :, 9:11].mean() > 0.5  # the green centre column stays in the middle
    assert image[0, :, :5].mean() > 0.9 and image[2, :, -5:].mean() > 0.9
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no readable image"):
        ImageFiles(empty, (20, 20))


def test_adding_units_and_layers_keeps_finished_units(atlas, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(atlas.parent, site)
    before = {p: p.stat().st_mtime_ns for p in site.glob("layers/*/unit_*/unit.json")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_atlas(
            load_model(zoo_name="vit"),
            atlas.parent.parent / "photos",
            site,
            layers=[*LAYERS, "blocks.5.mlp.act"],
            units=3,
            k=3,
            steps=3,
            batch_size=8,
            fv_batch=2,
            show_progress=False,
        )
    manifest = json.loads((site / "atlas.json").read_text())
    assert [len(info["units"]) for info in manifest["layers"].values()] == [3, 3, 3]
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in before.items())
    assert len(list(site.glob("layers/*/unit_*/unit.json"))) == 9
    with pytest.raises(ValueError, match="other settings"):
        build_atlas(zoo.load_model("vit"), None, site, layers=LAYERS, show_progress=False)


# --------------------------------------------------------------------------- browser

_SMALLEST_TEXT = """(() => {
  const sizes = [];
  for (const e of document.querySelectorAll('body *')) {
    const text = [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
    const box = e.getBoundingClientRect();
    if (text && box.width > 0) sizes.push(parseFloat(getComputedStyle(e).fontSize));
  }
  return Math.min(...sizes);
})()"""


def _not_blank(png: Path) -> bool:
    with Image.open(png) as picture:
        pixels = np.asarray(picture.convert("RGB"), dtype=np.float32)
    return pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200


@pytest.mark.skipif(
    chromium_path() is None, reason="chromium is not installed (apt-get install chromium)"
)
def test_pages_in_headless_chromium(atlas, tmp_path):
    site = atlas.parent
    manifest = json.loads((site / "atlas.json").read_text())
    layer = LAYERS[1]
    unit = manifest["layers"][layer]["units"][0]
    pages = [
        atlas,
        site / "layers" / layer / "index.html",
        site / f"layers/{layer}/unit_{unit:04d}.html",
    ]
    with Browser() as browser:
        for number, page in enumerate(pages):
            browser.open(page)
            assert browser.errors() == [], page
            widths = browser.evaluate("[...document.images].map(i => i.complete && i.naturalWidth)")
            assert all(width and width > 0 for width in widths), (page, widths)
            assert browser.evaluate(_SMALLEST_TEXT) >= 12, page
            assert _not_blank(browser.screenshot(tmp_path / f"{number}_{page.stem}.png")), page
        assert len(widths) == 1 + 2 * 3  # the unit page: visualization, 3 images + 3 maps
        assert browser.evaluate("document.querySelectorAll('svg text').length") >= 5
        browser.open(atlas)
        other = manifest["layers"][LAYERS[0]]["units"][-1]
        browser.events.clear()
        browser.evaluate(
            f"document.getElementById('unit-search').value = '0:{other}';"
            "document.querySelector('#search button').click()"
        )
        browser.wait_for("Page.loadEventFired")  # the unit page, found by the search box
        assert browser.evaluate("location.href").endswith(f"{LAYERS[0]}/unit_{other:04d}.html")
        browser.open(atlas)
        browser.evaluate(
            "document.getElementById('unit-search').value = '0:99999';"
            "document.querySelector('#search button').click()"
        )
        assert "not in this atlas" in browser.evaluate(
            "document.getElementById('search-result').textContent"
        )


def small_vit() -> torch.nn.Module:
    """A model named as ``module:function`` (this test module)."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)


def test_models_named_as_module_function():
    loaded = load_model("test_atlas:small_vit")
    assert loaded.description == "test_atlas:small_vit" and not loaded.model.training
    assert default_layers(loaded.model) == ["blocks.0.mlp.act", "blocks.1.mlp.act"]
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_model("test_atlas:nope")
    with pytest.raises(ValueError, match="cannot import"):
        load_model("no_such_module_xyz:build")


def small_cnn() -> torch.nn.Module:
    """A torchvision CNN named as ``module:function``: it records no input size."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4)


def test_cli_image_size_for_a_model_that_records_none(tmp_path, capsys):
    from captum_vit.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(photos, name)()).save(folder / f"{name}.png")
    out = tmp_path / "atlas"
    args = ["atlas", "test_atlas:small_cnn", "--images", str(folder), "--out", str(out)]
    args += ["--layers", "layer3", "--units", "top:1", "--k", "1", "--steps", "1"]
    assert main(args) == 2
    assert "pass image_size=(H, W) (on the command line: --image-size)" in capsys.readouterr().err
    assert not out.exists()
    assert main([*args, "--image-size", "40x48"]) == 0
    shown = json.loads((out / "atlas.json").read_text())["layers"]["layer3"]
    model = small_cnn().eval()
    expected = capture_layers(model, "layer3", torch.rand(1, 3, 40, 48)).shape  # (1, C, h, w)
    assert shown["grid"] == list(expected[-2:]) and shown["channels"] == expected[1]


def test_a_position_bias_mlp_is_no_default_layer_and_is_refused_with_the_reason():
    """Swin-V2-CR's attention computes its relative position bias with an MLP
    ('attn.meta_mlp.act', one row per token pair, not per image): it was taken for a
    block's MLP by its name, and a feature visualization of it died in an einsum."""
    import timm

    import captum_vit as cv

    model = timm.create_model(
        "swinv2_cr_tiny_224",
        img_size=32,
        window_size=4,
        depths=(1, 1),
        num_heads=(2, 2),
        embed_dim=16,
        num_classes=3,
    ).eval()
    assert default_layers(model) == [f"stages.{i}.blocks.0.mlp.act" for i in range(2)]
    bias_mlp = "stages.0.blocks.0.attn.meta_mlp.act"
    reason = r"outputs \(\d+, \d+\): its first axis is not the batch \(2\)"
    with pytest.raises(ValueError, match=reason):
        cv.FeatureVisualization(model, bias_mlp).attribute(target=0, steps=1)
    with pytest.raises(ValueError, match=reason):
        cv.PatchActivationMap(model, bias_mlp).attribute(torch.rand(2, 3, 32, 32), target=0)


def test_torchvision_vit_atlas_shows_its_mlp_hidden_layers(tmp_path):
    """torchvision's MLP activation has no name of its own ('mlp.1'): the atlas showed
    whole blocks instead of the paper's layer."""
    import torchvision

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=48
    ).eval()
    gelus = [name for name, module in vit.named_modules() if isinstance(module, torch.nn.GELU)]
    assert (
        default_layers(vit)
        == gelus
        == [f"encoder.layers.encoder_layer_{i}.mlp.1" for i in range(2)]
    )
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    index = build_atlas(vit, images, tmp_path / "site", units=1, k=1, steps=1, show_progress=False)
    shown = json.loads((index.parent / "atlas.json").read_text())["layers"]
    assert list(shown) == gelus
    assert all(info["grid"] == [4, 4] and info["channels"] == 48 for info in shown.values())


@pytest.mark.parametrize(
    "arch,left_out", [("cait", "blocks_token_only.0.mlp.act"), ("vit_map", "attn_pool.mlp.act")]
)
def test_default_layers_without_a_patch_grid_are_left_out_not_fatal(
    tmp_path, capsys, arch, left_out
):
    """The default atlas of CaiT (class-attention blocks) and of a ViT with an
    attention-pool head (SigLIP-style) failed on that one non-spatial default layer."""
    from archs import TIMM_ARCHS

    factory, size = TIMM_ARCHS[arch]
    model = factory()
    assert left_out in default_layers(model)
    images = torch.rand(3, 3, *size, generator=torch.Generator().manual_seed(0))
    note = f"left out 1 default layer(s) without a patch grid (no map to show): {left_out}"
    # A quiet call prints nothing: the note comes as a warning.
    with pytest.warns(UserWarning, match=re.escape(note)):
        index = build_atlas(
            model, images, tmp_path / "site", units=1, k=1, steps=1, show_progress=False
        )
    assert capsys.readouterr().out == ""
    layers = list(json.loads((index.parent / "atlas.json").read_text())["layers"])
    assert layers == ["blocks.0.mlp.act", "blocks.1.mlp.act"]
    build_atlas(model, images, tmp_path / "site", units=1, k=1, steps=1, show_progress=None)
    printed = capsys.readouterr().out
    assert note in printed and "atlas written" in printed
    # A layer the user names is still an error: they asked for it.
    with pytest.raises(ValueError, match=f"layer {left_out} cannot be shown in an atlas"):
        build_atlas(model, images, tmp_path / "other", layers=[left_out], show_progress=False)


def test_mobilevit_atlas_shows_its_stages_where_its_mlps_have_no_grid(tmp_path, capsys):
    """MobileViT's MLPs (the default layers) work on unfolded patches, and most of what
    find_blocks calls its blocks are the transformer blocks on them: its default atlas
    stopped with "none of the default layers has a patch grid". It now shows the stages
    timm's feature_info lists, and says why; MobileNet-V3 and StarNet, whose blocks are of
    mixed classes, had no default layers (and no default probe layers) at all."""
    import timm

    from captum_vit import SpatialLocalityProbe

    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xxs").eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    index = build_atlas(model, images, tmp_path / "site", units=1, k=1, steps=1)
    printed = capsys.readouterr().out
    assert "most of the default layers stages.2.1.transformer.0.mlp.act" in printed
    assert "showing stages.0, stages.1, stages.2, ... (5 in all) instead" in printed
    shown = json.loads((index.parent / "atlas.json").read_text())["layers"]
    grids = {"stages.0": 32, "stages.1": 16, "stages.2": 8, "stages.3": 4, "final_conv": 2}
    assert {layer: info["grid"] for layer, info in shown.items()} == {
        layer: [side, side] for layer, side in grids.items()
    }
    for layer in shown:
        captured = capture_layers(model, layer, images)
        assert list(captured.shape[-2:]) == shown[layer]["grid"]

    mixed = timm.create_model("starnet_s050").eval()
    assert default_layers(mixed) == ["stages.0", "stages.1", "stages.2", "stages.3"]
    report = SpatialLocalityProbe(mixed).attribute(images[:1], positions=2)
    assert report.layers == ["stages.0", "stages.1", "stages.2", "stages.3"]


def test_feature_visualizations_are_made_at_the_atlas_images_size(tmp_path):
    """A model that takes any size was visualized at its recorded size (here 32x32; for
    timm's Gemma 4 its pretrained 768x768, which exhausted the memory) beside top images
    of another size; the pictures are now made at the images' size."""
    from archs import TIMM_ARCHS

    model = TIMM_ARCHS["vit_dynamic"][0]()  # records 32x32, takes any multiple of 8
    images = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    out = tmp_path / "atlas"
    build_atlas(model, images, out, layers=["blocks.1.mlp.act"], units=1, k=1, steps=1)
    (picture,) = out.glob("layers/blocks.1.mlp.act/unit_*/visualization.png")
    (top,) = out.glob("layers/blocks.1.mlp.act/unit_*/top0.png")
    assert Image.open(picture).size == Image.open(top).size == (40, 48)

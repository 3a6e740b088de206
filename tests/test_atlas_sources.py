"""Where an atlas's model comes from and how its classes meet the images: class names of
zoo, Hugging Face and timm ImageNet models; Table 1 on folders named after any subset of
the classes (against a brute-force accuracy); Hugging Face model directories through the
command line; open_clip and timm models with a local weights file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image
from skimage import data as photos

import captum_vit as cv
from captum_vit import ImageModel, zoo
from captum_vit.atlas import ImageFiles, build_atlas, default_layers, load_model, open_images
from captum_vit.atlas.model_stats import pooling_table
from captum_vit.atlas.sources import weights_fingerprint
from captum_vit.cli import main
from captum_vit.models import class_names, match_class_names
from captum_vit.render import to_pil

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_hf_vit(id2label: dict[int, str] | None = None):
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        **(
            {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
            if id2label
            else {}
        ),
    )
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config).eval()


def _tiny_timm_vit(**kwargs) -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, **kwargs)


# --------------------------------------------------------------------------- class names


def test_class_names_of_zoo_hugging_face_and_imagenet_models():
    vit = zoo.load_model("vit")
    assert class_names(vit) == list(vit.class_names) == class_names(ImageModel(vit))
    assert match_class_names(vit, ["STAR", "circle", "banana"]) == [3, 0, None]
    labels = {0: "astronaut", 1: "coffee", 2: "cat"}
    assert class_names(_tiny_hf_vit(labels)) == ["astronaut", "coffee", "cat"]
    assert class_names(_tiny_hf_vit()) is None  # only transformers' LABEL_0, LABEL_1, ...
    imagenet = _tiny_timm_vit()  # timm's ImageNet-1k head: synsets and descriptions
    names = class_names(imagenet)
    assert len(names) == 1000 and names[0] == "tench, Tinca tinca"
    folders = ["n01443537", "Goldfish", "tench, tinca tinca", "tiger_shark", "crane", "n03126707"]
    # "crane" names two classes (a bird and a machine): only its synset is unambiguous
    assert match_class_names(imagenet, folders) == [1, 1, 0, 3, None, 517]
    assert class_names(_tiny_timm_vit(num_classes=10)) is None  # a new head names nothing


def _scene_folder(root: Path, classes: list[str], per_class: int = 4) -> Path:
    """An ImageFolder tree of zoo scenes of ``classes`` (folder = scene class name)."""
    scenes = zoo.SyntheticScenes(64, seed=5)
    counts = dict.fromkeys(classes, 0)
    for index in range(len(scenes)):
        item = scenes[index]
        name = scenes.class_names[int(item["label"])]
        if counts.get(name, per_class) < per_class:
            (root / name).mkdir(parents=True, exist_ok=True)
            to_pil(item["image"]).save(root / name / f"scene{index:03d}.png")
            counts[name] += 1
    assert all(count == per_class for count in counts.values())
    return root


def test_table_one_matches_folders_to_the_model_classes(tmp_path):
    model = zoo.load_model("vit")
    # a subset of the zoo's 8 classes; sorted folders (circle, cross, star) are not 0, 1, 2
    images = ImageFiles(_scene_folder(tmp_path / "scenes", ["star", "cross", "circle"]), (64, 64))
    table = pooling_table(model, images, batch_size=5)
    assert "skipped" not in table and table["num_images"] == 12
    # brute force: the model on the same images, labels from the folder names
    batch = images.batch(range(len(images)))
    labels = torch.tensor(
        [model.class_names.index(Path(images.name(i)).parts[0]) for i in range(12)]
    )
    with torch.no_grad():
        predicted = ImageModel(model)(batch["image"]).argmax(-1)
    assert table["natural"] == pytest.approx(100.0 * float((predicted == labels).double().mean()))
    assert table["natural"] > 50  # the zoo ViT knows its scenes: the labels are the right ones


def test_table_one_is_skipped_for_folders_the_model_does_not_name(tmp_path):
    root = _scene_folder(tmp_path / "scenes", ["star"], per_class=1)
    (root / "banana").mkdir()
    to_pil(torch.rand(3, 64, 64)).save(root / "banana" / "fruit.png")
    images = ImageFiles(root, (64, 64))
    reason = pooling_table(zoo.load_model("vit"), images)["skipped"]
    unmatched, fix = reason.split(". ", 1)
    assert unmatched.endswith(": 'banana'")  # "star" matches
    assert "'circle', 'square'" in fix  # the names that would match
    anonymous = _tiny_timm_vit(num_classes=8)
    reason = pooling_table(anonymous, images)["skipped"]
    assert reason.endswith(
        "does not name its classes (no class_names list on the model, Hugging Face id2label "
        "or ImageNet-1k head), so the image folders cannot be matched to its outputs. Name "
        "them with a list, one name per output: model.class_names = ['cat', 'dog', ...]"
    )
    scenes = open_images(anonymous, None, scenes=2)  # no folders named by the user
    assert "so the zoo scenes' classes cannot" in pooling_table(anonymous, scenes)["skipped"]
    # The fix the reason gives works: named classes, and the folders are matched.
    anonymous.class_names = ["circle", "square", "triangle", "star", "a", "b", "c", "d"]
    assert "does not name" not in pooling_table(anonymous, images)["skipped"]


def test_table_one_says_when_zoo_scenes_are_not_the_model_classes():
    imagenet = _tiny_timm_vit()
    reason = pooling_table(imagenet, open_images(imagenet, None, scenes=4))["skipped"]
    assert reason.startswith("the images are zoo scenes, whose classes ('circle', 'square',")
    assert "pass --images DIR" in reason and "'tench, Tinca tinca'" in reason
    assert "folder(s) match no" not in reason  # the user named no folders


# --------------------------------------------------------------------------- Hugging Face


def _photo_classes(root: Path, names: list[str]) -> Path:
    pictures = [photos.astronaut(), photos.coffee(), photos.chelsea()]
    for name, picture in zip(names, pictures, strict=False):
        (root / name).mkdir(parents=True)
        for flip in (1, -1):
            small = Image.fromarray(np.ascontiguousarray(picture[:, ::flip])).resize((48, 48))
            small.save(root / name / f"photo{flip + 1}.png")
    return root


def test_atlas_of_a_hugging_face_model_directory(tmp_path, capsys):
    labels = {0: "astronaut", 1: "coffee", 2: "cat"}
    _tiny_hf_vit(labels).save_pretrained(tmp_path / "hf_vit")
    loaded = load_model(str(tmp_path / "hf_vit"))
    assert type(loaded.model).__name__ == "ViTForImageClassification"
    assert not loaded.model.training
    layers = ["vit.layers.0.mlp.activation_fn", "vit.layers.1.mlp.activation_fn"]
    assert default_layers(loaded.model) == layers
    images = _photo_classes(tmp_path / "photos", list(labels.values()))
    out = tmp_path / "site"
    command = ["atlas", str(tmp_path / "hf_vit"), "--images", str(images), "--out", str(out)]
    command += ["--units", "top:1", "--k", "2", "--steps", "2", "--batch-size", "4"]
    assert main(command) == 0, capsys.readouterr().err
    assert (out / "index.html").is_file()
    manifest = json.loads((out / "atlas.json").read_text())
    assert list(manifest["layers"]) == layers
    for layer in layers:
        (unit,) = manifest["layers"][layer]["units"]
        record = json.loads((out / f"layers/{layer}/unit_{unit:04d}/unit.json").read_text())
        assert record["num_images"] == 6 and len(record["top"]) == 2
        assert (out / f"layers/{layer}/unit_{unit:04d}.html").is_file()
    # The folders match id2label, so Table 1 is measured (it was "undefined for
    # HFVisionModel"): its natural accuracy is the model's own on the photos.
    pooling = json.loads((out / "data/model.json").read_text())["pooling"]
    source = open_images(loaded.model, str(images))
    batch = source.batch(range(len(source)))
    with torch.no_grad():
        predicted = ImageModel(loaded.model)(batch["image"]).argmax(1).tolist()
    truth = [source.class_names[label] for label in batch["label"].tolist()]
    hits = sum(labels[p] == t for p, t in zip(predicted, truth, strict=True))
    assert pooling["natural"] == pytest.approx(100.0 * hits / len(truth))
    assert pooling["num_images"] == 6 and pooling["isolated_cls"]["0"] == pooling["natural"]
    assert "Not measured" not in (out / "index.html").read_text()


def test_hugging_face_directory_errors(tmp_path, monkeypatch):
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        load_model(str(tmp_path / "plain"))
    _tiny_hf_vit().save_pretrained(tmp_path / "hf_vit")
    with pytest.raises(ValueError, match="holds its own weights"):
        load_model(str(tmp_path / "hf_vit"), pretrained=True)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install captum-vit\[hf\]"):
        load_model(str(tmp_path / "hf_vit"))


# --------------------------------------------------------------------------- weights files

_TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture
def tiny_clip_names(tmp_path, monkeypatch):
    """Two tiny open_clip architectures registered by name for this test only."""
    factory = open_clip.factory
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", dict(factory._MODEL_CONFIGS))
    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", list(factory._MODEL_CONFIG_PATHS))
    for name, embed_dim in (("tiny-clip-test", 16), ("tiny-clip-test-other", 8)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**_TINY_CLIP, "embed_dim": embed_dim}))
        open_clip.add_model_config(path)
    return "tiny-clip-test", "tiny-clip-test-other"


def test_open_clip_model_with_a_weights_file(tmp_path, tiny_clip_names):
    name, other = tiny_clip_names
    torch.manual_seed(3)
    saved = open_clip.create_model(name)
    torch.save(saved.state_dict(), tmp_path / "clip.pt")
    loaded = load_model(name, weights=tmp_path / "clip.pt")
    assert loaded.fingerprint == weights_fingerprint(saved) and not loaded.model.training
    assert loaded.description == f"{name} with weights clip.pt"
    layers = ["transformer.resblocks.0.mlp.gelu", "transformer.resblocks.1.mlp.gelu"]
    assert default_layers(loaded.model.visual) == layers
    # On the full model, the paths it takes (the bare ones also name text-tower modules).
    assert default_layers(loaded.model) == [f"visual.{layer}" for layer in layers]
    with pytest.raises(ValueError, match=f"does not match the architecture {other}"):
        load_model(other, weights=tmp_path / "clip.pt")
    # open_clip's own training checkpoint (epoch, DDP's "module." on every name) loads too
    ddp = {f"module.{key}": value for key, value in saved.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": ddp}, tmp_path / "epoch_3.pt")
    assert load_model(name, weights=tmp_path / "epoch_3.pt").fingerprint == loaded.fingerprint
    with pytest.raises(ValueError, match="needs --weights FILE"):
        load_model(name)
    folder = tmp_path / "photos"  # a flat folder: no labels
    folder.mkdir()
    for number, picture in enumerate([photos.astronaut(), photos.coffee(), photos.chelsea()]):
        Image.fromarray(picture).resize((40, 40)).save(folder / f"photo{number}.png")
    index = build_atlas(
        loaded, folder, tmp_path / "site", units=1, k=2, steps=2, show_progress=False
    )
    manifest = json.loads((index.parent / "atlas.json").read_text())
    assert list(manifest["layers"]) == layers
    for layer, info in manifest["layers"].items():
        assert (index.parent / f"layers/{layer}/unit_{info['units'][0]:04d}.html").is_file()
    page = index.read_text()
    assert "the images have no labels" in page
    # The atlas names layers inside the image tower; the page says how to name them in code.
    assert "e.g. <code>visual.transformer.resblocks.0.mlp.gelu</code>" in page
    scenes = open_images(loaded.model, None, scenes=2)
    reason = pooling_table(loaded.model, scenes)["skipped"]
    assert reason.startswith("the model is an image-text (CLIP) model")


def test_timm_model_with_a_weights_file_and_pretrained_without_network(tmp_path, monkeypatch):
    torch.manual_seed(4)
    saved = timm.create_model("vit_tiny_patch16_224")
    torch.save(saved.state_dict(), tmp_path / "vit.pt")
    loaded = load_model("vit_tiny_patch16_224", weights=tmp_path / "vit.pt")
    assert loaded.fingerprint == weights_fingerprint(saved)
    assert class_names(loaded.model)[1] == "goldfish, Carassius auratus"
    assert loaded.description == "vit_tiny_patch16_224 with weights vit.pt"
    assert not loaded.random_weights
    # A checkpoint of a training loop: the state dict of a DistributedDataParallel model
    # ("module." on every name) under "state_dict", next to the epoch
    ddp = {f"module.{key}": value for key, value in saved.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": ddp}, tmp_path / "epoch_3.pt")
    trained = load_model("vit_tiny_patch16_224", weights=tmp_path / "epoch_3.pt")
    assert trained.fingerprint == weights_fingerprint(saved)
    # timm's train.py checkpoint keeps its settings as an argparse.Namespace
    settings = argparse.Namespace(model="vit_tiny_patch16_224", lr=5e-4, epochs=300)
    timm_checkpoint = {"epoch": 9, "arch": "vit", "state_dict": saved.state_dict()}
    torch.save({**timm_checkpoint, "args": settings, "version": 2}, tmp_path / "last.pth.tar")
    trained = load_model("vit_tiny_patch16_224", weights=tmp_path / "last.pth.tar")
    assert trained.fingerprint == weights_fingerprint(saved)
    untrained = load_model("vit_tiny_patch16_224")
    assert untrained.random_weights
    assert untrained.description == "vit_tiny_patch16_224 (random weights, seed 0)"
    # The same weights every time (an atlas resumes; torchrun processes agree), and the
    # caller's random state is left alone.
    state = torch.random.get_rng_state()
    assert load_model("vit_tiny_patch16_224").fingerprint == untrained.fingerprint
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not load_model(zoo_name="vit").random_weights

    def offline(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return timm.models.create_model(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ValueError, match="needs a network.*--weights FILE"):
        load_model("vit_tiny_patch16_224", pretrained=True)


def test_image_size_builds_the_named_model_for_that_size(tmp_path, tiny_clip_names, capsys):
    """``captum-vit atlas vit_tiny_patch16_224 --image-size 64`` stopped with "this model
    takes 224x224 images only": the layout command built a timm model for the size, the
    atlas wrapped the 224-px model. A timm or open_clip name is now built for the size,
    and its weights (a file, or timm's download) resampled to it as timm / open_clip
    resample them; a CNN, which takes no img_size, is built as it is."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(5)
    saved = timm.create_model("vit_tiny_patch16_224")
    torch.save(saved.state_dict(), tmp_path / "vit.pt")
    loaded = load_model("vit_tiny_patch16_224", weights=tmp_path / "vit.pt", image_size=(64, 64))
    assert ImageModel(loaded.model).image_size == (64, 64)
    expected = resample_abs_pos_embed(saved.pos_embed, new_size=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(loaded.model.pos_embed, expected)
    assert torch.equal(loaded.model.blocks[5].mlp.fc1.weight, saved.blocks[5].mlp.fc1.weight)
    assert load_model("vit_tiny_patch16_224", image_size=(64, 48)).model.patch_embed.grid_size == (
        4,
        3,
    )
    cnn = load_model("resnet18", image_size=(96, 96)).model  # no img_size: built as it is
    assert type(cnn).__name__ == "ResNet"

    name, _ = tiny_clip_names
    clip = open_clip.create_model(name)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    sized = load_model(name, weights=tmp_path / "clip.pt", image_size=(48, 48)).model
    assert ImageModel(sized).image_size == (48, 48)
    assert sized.visual.positional_embedding.shape[0] == 1 + 6 * 6
    assert torch.equal(sized.visual.conv1.weight, clip.visual.conv1.weight)

    out = tmp_path / "atlas"
    args = ["atlas", "vit_tiny_patch16_224", "--image-size", "64", "--scenes", "2"]
    args += ["--layers", "blocks.0.mlp.act", "--units", "1", "--k", "1", "--steps", "1"]
    assert main([*args, "--out", str(out)]) == 0, capsys.readouterr().err
    manifest = json.loads((out / "atlas.json").read_text())
    assert manifest["layers"]["blocks.0.mlp.act"]["grid"] == [4, 4]


def test_zoo_scenes_are_drawn_at_the_model_input_size():
    scenes = open_images(_tiny_timm_vit(), None, scenes=3)
    assert scenes.batch([0, 2])["image"].shape == (2, 3, 32, 32)
    assert scenes.fingerprint == "zoo-scenes:3:1:32"
    zoo_scenes = open_images(zoo.load_model("vit"), None, scenes=3)  # the zoo's own 64 px
    assert zoo_scenes.fingerprint == "zoo-scenes:3:1"
    assert zoo_scenes.batch([0])["image"].shape == (1, 3, 64, 64)


# --------------------------------------------------------------------------- in-memory images


def test_atlas_of_a_tensor_of_images_and_of_scenes_objects(tmp_path):
    """A tensor and zoo.SyntheticScenes failed with AttributeError ('no attribute batch' /
    'fingerprint'); a DataLoader did too."""
    model = _tiny_timm_vit().eval()
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    source = open_images(model, images)
    assert torch.equal(source.batch([4, 1])["image"], images[[4, 1]])
    changed = images.clone()
    changed[2, 0, 0, 0] += 0.1
    assert open_images(model, changed).fingerprint != source.fingerprint
    index = build_atlas(
        model,
        images,
        tmp_path / "site",
        layers=["blocks.1.mlp.act"],
        units=[7],
        k=2,
        steps=1,
        show_progress=False,
    )
    # The unit's best image, against a brute-force score: its mean over patch tokens.
    with torch.no_grad():
        maps = cv.PatchActivationMap(model, "blocks.1.mlp.act").attribute(images, target=7)
    best = int(maps.flatten(1).mean(1).argmax())
    page = (index.parent / "layers/blocks.1.mlp.act/unit_0007.html").read_text()
    assert f"#1: image {best}<" in page
    # Scenes given as an object are the same images as the default scenes: same fingerprint.
    vit = zoo.load_model("vit")
    given = open_images(vit, zoo.SyntheticScenes(4, seed=1))
    assert given.fingerprint == open_images(vit, None, scenes=4).fingerprint
    unbiased = open_images(vit, zoo.SyntheticScenes(4, seed=1, background_bias=0.0))
    assert unbiased.fingerprint != given.fingerprint
    assert unbiased.description == "4 zoo scenes, SyntheticScenes(4, seed=1, background_bias=0.0)"
    loader = torch.utils.data.DataLoader(zoo.SyntheticScenes(4), batch_size=2)
    with pytest.raises(TypeError, match="cannot be of type DataLoader: it reads images by index"):
        open_images(vit, loader)
    with pytest.raises(ValueError, match="divide 0-255 images by 255"):
        open_images(model, images * 255)
    with pytest.raises(ValueError, match="takes 32x32 images only, got 16x16"):  # not timm's
        open_images(model, images[..., :16, :16])  # AssertionError in the first forward

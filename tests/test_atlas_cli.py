"""``captum-vit atlas`` as a user runs it: resumed after SIGKILL, split over two processes
with torchrun, and refusing bad input with a clear message and a non-zero exit. Also the
other subcommands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import captum_vit as cv
from captum_vit import zoo
from captum_vit.cli import main

ROOT = Path(__file__).resolve().parents[1]
# Tiny settings: the zoo ViT, two layers, two units each (four chunks), 32 scenes.
ARGS = [
    "atlas",
    "--zoo",
    "vit",
    "--scenes",
    "32",
    "--layers",
    "blocks.1.mlp.act,blocks.4.mlp.act",
    "--units",
    "top:2",
    "--k",
    "3",
    "--steps",
    "3",
    "--batch-size",
    "8",
    "--fv-batch",
    "1",
]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run(out: Path, *prefix: str) -> subprocess.CompletedProcess:
    command = [*(prefix or (sys.executable, "-m")), "captum_vit", *ARGS, "--out", str(out)]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted single-process run (in this process, one thread)."""
    out = tmp_path_factory.mktemp("reference") / "atlas"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*ARGS, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_killed_run_resumes_to_identical_files(reference, tmp_path):
    out = tmp_path / "atlas"
    command = [sys.executable, "-m", "captum_vit", *ARGS, "--out", str(out)]
    process = subprocess.Popen(
        command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while not list(out.glob("layers/*/unit_*/unit.json")):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("layers/*/unit_*/unit.json")}
    assert 1 <= len(finished) < 4  # killed after some units, before the last
    assert not (out / "index.html").exists()  # nothing presented as finished
    result = _run(out)
    assert result.returncode == 0, result.stderr
    assert "estimated cost: about" in result.stdout
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in finished.items())
    assert _tree(out) == _tree(reference)


def test_two_processes_with_torchrun_give_identical_files(reference, tmp_path):
    out = tmp_path / "atlas"
    torchrun = (
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
    )
    result = _run(out, *torchrun)
    assert result.returncode == 0, result.stderr
    assert _tree(out) == _tree(reference)


def _fails(capsys, *args: str, match: str) -> None:
    assert main(list(args)) == 2
    assert match in capsys.readouterr().err


def test_bad_input_is_refused_before_anything_is_written(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_bad_input(tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _check_bad_input(tmp_path, capsys):
    out = tmp_path / "atlas"
    base = ["atlas", "--zoo", "vit", "--out", str(out), "--scenes", "4"]
    _fails(capsys, *base, "--layers", "blocks.1.mlp.nope", match="blocks.1.mlp.nope")
    _fails(capsys, *base, "--layers", "head", match="layer head cannot be shown in an atlas")
    (tmp_path / "empty").mkdir()
    _fails(capsys, *base, "--images", str(tmp_path / "empty"), match="holds no readable image")
    _fails(capsys, *base, "--images", str(tmp_path / "missing"), match="does not exist")
    cnn = {key: value.contiguous() for key, value in zoo.load_model("cnn").state_dict().items()}
    save_file(cnn, tmp_path / "cnn.safetensors")
    weights = str(tmp_path / "cnn.safetensors")
    _fails(capsys, *base, "--weights", weights, match="does not match the architecture zoo vit")
    torch.save({"not": "weights"}, tmp_path / "bad.pt")
    _fails(
        capsys,
        "atlas",
        "vit_tiny_patch16_224",
        "--weights",
        str(tmp_path / "bad.pt"),
        match="does not match",
    )
    _fails(capsys, "atlas", "no_such_model_xyz", match="unknown model")
    # A misspelt name (wrong case, a missing size) gets the names it was close to.
    _fails(capsys, "atlas", "vit-b-16", match="Closest names: ViT-B-16,")
    # An untrained timm architecture is said so before the work (here a bad layer ends it).
    untrained = ["atlas", "vit_tiny_patch16_224", "--out", str(out), "--layers", "nope"]
    _fails(capsys, *untrained, match="random initialization, seed 0 (neither")
    _fails(capsys, *base, "--units", "top:0", match="most active units must be >= 1")
    _fails(capsys, *base, "--preset", "nope", match="nope")
    # --steps 0 failed only after the estimate, with the atlas's folder already written.
    _fails(capsys, *base, "--steps", "0", match="steps must be a positive int, got 0")
    _fails(capsys, *base, "--device", "gpu", match="'gpu' is not a device: use cpu, cuda")
    if not torch.cuda.is_available():  # was a RuntimeError traceback
        _fails(capsys, *base, "--device", "cuda", match="cannot use --device cuda: ")
    assert not out.exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("mine")
    _fails(
        capsys, "atlas", "--zoo", "vit", "--out", str(tmp_path / "other"), match="holds no atlas"
    )


def test_cli_layouts_and_layout_errors(capsys):
    assert main(["layouts"]) == 0
    assert "cls, dist" in capsys.readouterr().out
    assert main(["layout", "vit_tiny_patch16_224", "blocks.1.mlp.fc", "--img-size", "32"]) == 2
    assert "blocks.1.mlp.fc1" in capsys.readouterr().err
    # An unknown model is an error message with the close names, not a traceback.
    assert main(["layout", "vit_tiny_patch16", "blocks.1", "--img-size", "32"]) == 2
    assert "Closest names: vit_tiny_patch16_384, vit_tiny_patch16_224" in capsys.readouterr().err


def test_cli_layout_without_a_layer_tables_every_block(capsys):
    """A user who does not know the layer names yet gets every block's layout."""
    import timm

    assert main(["layout", "deit_tiny_distilled_patch16_224", "--img-size", "64"]) == 0
    out = capsys.readouterr().out
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=64)
    grid = "x".join(map(str, model.patch_embed.grid_size))
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert [row[1] for row in rows] == [f"blocks.{i}" for i in range(len(model.blocks))]
    assert all(row[2:] == ["BNC", grid, str(model.embed_dim), "cls,", "dist"] for row in rows)
    assert "captum-vit layout deit_tiny_distilled_patch16_224 blocks.11" in out
    # CaiT's class-attention blocks read the cls token only: a row says so, no error.
    assert main(["layout", "cait_xxs24_224", "--img-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "blocks_token_only.1        no patch grid" in out
    assert "captum-vit layout cait_xxs24_224 blocks.23" in out
    # StarNet's stages hold blocks of mixed classes: its stages (timm's feature_info), as
    # captured, instead of "found no blocks"
    assert main(["layout", "starnet_s050", "--img-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "the output of every stage of the model, at 64x64" in out
    model = timm.create_model("starnet_s050")
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    maps = cv.capture_layers(model, [row[1] for row in rows], torch.rand(1, 3, 64, 64))
    assert [row[1] for row in rows] == [f"stages.{i}" for i in range(4)]
    for row, captured in zip(rows, maps, strict=True):
        assert row[2:4] == ["BCHW", f"{captured.shape[2]}x{captured.shape[3]}"]


def test_cli_layout_of_an_open_clip_name_reads_its_image_tower(capsys):
    """An open_clip name was "unknown timm model 'ViT-S-32'. Closest names: ViT-S-32"."""
    assert main(["layout", "ViT-S-32", "--img-size", "64"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert [row[1] for row in rows] == [f"transformer.resblocks.{i}" for i in range(12)]
    assert all(row[2:] == ["BNC", "2x2", "384", "cls"] for row in rows)
    assert "prefix visual." in out
    layer = "visual.transformer.resblocks.3.mlp.gelu"
    assert main(["layout", "ViT-S-32", layer, "--img-size", "64"]) == 0
    assert "channels  1536" in capsys.readouterr().out
    assert main(["layout", "ViT-S-32", "--pretrained"]) == 2
    assert "drop --pretrained" in capsys.readouterr().err


def torchvision_vit() -> torch.nn.Module:
    """For ``captum-vit layout test_atlas_cli:torchvision_vit``."""
    import torchvision

    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )


def torchvision_cnn() -> torch.nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=4)


def test_cli_layout_of_a_module_function_model(capsys):
    """The layout command took timm and open_clip names only (the atlas also takes
    module:function and Hugging Face directories); a size for a model that records none."""
    assert main(["layout", "test_atlas_cli:torchvision_vit"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("block"))
    rows = [line for line in lines if line[:1].isdigit()]
    assert [row.split()[1:] for row in rows] == [
        [f"encoder.layers.encoder_layer_{i}", "BNC", "4x4", "32", "cls"] for i in range(2)
    ]
    assert all(row.index("BNC") == header.index("kind") for row in rows)  # columns align
    assert main(["layout", "test_atlas_cli:torchvision_cnn", "layer3"]) == 2
    assert "--image-size" in capsys.readouterr().err
    assert main(["layout", "test_atlas_cli:torchvision_cnn", "layer3", "--image-size", "96"]) == 0
    shape = tuple(cv.capture_layers(torchvision_cnn(), "layer3", torch.rand(1, 3, 96, 96)).shape)
    assert f"(B, {shape[1]}, {shape[2]}, {shape[3]})" in capsys.readouterr().out


def test_cli_layout_at_a_size_a_timm_cnn_takes_and_names_its_blocks_as_the_user_does(capsys):
    """--img-size reached timm's CNN constructors as img_size (ResNet: TypeError); with a
    size the block table named the blocks by the size wrapper's paths ('model.layer1.0');
    HxW was refused by the layout command though the atlas's --image-size takes it."""
    assert main(["layout", "resnet18", "--img-size", "40x48"]) == 0
    out = capsys.readouterr().out
    assert "at 40x48" in out
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    shape = tuple(
        cv.capture_layers(timm.create_model("resnet18"), "layer3.1", torch.rand(1, 3, 40, 48)).shape
    )
    assert ["layer3.1", "BCHW", f"{shape[2]}x{shape[3]}", str(shape[1]), "-"] in [
        row[1:] for row in rows
    ]
    assert main(["layout", "test_atlas_cli:torchvision_cnn", "--image-size", "96"]) == 0
    names = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
    assert names[0] == "layer1.0" and not any(name.startswith("model.") for name in names)


def test_an_image_size_a_fixed_size_model_refuses_is_an_error_not_a_traceback(tmp_path, capsys):
    """Image files prepared at --image-size reached torchvision's own forward, whose bare
    AssertionError ('Wrong image height!') ended the command in a traceback."""
    from PIL import Image

    (tmp_path / "photos").mkdir()
    for index in range(2):
        Image.new("RGB", (40, 40), (60 * index, 90, 120)).save(tmp_path / f"photos/{index}.png")
    out = tmp_path / "atlas"
    args = ["atlas", "test_atlas_cli:torchvision_vit", "--images", str(tmp_path / "photos")]
    assert main([*args, "--out", str(out), "--image-size", "48"]) == 2
    assert "takes 32x32 images only, got 48x48" in capsys.readouterr().err
    assert not out.exists()


def test_output_piped_into_a_reader_that_stops_early_is_not_a_traceback():
    """``captum-vit layouts | head -1``: the reader closes the pipe after one line."""
    command = [sys.executable, "-m", "captum_vit", "layouts"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read().decode()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 1


def test_zoo_atlas_defaults_to_its_quick_recipe_unless_told_otherwise():
    import argparse

    from captum_vit.cli import ZOO_RECIPE, _default_recipe

    def args(**kw):
        base = dict(steps=None, zoo=None, preset=None)
        return argparse.Namespace(**{**base, **kw})

    assert _default_recipe(args(zoo="vit")) == ZOO_RECIPE == ("fast", 96)
    assert _default_recipe(args(zoo="vit", steps=5)) == (None, 5)
    assert _default_recipe(args(zoo="vit", preset="ghiasi2023")) == ("ghiasi2023", None)
    assert _default_recipe(args()) == (None, None)


@pytest.mark.parametrize(
    "command",
    [[], ["atlas"], ["layout"], ["layouts"], ["zoo.train"]],
    ids=["captum-vit", "atlas", "layout", "layouts", "zoo.train"],
)
def test_help_is_plain_text(command, capsys):
    """--help is read in a terminal: no reST markup from docstrings (``name``, :class:)."""
    from captum_vit.zoo.train import main as train_main

    run, argv = (train_main, []) if command == ["zoo.train"] else (main, command)
    with pytest.raises(SystemExit) as done:
        run([*argv, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage:")
    for markup in ("``", ":class:", ":func:", ":data:", ":mod:"):
        assert markup not in text, f"{markup!r} in:\n{text}"

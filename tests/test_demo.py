"""The README's main job: the demo on the bundled zoo ViT (short settings)."""

from __future__ import annotations

from PIL import Image

from captum_vit.cli import main
from captum_vit.demo import run_demo


def test_demo_writes_its_figures_and_page(tmp_path, capsys):
    page = run_demo(tmp_path, steps=4, scenes=64)
    text = page.read_text()
    for name in ("class_visualizations.png", "units_block3.png", "locality.png"):
        assert name in text
        with Image.open(tmp_path / name) as image:
            assert image.width > 100 and image.height > 50
    printed = capsys.readouterr().out
    assert "held-out top-1" in printed and "locality per block" in printed


def test_cli_layouts_and_layout_errors(capsys):
    assert main(["layouts"]) == 0
    assert "cls, dist" in capsys.readouterr().out
    assert main(["layout", "vit_tiny_patch16_224", "blocks.1.mlp.fc", "--img-size", "32"]) == 2
    assert "blocks.1.mlp.fc1" in capsys.readouterr().err

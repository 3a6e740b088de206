"""The ``captum-vit`` command (also ``python -m captum_vit``).

Subcommands:
  demo [--out DIR]      the main job: what the bundled zoo ViT learned (feature
                        visualizations, top examples with patch maps, locality), written
                        as PNGs and an HTML page
  layouts               resolve token layouts of a set of timm / open_clip architectures
                        (random weights, small configurations, no network) and show the
                        early-exit capture
  layout MODEL LAYER    print the token layout of one layer of a timm model
"""

from __future__ import annotations

import argparse
import sys
import time

import timm
import torch

from .capture import capture_layers
from .layout import resolve_layout

_DEMO_MODELS = [
    ("vit_tiny_patch16_224", "blocks.1.mlp.fc1", {}),
    ("deit_tiny_distilled_patch16_224", "blocks.1", {}),
    ("vit_small_patch14_reg4_dinov2", "blocks.1", {"img_size": 56, "patch_size": 14}),
    ("eva02_tiny_patch14_224", "blocks.1.mlp.fc2", {"img_size": 56, "patch_size": 14}),
    ("cait_xxs24_224", "blocks.1", {}),
    ("convit_tiny", "blocks.2", {"local_up_to_layer": 2}),
    (
        "swin_tiny_patch4_window7_224",
        "layers.0.blocks.1",
        {"img_size": 56, "depths": (2, 2), "num_heads": (2, 4), "patch_size": 4},
    ),
    ("pit_ti_224", "transformers.1", {"img_size": 64, "patch_size": 16}),
    ("twins_svt_small", "blocks.1.0", {"img_size": 64, "patch_size": 4}),
    ("coat_lite_tiny", "serial_blocks2.0", {"img_size": 64, "patch_size": 4}),
    ("resnet18", "layer2", {"patch_size": None}),
]


def _small(name: str, kwargs: dict) -> torch.nn.Module:
    kwargs = dict(kwargs)
    patch = kwargs.pop("patch_size", 8)
    base = {"img_size": 32, "patch_size": patch, "depth": 3, "embed_dim": 32, "num_heads": 2}
    if not name.startswith(("vit", "deit", "eva", "cait", "convit")):
        base = {}
    base.update(kwargs)
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **base).eval()


def layouts() -> int:
    print("captum_vit demo: token layouts measured in one forward pass (random weights)\n")
    print(f"{'model':34s} {'layer':26s} {'kind':5s} {'grid':>7s}  prefix")
    for name, layer, kwargs in _DEMO_MODELS:
        model = _small(name, kwargs)
        layout = resolve_layout(model, layer, attribute_to_layer_input=layer.endswith("fc2"))
        grid = f"{layout.grid[0]}x{layout.grid[1]}"
        prefix = ", ".join(layout.prefix_names) or "-"
        input_tag = " (input)" if layer.endswith("fc2") else ""
        print(f"{name:34s} {layer + input_tag:26s} {layout.kind:5s} {grid:>7s}  {prefix}")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    images = torch.rand(8, 3, 224, 224)
    with torch.no_grad():
        model(images)  # warm-up
        start = time.perf_counter()
        model(images)
        full = time.perf_counter() - start
    start = time.perf_counter()
    out = capture_layers(model, "blocks.3", images)
    early = time.perf_counter() - start
    print(
        f"\nvit_tiny_patch16_224, batch 8 at 224: blocks.3 output {tuple(out.shape)} captured "
        f"in {early * 1e3:.0f} ms (early exit) vs full forward {full * 1e3:.0f} ms"
    )
    return 0


def layout_command(args: argparse.Namespace) -> int:
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs).eval()
    layout = resolve_layout(model, args.layer)
    print(layout)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="captum-vit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="what the bundled zoo ViT learned (PNGs + HTML)")
    demo.add_argument("--out", default="captum_vit_demo")
    demo.add_argument("--steps", type=int, default=256)
    sub.add_parser("layouts", help="token layouts of many architectures, early-exit capture")
    layout = sub.add_parser("layout", help="token layout of one layer of a timm model")
    layout.add_argument("model")
    layout.add_argument("layer")
    layout.add_argument("--img-size", type=int, default=None)
    layout.add_argument("--pretrained", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.out, steps=args.steps)
        return 0
    if args.command == "layouts":
        return layouts()
    try:
        return layout_command(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``captum-vit`` command (also ``python -m captum_vit``).

Subcommands:
  atlas [MODEL] [--zoo vit|cnn] [--images DIR] [--out DIR] ...
                        the main job: a static site of what every unit of every layer
                        responds to (feature visualizations, top images with patch
                        activation maps, histograms, locality, Table 1); resumable, and
                        split over processes under torchrun. MODEL: a timm name, an
                        open_clip name with --weights FILE, a Hugging Face model
                        directory (save_pretrained), or module:function
  layouts               resolve token layouts of a set of timm / open_clip architectures
                        (random weights, small configurations, no network) and show the
                        early-exit capture
  layout MODEL [LAYER]  print the token layout of one layer of a timm or open_clip model,
                        or a table of the layouts of all its blocks
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import timm
import torch

from ._memory import keep_freed_memory
from .capture import capture_layers
from .layout import TokenLayout, resolve_layout, resolve_layouts
from .locality.probe import find_blocks, find_stages
from .models import ImageModel, unwrap_vision, user_layer_path

_LAYOUT_MODELS = [
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


def _layout_header(first: str, width: int, layer_width: int = 26) -> str:
    return (
        f"{first:{width}s} {'layer':{layer_width}s} {'kind':5s} {'grid':>7s} "
        f"{'channels':>8s}  prefix"
    )


def _layout_row(
    first: str, width: int, layer: str, layout: TokenLayout, layer_width: int = 26
) -> str:
    grid = f"{layout.grid[0]}x{layout.grid[1]}"
    prefix = ", ".join(layout.prefix_names) or "-"
    tag = " (input)" if layout.attribute_to_layer_input else ""
    return (
        f"{first:{width}s} {layer + tag:{layer_width}s} {layout.kind:5s} {grid:>7s} "
        f"{layout.num_channels:8d}  {prefix}"
    )


def _block_layouts(model: torch.nn.Module, blocks: list[str]) -> list[TokenLayout | None]:
    """The layout of each block's output (one forward), ``None`` for a block without a
    patch grid (CaiT's class-attention blocks read the cls token only)."""
    try:
        return resolve_layouts(model, blocks)
    except ValueError:
        found = []
        for block in blocks:
            try:
                found.append(resolve_layout(model, block))
            except ValueError:
                found.append(None)
        return found


def layouts() -> int:
    print("captum_vit layouts: token layouts measured in one forward pass (random weights)\n")
    print(_layout_header("model", 34))
    for name, layer, kwargs in _LAYOUT_MODELS:
        model = _small(name, kwargs)
        layout = resolve_layout(model, layer, attribute_to_layer_input=layer.endswith("fc2"))
        print(_layout_row(name, 34, layer, layout))
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


def _layout_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    """The model to resolve layouts on (an open_clip model's image tower) and a note on
    its layer paths."""
    import open_clip

    from .atlas.sources import create_timm_at, load_model

    if not timm.is_model(args.model) and args.model not in open_clip.list_models():
        # a Hugging Face directory or module:function (else load_model's unknown-name error)
        model = load_model(args.model).model
        if args.img_size:
            model = ImageModel(model, image_size=args.img_size)
        return model, "the model"
    if not timm.is_model(args.model):
        if args.pretrained:
            raise ValueError(
                f"--pretrained downloads timm weights; {args.model} is an open_clip model, "
                "built here with random weights (its layouts are the same): drop --pretrained"
            )
        size = {"force_image_size": args.img_size} if args.img_size else {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            clip = open_clip.create_model(args.model, pretrained=None, **size)
        note = "its image tower (on the full model in code, a layer takes the prefix visual.)"
        return clip.visual.eval(), note
    model = create_timm_at(args.model, args.pretrained, args.img_size).eval()
    if not args.img_size:
        return model, "the model"
    # the size is the wrapper's too, where the model does not record it (CNNs, Gemma 4)
    return ImageModel(model, image_size=args.img_size), "the model"


def layout_command(args: argparse.Namespace) -> int:
    model, note = _layout_model(args)
    if args.layer is not None:
        layout = resolve_layout(model, args.layer)
        height, width = ImageModel(model).image_size
        print(f"{args.model}: one layer of {note}, at {height}x{width}\n")
        print(layout.describe())
        return 0
    # the paths the user names: not those of an ImageModel wrapping the model (--img-size)
    vision = unwrap_vision(model)
    blocks, word = find_blocks(vision), "block"
    if not blocks:  # blocks of mixed classes (MobileNet-V3, StarNet): timm's stages
        blocks, word = find_stages(vision), "stage"
    blocks = [user_layer_path(model, block) for block in blocks]
    if not blocks:
        raise ValueError(
            f"found no blocks or stages in {args.model}: name a layer (captum-vit layout "
            "MODEL LAYER)"
        )
    height, width = ImageModel(model).image_size
    print(f"{args.model}: the output of every {word} of {note}, at {height}x{width}\n")
    names = max(26, *(len(block) for block in blocks))  # torchvision's names are long
    print(_layout_header(word, 6, names))
    found = _block_layouts(model, blocks)
    for index, (block, layout) in enumerate(zip(blocks, found, strict=True)):
        if layout is None:
            print(f"{index:<6d} {block:{names}s} no patch grid (name it as the layer to see why)")
        else:
            print(_layout_row(str(index), 6, block, layout, names))
    spatial = [block for block, layout in zip(blocks, found, strict=True) if layout] or blocks
    print(f"\nA layer's full layout: captum-vit layout {args.model} {spatial[-1]}")
    return 0


def _image_size(text: str) -> tuple[int, int]:
    """``224`` or ``224x320`` (height x width)."""
    parts = text.lower().split("x")
    if len(parts) in (1, 2) and all(part.strip().isdigit() and int(part) > 0 for part in parts):
        sizes = [int(part) for part in parts]
        return (sizes[0], sizes[-1])
    raise argparse.ArgumentTypeError(
        f"--image-size takes N or HxW in pixels, like 224 or 224x320; got {text!r}"
    )


def _units(text: str) -> str | int | list[int]:
    """``all``, ``top:N`` (the N most active units per layer) or ``3,17,42``."""
    if text == "all":
        return "all"
    try:
        if text.startswith("top:"):
            return int(text[4:])
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--units takes all, top:N or a list like 3,17,42; got {text!r}"
        ) from None


def _add_atlas_parser(sub: argparse._SubParsersAction) -> None:
    atlas = sub.add_parser(
        "atlas",
        help="a static site of what every unit of every layer responds to",
        description="Build (or resume, or extend) an atlas: what every unit of every layer "
        "responds to, over your images, as a static site. Under torchrun --nproc_per_node N "
        "the work is split over the processes (same files as one process). Table 1 (the "
        "pooling experiments) needs labelled images: an ImageFolder tree whose class folders "
        "are named after the model's classes (zoo names, a Hugging Face id2label, ImageNet "
        "synsets like n01440764 or names like 'tench'; any subset, any case), or zoo scenes "
        "for a zoo model; otherwise the page says why it was skipped.",
    )
    atlas.add_argument(
        "model",
        nargs="?",
        help="timm name, open_clip name (with --weights), Hugging Face model directory "
        "(config.json from save_pretrained; needs pip install captum-vit[hf]) or "
        "module:function",
    )
    atlas.add_argument("--zoo", choices=["vit", "cnn"], help="a bundled zoo model instead")
    atlas.add_argument(
        "--weights",
        help="local checkpoint (.safetensors or torch state dict) for a timm, open_clip or zoo "
        "model; it must match the architecture",
    )
    atlas.add_argument(
        "--pretrained", action="store_true", help="download timm's weights (needs a network)"
    )
    atlas.add_argument(
        "--images",
        help="folder of image files (recursive; class sub-folders named after the model's "
        "classes give Table 1); default zoo scenes",
    )
    atlas.add_argument(
        "--image-size",
        "--img-size",
        type=_image_size,
        help="input size, N or HxW (default: the model's own; a timm or open_clip name is "
        "built for it, its weights resampled; needed for a model that records none, such "
        "as a torchvision CNN)",
    )
    atlas.add_argument("--scenes", type=int, default=256, help="zoo scenes without --images")
    atlas.add_argument("--out", default="atlas", help="the atlas folder (default: atlas)")
    atlas.add_argument(
        "--layers", help="comma-separated dotted paths; default every MLP hidden layer"
    )
    atlas.add_argument(
        "--units", type=_units, default=8, help="all, top:N (default top:8) or 3,17,42"
    )
    atlas.add_argument("--k", type=int, default=8, help="top images per unit (default 8)")
    atlas.add_argument(
        "--preset", help="feature-visualization preset (default: fast on CPU, ghiasi2023 on GPU)"
    )
    atlas.add_argument(
        "--steps",
        type=int,
        help="optimization steps (default: the preset's; for --zoo with neither --preset nor "
        "--steps: preset fast with 96 steps)",
    )
    atlas.add_argument(
        "--seed", type=int, default=0, help="seed of the feature visualizations (default 0)"
    )
    atlas.add_argument("--batch-size", type=int, default=64, help="images per forward")
    atlas.add_argument("--fv-batch", type=int, default=8, help="units optimized together")
    atlas.add_argument("--device", help="cpu or cuda (default: cuda when present)")


# The zoo models are 64-px toys: "fast" (the paper's augmentations on a pixel pyramid) at
# 96 steps draws every unit with content, while "robust" at 48 steps (the recipe before
# it, then without its fading noise) left most last-block units of the 96.40% zoo ViT flat
# grey (robust activation of the 4 most active units of blocks 0 / 3 / 5: 0.99 / 1.14 /
# 3.37 against 0.56 / 0.63 / 0.98, in the same 10 s). The README's main job takes about a
# minute on 2 idle cores (measured 46-56 s, and 55-70 s on 2026-12-07 for this code and the
# code before that day's changes alike, interleaved; "robust" at 48 steps, with its noise,
# 60 s in the same window as a 54 s run).
ZOO_RECIPE = ("fast", 96)


def _default_recipe(args: argparse.Namespace) -> tuple[str | None, int | None]:
    """(preset, steps): the zoo's quick recipe for ``--zoo`` without ``--preset`` and
    ``--steps``, else what was asked (``None``: the atlas's defaults)."""
    if args.zoo and args.preset is None and args.steps is None:
        return ZOO_RECIPE
    return args.preset, args.steps


def atlas_command(args: argparse.Namespace) -> int:
    from .atlas import build_atlas, load_model

    loaded = load_model(
        args.model,
        zoo_name=args.zoo,
        weights=args.weights,
        pretrained=args.pretrained,
        image_size=args.image_size if args.zoo is None else None,
    )
    if loaded.random_weights and os.environ.get("RANK", "0") == "0":
        print(
            f"note: {args.model} has timm's random initialization, seed 0 (neither "
            "--pretrained nor --weights): the atlas shows an untrained network. For "
            "trained weights pass --pretrained (needs a network) or --weights FILE.",
            file=sys.stderr,
            flush=True,
        )
    if args.image_size:
        sized = ImageModel(loaded.model, image_size=args.image_size)
        loaded = dataclasses.replace(loaded, model=sized)
    _move_to_device(loaded.model, args.device)
    preset, steps = _default_recipe(args)
    build_atlas(
        loaded,
        args.images,
        args.out,
        layers=args.layers.split(",") if args.layers else None,
        units=args.units,
        k=args.k,
        preset=preset,
        steps=steps,
        seed=args.seed,
        batch_size=args.batch_size,
        fv_batch=args.fv_batch,
        scenes=args.scenes,
    )
    return 0


def _move_to_device(model: torch.nn.Module, name: str | None) -> None:
    """The model on ``--device`` (default: this process's GPU under torchrun, else the
    first GPU, else the CPU); a device that does not parse or cannot be used is an error
    message, not a traceback."""
    local_rank = os.environ.get("LOCAL_RANK", "0")  # set by torchrun: one GPU per process
    if name is None:
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as error:  # no driver / not compiled with CUDA
        detail = " ".join(str(error).split())[:200]
        raise ValueError(
            f"cannot use --device {name}: {detail}. Leave --device out to use what is here"
        ) from error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="captum-vit",
        description="What Vision Transformers learn, from the command line (also "
        "python -m captum_vit). The main job is atlas; see captum-vit atlas --help.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_atlas_parser(sub)
    sub.add_parser(
        "layouts",
        help="token layouts of many architectures, early-exit capture",
        description="Resolve the token layout of one layer of each of a set of timm "
        "architectures (random weights, small configurations, no network): the kind of "
        "output, the patch grid and the prefix tokens; then time the early-exit capture of "
        "a middle block against a full forward.",
    )
    layout = sub.add_parser(
        "layout",
        help="token layout of one layer of a timm or open_clip model (all its blocks without "
        "a layer)",
        description="Print the token layout of one layer of a timm or open_clip model "
        "(random weights unless --pretrained), measured in one "
        "forward pass: how its output is laid out (tokens or a feature map), the patch grid, "
        "the prefix tokens (cls, distillation, registers) and the number of channels. "
        "Without a layer, a table of the layouts of all its blocks.",
    )
    layout.add_argument(
        "model",
        help="timm model name, e.g. vit_tiny_patch16_224, open_clip model name, e.g. "
        "ViT-B-32 (its image tower), Hugging Face model directory or module:function",
    )
    layout.add_argument(
        "layer",
        nargs="?",
        default=None,
        help="dotted path of the layer, e.g. blocks.3.mlp.act (default: every block's output)",
    )
    layout.add_argument(
        "--img-size",
        "--image-size",
        type=_image_size,
        default=None,
        help="input size, N or HxW (default: the model's own; needed for a model that "
        "records none)",
    )
    layout.add_argument(
        "--pretrained",
        action="store_true",
        help="download timm's weights (needs a network; the layout is the same without them)",
    )
    args = parser.parse_args(argv)
    if args.command == "layouts":
        return layouts()
    command = atlas_command if args.command == "atlas" else layout_command
    try:
        return command(args)
    except (
        ValueError,
        TypeError,
        FileNotFoundError,
        IndexError,
        ImportError,
        FloatingPointError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run() -> int:
    """The program's entry point (``captum-vit``, ``python -m captum_vit``): :func:`main`
    in a process whose freed memory is kept for reuse (see :mod:`captum_vit._memory`)."""
    keep_freed_memory()
    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # output piped into head & co., which closed it early
        # Python flushes stdout again at exit: point it at devnull so that flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(run())

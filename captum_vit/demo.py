"""The main job: what the bundled zoo ViT learned, in one command (offline, CPU).

``captum-vit demo`` (or ``python -m captum_vit demo``) loads the bundled ViT trained on
``SyntheticScenes`` and writes to ``--out`` (default ``captum_vit_demo/``):

* ``class_visualizations.png``: one FeatureVisualization per class logit;
* ``units_block{b}.png`` : for a few hidden units (``mlp.act``, the paper's layer) of a
  middle block, the feature visualization next to the unit's top activating scenes with
  their patch activation maps (TopActivatingExamples + PatchActivationMap);
* ``locality.png``: how much spatial information each block keeps (SpatialLocalityProbe)
  and the paper's cls-isolation / tear sweeps;
* ``index.html``: a page with all of them and the figures printed here.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

import torch

from . import zoo
from .activation_map import PatchActivationMap
from .locality import SpatialLocalityProbe, plot_locality, pooling_experiments
from .models import ImageModel
from .optim import FeatureVisualization
from .render import image_grid, save_png, unit_grid
from .top_examples import TopActivatingExamples


def _accuracy(model: torch.nn.Module, data: zoo.SyntheticScenes) -> float:
    batch = data.batch(range(len(data)))
    with torch.no_grad():
        predicted = ImageModel(model)(batch["image"]).argmax(1)
    return 100.0 * (predicted == batch["label"]).float().mean().item()


def run_demo(out: str | Path = "captum_vit_demo", *, steps: int = 256, scenes: int = 1024) -> Path:
    """Run the demo and return the path of its ``index.html``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vit = zoo.load_model("vit")
    names = vit.class_names
    block = len(vit.blocks) // 2
    layer = f"blocks.{block}.mlp.act"
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    say(
        f"zoo ViT ({sum(p.numel() for p in vit.parameters()) / 1e6:.2f} M parameters, "
        f"{len(vit.blocks)} blocks, classes: {', '.join(names)})"
    )
    say(
        f"held-out top-1 on 512 fresh scenes: {_accuracy(vit, zoo.SyntheticScenes(512, seed=1)):.1f}%"
    )

    start = time.perf_counter()
    classes = FeatureVisualization(vit, "head").attribute(
        target=list(range(len(names))), preset="lucid", steps=steps, seed=0
    )
    save_png(image_grid(classes, labels=names, ncols=len(names)), out / "class_visualizations.png")
    with torch.no_grad():
        own = ImageModel(vit)(classes).argmax(1)
    say(
        f"class visualizations ({steps} steps, lucid preset): {time.perf_counter() - start:.1f} s; "
        f"the ViT classifies {int((own == torch.arange(len(names))).sum())}/{len(names)} "
        "of them as their class"
    )

    start = time.perf_counter()
    data = zoo.SyntheticScenes(scenes, seed=1)
    examples = TopActivatingExamples(vit, layer, k=6).attribute(data.batches(128))
    best = examples.scores[:, 0].topk(4).indices
    units = examples.channels[best].tolist()
    say(
        f"top examples of all {len(examples.channels)} units of {layer} over {scenes} scenes: "
        f"{time.perf_counter() - start:.1f} s; most active units {units}"
    )

    start = time.perf_counter()
    visualizations = FeatureVisualization(vit, layer).attribute(
        target=units, preset="lucid", steps=steps, seed=0
    )
    pam = PatchActivationMap(vit, layer)
    rows = []
    for row, unit in enumerate(units):
        position = int((examples.channels == unit).nonzero()[0])
        indices = examples.indices[position].tolist()
        top = data.batch(indices)["image"]
        maps = pam.attribute(top, target=unit)
        rows.append(
            unit_grid(
                top,
                maps,
                visualization=visualizations[row],
                cell_size=128,
                scores=examples.scores[position].tolist(),
            )
        )
        kinds = [zoo.CLASSES[label] for label in data.batch(indices)["label"].tolist()]
        say(f"  unit {unit}: top scenes show {', '.join(kinds)}")
    save_png(image_grid(rows, ncols=1), out / f"units_block{block}.png")
    say(
        f"unit visualizations (lucid preset, {steps} steps) and maps: "
        f"{time.perf_counter() - start:.1f} s"
    )

    start = time.perf_counter()
    probe = SpatialLocalityProbe(vit)
    report = probe.attribute(data.batch([0, 1])["image"])
    pooling = pooling_experiments(vit, [data.batch(range(256))])
    plot_locality(report, pooling=pooling, path=out / "locality.png")
    values = ", ".join(f"{v:.2f}" for v in report.locality.tolist())
    say(f"locality per block ({', '.join(report.layers)}): {values}")
    say(
        f"natural top-1 {pooling.natural.top1:.1f}%, isolated cls "
        + ", ".join(f"L={k}: {v.top1:.1f}%" for k, v in pooling.isolated_cls.items())
        + f"; patch average {pooling.patch_average.top1:.1f}%, best patch "
        f"{pooling.patch_max.top1:.1f}% ({time.perf_counter() - start:.1f} s)"
    )

    page = out / "index.html"
    page.write_text(_html(lines, block))
    say(f"wrote {page}")
    return page


def _html(lines: list[str], block: int) -> str:
    items = "\n".join(f"<li>{html.escape(line)}</li>" for line in lines)
    figures = [
        ("class_visualizations.png", "One feature visualization per class logit."),
        (
            f"units_block{block}.png",
            "Hidden units of a middle block: visualization, then the "
            "unit's top scenes with patch activation maps.",
        ),
        ("locality.png", "Spatial locality per block and the paper's pooling experiments."),
    ]
    body = "\n".join(
        f'<figure><img src="{name}" style="max-width:100%"><figcaption>{html.escape(text)}'
        "</figcaption></figure>"
        for name, text in figures
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>captum_vit demo</title>"
        "</head><body style='font-family:sans-serif;max-width:1100px;margin:auto'>"
        f"<h1>What the zoo ViT learned</h1><ul>{items}</ul>{body}</body></html>"
    )

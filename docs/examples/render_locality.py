"""Rendered example: spatial locality of the zoo ViT next to the zoo CNN, and the paper's
pooling experiments (Table 1) on the zoo ViT.

Writes ``docs/images/zoo_locality.png``: locality per block (ViT and CNN on a relative-depth
axis), the isolated-cls and tear sweeps, the per-position accuracy of the head applied to
each patch token, and the central token's receptive field at a few depths of each model.

    .venv/bin/python docs/examples/render_locality.py [--images 512]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402

import captum_vit as cv  # noqa: E402
from captum_vit import zoo  # noqa: E402
from captum_vit.locality import plot_locality  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "images" / "zoo_locality.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="held-out scenes for Table 1")
    args = parser.parse_args()
    torch.manual_seed(0)
    vit, cnn = zoo.load_model("vit"), zoo.load_model("cnn")
    data = zoo.SyntheticScenes(args.images, seed=1)
    probe_images = data.batch([0, 1])["image"]
    vit_report = cv.SpatialLocalityProbe(vit).attribute(probe_images)
    cnn_report = cv.SpatialLocalityProbe(cnn).attribute(probe_images)
    batches = [(b["image"], b["label"]) for b in data.batches(128)]
    pooling = cv.pooling_experiments(vit, batches)
    print(vit_report, cnn_report, pooling, sep="\n")
    plot_locality(vit_report, cnn_report, pooling, labels=("zoo ViT", "zoo CNN"), path=OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

"""The paper's foreground / background (Table 2) and low-/high-pass experiments on the zoo
ViT and CNN, on fresh held-out SyntheticScenes images.

Prints markdown tables (for the model card and the note) and saves figures under
``docs/images/``: sample scenes, the fore/back bars and the frequency curves.

    python benchmarks/zoo_experiments.py [--images 2000] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

from captum_vit import zoo  # noqa: E402
from captum_vit.models import ImageModel  # noqa: E402
from captum_vit.zoo.experiments import _boxes  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"
CUTOFFS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1, help="held-out seed (training used 0)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)

    data = zoo.SyntheticScenes(args.images, seed=args.seed)
    unbiased = zoo.SyntheticScenes(args.images, seed=args.seed, background_bias=0.0)
    models = {name: zoo.load_model(name) for name in ("vit", "cnn")}
    chance = 100 / len(zoo.CLASSES)

    start = time.perf_counter()
    fb_box = {n: zoo.foreground_background(m, data, region="box") for n, m in models.items()}
    fb_mask = {n: zoo.foreground_background(m, data, region="mask") for n, m in models.items()}
    freq = {n: zoo.frequency_sensitivity(m, data, CUTOFFS) for n, m in models.items()}
    no_bias = {n: zoo.foreground_background(m, unbiased, region="box") for n, m in models.items()}
    print(
        f"evaluated in {time.perf_counter() - start:.0f}s on {args.images} images, seed {args.seed}\n"
    )

    print("## Foreground / background (top-1 / top-5 %, other part black)\n")
    print(
        "| model | region | full | fg only | bg only | norm. fg top-5 | norm. bg top-5 | norm. fg top-1 | norm. bg top-1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, table in (("box", fb_box), ("mask", fb_mask), ("box, bias 0", no_bias)):
        for n, r in table.items():
            print(
                f"| {n} | {label} | {r.full_top1:.1f} / {r.full_top5:.1f} | {r.foreground_top1:.1f} / "
                f"{r.foreground_top5:.1f} | {r.background_top1:.1f} / {r.background_top5:.1f} | "
                f"{r.normalized_foreground:.1f} | {r.normalized_background:.1f} | "
                f"{r.normalized_foreground_top1:.1f} | {r.normalized_background_top1:.1f} |"
            )
    print("\n## Low-pass / high-pass (top-1 %; cut-off as a fraction of Nyquist)\n")
    print(
        "| model | clean | "
        + " | ".join(f"low {c}" for c in CUTOFFS)
        + " | "
        + " | ".join(f"high {c}" for c in CUTOFFS)
        + " |"
    )
    print("|---|---|" + "---|" * (2 * len(CUTOFFS)))
    for n, r in freq.items():
        cells = [f"{v:.1f}" for v in (*r.low_pass_top1, *r.high_pass_top1)]
        print(f"| {n} | {r.clean_top1:.1f} | " + " | ".join(cells) + " |")

    print("\n## Foreground only, box cut: what fills the outside (top-1 %)\n")
    print_box_fills(models, {"as trained": data, "background_bias 0": unbiased})

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    zoo.plot_foreground_background(fb_box, top=1, ax=axes[0], chance=chance)
    axes[0].set_title("foreground / background (box cut), top-1")
    zoo.plot_frequency_sensitivity(freq, ax=axes[1], chance=chance)
    axes[1].set_title("low-pass (solid) / high-pass (dashed)")
    fig.tight_layout()
    fig.savefig(OUT / "zoo_fore_back_frequency.png", dpi=120)

    batch = data.batch(range(8))
    box = _boxes(batch["mask"])
    rows = [
        batch["image"],
        batch["image"] * box,
        batch["image"] * (1 - box),
        zoo.fft_filter(batch["image"], 0.2, "low"),
        zoo.fft_filter(batch["image"], 0.2, "high"),
    ]
    save_image(torch.cat(rows), OUT / "zoo_scenes_variants.png", nrow=8, padding=2, pad_value=1.0)
    save_image(
        data.batch(range(64))["image"], OUT / "zoo_scenes.png", nrow=8, padding=2, pad_value=1.0
    )
    print(f"\nsaved figures under {OUT}")


@torch.no_grad()
def print_box_fills(models: dict, datasets: dict[str, zoo.SyntheticScenes]) -> None:
    """Top-1 on the box cut with the outside black (the paper's cut), grey, the image's own
    mean background colour (no edge where the box meets the fill) or another image's
    (an edge of a random contrast), and the class most often given with black: separates
    what the missing background costs from what the box's edge costs."""
    fill_names = ("black", "grey", "own mean background colour", "another image's")
    print("| model | data | " + " | ".join(fill_names) + " | most frequent wrong class, black |")
    print("|---|---|" + "---|" * (len(fill_names) + 1))
    for data_name, data in datasets.items():
        batch = data.batch(range(len(data)))
        images, labels, mask = batch["image"], batch["label"], batch["mask"]
        box = _boxes(mask)
        background = (images * (1 - mask)).sum((2, 3), keepdim=True) / (1 - mask).sum(
            (2, 3), keepdim=True
        )
        fills = (
            torch.zeros_like(background),
            torch.full_like(background, 0.5),
            background,
            background.roll(1, 0),
        )
        for name, model in models.items():
            classifier = ImageModel(model)
            preds = [classifier(images * box + fill * (1 - box)).argmax(1) for fill in fills]
            cells = [f"{(pred == labels).float().mean().item() * 100:.1f}" for pred in preds]
            black = preds[0]
            errors = torch.bincount(black[black != labels], minlength=len(zoo.CLASSES))
            top = int(errors.argmax())
            wrong = f"{zoo.CLASSES[top]} ({int(errors[top])} of {int(errors.sum())} errors)"
            print(f"| {name} | {data_name} | " + " | ".join(cells) + f" | {wrong} |")


if __name__ == "__main__":
    main()

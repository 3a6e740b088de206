"""Figure of a :class:`~captum_vit.locality.reports.LocalityReport` (and optionally a CNN's report
and a :class:`~captum_vit.locality.reports.PoolingReport`): locality per layer, the receptive field
of the central token at a few depths, the accuracy sweeps and the per-position accuracy."""

from __future__ import annotations

from pathlib import Path

import torch

from .reports import LocalityReport, PoolingReport

__all__ = ["plot_locality"]


def plot_locality(
    report: LocalityReport,
    cnn: LocalityReport | None = None,
    pooling: PoolingReport | None = None,
    *,
    labels: tuple[str, str] = ("ViT", "CNN"),
    fields: int = 6,
    path: str | Path | None = None,
):
    """Plot locality per layer (ViT next to a CNN when both are given), the central
    token's receptive field at ``fields`` depths per model, and the pooling experiments.

    Args:
        report: the (ViT) locality report.
        cnn: optional second report (e.g. a ResNet's), drawn on a relative-depth axis.
        pooling: optional accuracy experiments: isolate / tear sweeps and the patch map.
        labels: legend names of ``report`` and ``cnn``.
        fields: how many layers' central-token fields to show per model (0: none).
        path: if given, the figure is also saved there (PNG, 120 dpi).

    Returns:
        The ``matplotlib.figure.Figure``.

    Examples::

        >>> fig = plot_locality(vit_report, resnet_report, pooling, path="locality.png")
    """
    import matplotlib

    if path is not None and matplotlib.get_backend().lower() not in ("agg", "pdf", "svg"):
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    reports = [(labels[0], report)] + ([(labels[1], cnn)] if cnn is not None else [])
    top = 1 + (2 if pooling is not None else 0)
    field_rows = len(reports) if fields > 0 else 0
    columns = max(top, fields if field_rows else 1)
    fig = plt.figure(figsize=(3.2 * columns, 3.4 * (1 + field_rows)))
    grid = fig.add_gridspec(1 + field_rows, columns)
    span = columns // top
    ax = fig.add_subplot(grid[0, 0:span])
    _locality_axis(ax, reports)
    if pooling is not None:
        _sweep_axis(fig.add_subplot(grid[0, span : 2 * span]), pooling)
        _patch_axis(fig, fig.add_subplot(grid[0, 2 * span : 3 * span]), pooling)
    for row, (name, item) in enumerate(reports[:field_rows], start=1):
        for column, layer in enumerate(_spread(len(item.layers), min(fields, columns))):
            _field_axis(fig.add_subplot(grid[row, column]), name, item, layer)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _locality_axis(ax, reports) -> None:
    relative = len(reports) > 1
    for name, item in reports:
        count = len(item.layers)
        xs = [i / max(count - 1, 1) for i in range(count)] if relative else list(range(count))
        ax.plot(xs, item.locality.tolist(), marker="o", label=name)
        h, w = item.grids[-1]
        ax.axhline(1 / (h * w), linestyle=":", linewidth=1, color=ax.lines[-1].get_color())
    if not relative:
        names = reports[0][1].layers
        step = max(1, len(names) // 12)
        ax.set_xticks(range(0, len(names), step))
        ax.set_xticklabels(
            [_short(n, s) for n, s in zip(names, reports[0][1].sites, strict=True)][::step],
            rotation=60,
            fontsize=7,
        )
    ax.set_xlabel("relative depth" if relative else "layer")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("locality (share of own patch)")
    ax.set_title("receptive-field locality (dotted: uniform)", fontsize=9)
    ax.legend(fontsize=8)


def _short(name: str, site: str) -> str:
    return name + (" (in)" if site == "input" else "")


def _sweep_axis(ax, pooling: PoolingReport) -> None:
    for label, sweep in (("isolated cls", pooling.isolated_cls), ("tear", pooling.tear)):
        if sweep:
            keys = sorted(sweep)
            ax.plot(keys, [sweep[k].top1 for k in keys], marker="o", label=f"{label} (top-1)")
    ax.axhline(pooling.natural.top1, color="k", linewidth=1, label="natural")
    ax.axhline(pooling.patch_average.top1, color="gray", linestyle="--", label="patch average")
    ax.axhline(pooling.patch_max.top1, color="gray", linestyle=":", label="patch max")
    ax.set_xlabel("blocks L")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"pooling experiments ({pooling.num_images} images)", fontsize=9)
    ax.legend(fontsize=7)


def _patch_axis(fig, ax, pooling: PoolingReport) -> None:
    image = ax.imshow(pooling.patch_accuracy.numpy(), cmap="viridis", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title("head on each patch token: top-1 %", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _field_axis(ax, name: str, item: LocalityReport, layer: int) -> None:
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    field = item.field(layer)
    h, w = field.shape[:2]
    cells = item.positions[layer]
    # Nearest probed position to the centre (all are probed unless positions=n).
    flat = cells[torch.argmin((cells // w - h // 2).abs() + (cells % w - w // 2).abs())]
    i, j = int(flat) // w, int(flat) % w
    # Log colours: the own cell holds most of the mass, the spread is orders smaller.
    shares = field[i, j].clamp_min(1e-4).numpy()
    ax.imshow(shares, cmap="magma", norm=LogNorm(vmin=1e-4, vmax=1.0))
    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=1.5))
    ax.set_title(
        f"{name} {_short(item.layers[layer], item.sites[layer])}\n"
        f"token ({i},{j}) own {float(field[i, j, i, j]):.2f} (log colours)",
        fontsize=7,
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _spread(count: int, wanted: int) -> list[int]:
    if wanted <= 0 or count == 0:
        return []
    if wanted >= count:
        return list(range(count))
    return (
        sorted({round(k * (count - 1) / (wanted - 1)) for k in range(wanted)})
        if wanted > 1
        else [count - 1]
    )

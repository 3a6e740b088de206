"""Train a zoo model from scratch on :class:`~captum_vit.zoo.SyntheticScenes`, on CPU.

Usage::

    python -m captum_vit.zoo.train vit            # full run, writes zoo/weights/vit.safetensors
    python -m captum_vit.zoo.train cnn --quick --out /tmp/cnn.safetensors   # a few steps

Every training image is fresh (item ``step * batch + i`` of seed ``--seed``); the held-out
accuracy is measured on seed ``--eval-seed``, which training never sees (the two must
differ). The record saved with the weights holds the command, the settings, wall-clock and
CPU time and the machine's load average during the run.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .._base import check_count
from ..models import ImageModel
from .data import SyntheticScenes
from .registry import MODEL_NAMES, WEIGHTS_DIR, build_model, load_model, save_model

__all__ = ["TrainConfig", "evaluate", "main", "train"]

Log = Callable[[str], None]

#: The settings that count something, and what.
_COUNTS = {
    "steps": "optimizer steps",
    "batch_size": "scenes per step",
    "eval_images": "held-out scenes",
    "log_every": "steps between log lines",
}


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (the defaults of :data:`DEFAULTS` are the
    bundled models').

    ``patch_drop``: share of the patch tokens a ViT drops at random from each training
    image (timm's ``PatchDropout``; the cls token is kept) for the first
    ``patch_drop_until`` of the steps; the rest of the run sees every token. A step then
    costs about half, so more images fit in the same time. The model's architecture and
    weights' names do not change (the module is swapped in for training only).
    """

    steps: int
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 60
    betas: tuple[float, float] = (0.9, 0.99)
    label_smoothing: float = 0.0
    clip_grad: float = 1.0
    attention_init: str = "default"
    seed: int = 0
    eval_seed: int = 1
    eval_images: int = 2000
    background_bias: float = 0.5
    bf16: bool = False
    log_every: int = 50
    patch_drop: float = 0.0
    patch_drop_until: float = 0.8

    def __post_init__(self) -> None:
        """Raises ValueError for a setting that cannot train, or for ``seed == eval_seed``
        (the held-out images would be training images, the accuracy a training one)."""
        if self.seed == self.eval_seed:
            raise ValueError(
                f"the training seed and the held-out seed are both {self.seed}: the held-out "
                "images would be training images. Pick another --seed or --eval-seed "
                "(TrainConfig.seed / eval_seed)"
            )
        for name, meaning in _COUNTS.items():
            check_count(getattr(self, name), name, meaning)
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 steps, got {self.warmup}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.clip_grad) and self.clip_grad > 0):
            raise ValueError(f"clip_grad must be a positive number, got {self.clip_grad}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("label_smoothing", "patch_drop"):  # 1 would leave nothing to learn
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("patch_drop_until", "background_bias"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.attention_init not in ("default", "mimetic"):
            raise ValueError(
                f"attention_init must be 'default' or 'mimetic', got {self.attention_init!r}"
            )


#: Full-run settings per model; ``--quick`` overrides steps and sizes.
DEFAULTS: dict[str, dict] = {
    "vit": {
        "steps": 12500,
        "batch_size": 64,
        "lr": 7e-4,
        "warmup": 200,
        "patch_drop": 0.5,
        "patch_drop_until": 0.8,
        "log_every": 250,
    },
    "cnn": {"steps": 800, "lr": 2e-3, "log_every": 100},
}

#: Settings of ``--quick`` (a smoke test of the whole pipeline in seconds).
QUICK = {"steps": 3, "batch_size": 8, "warmup": 1, "eval_images": 16, "log_every": 1}


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: SyntheticScenes, batch_size: int = 250) -> float:
    """Top-1 accuracy (%) of a zoo model on ``data`` (images normalized by its config)."""
    was_training = model.training
    classifier = ImageModel(model).eval()
    correct = 0
    for batch in data.batches(batch_size):
        correct += int((classifier(batch["image"]).argmax(1) == batch["label"]).sum())
    model.train(was_training)
    return 100.0 * correct / max(len(data), 1)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr``, then cosine decay to 0 at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _total_seconds(record: dict | None) -> float:
    """Wall-clock seconds of all stages of a training record (0 for none)."""
    if record is None:
        return 0.0
    return record.get("total_train_seconds", record["train_seconds"])


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _initial_model(
    name: str, cfg: TrainConfig, init: str | Path | None
) -> tuple[torch.nn.Module, dict | None, int]:
    """A fresh model, or the one in ``init`` with its record and the first unseen item."""
    if init is None:
        return build_model(name), None, 0
    model = load_model(name, init).train()
    previous = model.zoo_info
    config = previous["config"]
    if config["seed"] != cfg.seed:
        raise ValueError("a continued run must use the seed of the run it continues")
    first_item = previous.get("last_item", config["steps"] * config["batch_size"])
    return model, previous, first_item


def _factors(
    width: int, alpha: float, beta: float, rank: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)``, each ``(width, rank)``, with ``a @ b.T`` the best rank-``rank``
    approximation of ``alpha * Z + beta * I`` (``Z`` Gaussian, variance ``1 / width``)."""
    noise = torch.randn(width, width, generator=generator) / math.sqrt(width)
    u, s, vh = torch.linalg.svd(alpha * noise + beta * torch.eye(width))
    root = s[:rank].sqrt()
    return u[:, :rank] * root, vh[:rank].T * root


@torch.no_grad()
def mimetic_attention_init(model: torch.nn.Module, generator: torch.Generator) -> int:
    """Initialize every timm self-attention layer of ``model`` "mimetically" (Trockman &
    Kolter, ICML 2023): each head's query-key product ``W_q W_k^T`` starts near
    ``0.7 Z + 0.7 I`` (tokens attend to similar tokens, the diagonal of a trained ViT's
    attention) and the value-projection product ``W_v W_proj`` near ``0.4 Z - 0.4 I``, with
    ``Z`` random of variance ``1 / width``. Only weights change: the architecture and its
    layer names stay as built. Returns the number of attention layers initialized."""
    count = 0
    for module in model.modules():
        qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
        if not isinstance(qkv, torch.nn.Linear) or not isinstance(proj, torch.nn.Linear):
            continue
        width, heads = qkv.in_features, module.num_heads
        head_dim = width // heads

        for h in range(heads):
            rows = slice(h * head_dim, (h + 1) * head_dim)
            w_q, w_k = _factors(width, 0.7, 0.7, head_dim, generator)
            qkv.weight[rows] = w_q.T  # q = x W_q, k = x W_k: q k^T = x W_q W_k^T x^T
            qkv.weight[width + h * head_dim : width + (h + 1) * head_dim] = w_k.T
        w_v, w_p = _factors(width, 0.4, -0.4, width, generator)
        qkv.weight[2 * width :] = w_v.T
        proj.weight.copy_(w_p)  # v = x w_v; output v w_p^T = x (0.4 Z - 0.4 I)
        count += 1
    return count


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on biases, norms, tokens' scales)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
    )


def _train_step(
    classifier: ImageModel,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    cfg: TrainConfig,
    lr: float,
) -> tuple[float, float]:
    """One optimizer step on ``batch``; returns its loss and accuracy (fraction)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        logits = classifier(batch["image"])
    loss = F.cross_entropy(logits.float(), batch["label"], label_smoothing=cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_grad:
        torch.nn.utils.clip_grad_norm_(classifier.parameters(), cfg.clip_grad)
    optimizer.step()
    accuracy = (logits.argmax(1) == batch["label"]).float().mean().item()
    return loss.item(), accuracy


@dataclass
class _Progress:
    """Running means between log lines, and the load average seen at each of them."""

    start: float = field(default_factory=time.perf_counter)
    cpu_start: float = field(default_factory=_cpu_seconds)
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)

    def add(self, loss: float, accuracy: float) -> None:
        self.losses.append(loss)
        self.accuracies.append(accuracy)

    def line(
        self, step: int, cfg: TrainConfig, held_out_accuracy: float, held_out_images: int
    ) -> str:
        loss = sum(self.losses) / len(self.losses)
        accuracy = 100 * sum(self.accuracies) / len(self.accuracies)
        self.losses.clear()
        self.accuracies.clear()
        self.loads.append(os.getloadavg()[0])
        return (
            f"step {step}/{cfg.steps}  loss {loss:.3f}  train acc {accuracy:.1f}%  "
            f"held-out acc {held_out_accuracy:.1f}% ({held_out_images} imgs)  "
            f"wall {self.wall():.0f}s  cpu {self.cpu():.0f}s  load {self.loads[-1]:.1f}"
        )

    def wall(self) -> float:
        return time.perf_counter() - self.start

    def cpu(self) -> float:
        return _cpu_seconds() - self.cpu_start


def _run_steps(
    model: torch.nn.Module,
    cfg: TrainConfig,
    first_item: int,
    log: Log,
    save_every: int = 0,
    save: Callable[[int], None] | None = None,
) -> _Progress:
    """The training loop: fresh images ``first_item ...`` of seed ``cfg.seed``."""
    classifier = ImageModel(model)  # normalizes [0, 1] images with the model's mean / std
    data = SyntheticScenes(
        first_item + cfg.steps * cfg.batch_size,
        seed=cfg.seed,
        background_bias=cfg.background_bias,
    )
    held_out = SyntheticScenes(
        min(cfg.eval_images, 250), seed=cfg.eval_seed, background_bias=cfg.background_bias
    )
    optimizer = _optimizer(model, cfg)
    model.train()
    progress = _Progress()
    drop_steps = round(cfg.patch_drop_until * cfg.steps) if cfg.patch_drop else 0
    with _patch_dropout(model, cfg.patch_drop) as dropping:
        for step in range(cfg.steps):
            if step == drop_steps:
                dropping.stop()
            offset = first_item + step * cfg.batch_size
            batch = data.batch(range(offset, offset + cfg.batch_size))
            progress.add(*_train_step(classifier, optimizer, batch, cfg, _lr_at(step, cfg)))
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                accuracy = evaluate(model, held_out)
                log(progress.line(step + 1, cfg, accuracy, len(held_out)))
            if save is not None and save_every and (step + 1) % save_every == 0:
                save(step + 1)
    return progress


class _patch_dropout:  # noqa: N801 (a context manager, used like a function)
    """Swap a timm ViT's ``patch_drop`` module for ``PatchDropout(rate)`` (training
    only; the original module comes back on :meth:`stop` and on exit, also after an
    error). A rate of 0 changes nothing."""

    def __init__(self, model: torch.nn.Module, rate: float) -> None:
        self.model, self.rate, self.original = model, rate, None

    def __enter__(self) -> _patch_dropout:
        if self.rate:
            from timm.layers import PatchDropout

            if not hasattr(self.model, "patch_drop"):
                raise ValueError(f"{type(self.model).__name__} has no patch_drop module")
            self.original = self.model.patch_drop
            prefix = getattr(self.model, "num_prefix_tokens", 1)
            self.model.patch_drop = PatchDropout(self.rate, num_prefix_tokens=prefix)
        return self

    def stop(self) -> None:
        if self.original is not None:
            self.model.patch_drop, self.original = self.original, None

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _record(
    cfg: TrainConfig,
    progress: _Progress,
    accuracy: float,
    first_item: int,
    previous: dict | None,
) -> dict:
    """What the weights' metadata and the model card keep about a run."""
    wall, cpu = progress.wall(), progress.cpu()
    loads = progress.loads or [os.getloadavg()[0]]
    return {
        "train_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "total_train_seconds": round(wall + _total_seconds(previous), 1),
        "load_average_1min": {
            "mean": round(sum(loads) / len(loads), 2),
            "min": round(min(loads), 2),
            "max": round(max(loads), 2),
        },
        "first_item": first_item,
        "last_item": first_item + cfg.steps * cfg.batch_size,
        "previous": previous,
        "held_out_top1": round(accuracy, 2),
        "held_out": (
            f"SyntheticScenes({cfg.eval_images}, seed={cfg.eval_seed}, "
            f"background_bias={cfg.background_bias})"
        ),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }


def train(
    name: str,
    cfg: TrainConfig,
    log: Log = print,
    init: str | Path | None = None,
    save_every: int = 0,
    save: Callable[[torch.nn.Module, int], None] | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Train zoo model ``name`` with ``cfg``; returns the model (eval mode) and a record
    (wall and CPU time, load average, held-out accuracy, settings) for the weights'
    metadata and the model card.

    ``init``: continue from a weights file written by this script (a further stage with
    its own warm-up and cosine schedule); its training images are the next unseen items of
    the same seed, and its record is kept under ``"previous"``. ``save(model, step)`` is
    called every ``save_every`` steps (checkpoints of a long run).

    The config itself refuses bad settings (:class:`TrainConfig`), among them a training
    seed equal to the held-out seed.
    """
    torch.manual_seed(cfg.seed)
    model, previous, first_item = _initial_model(name, cfg, init)
    if cfg.attention_init == "mimetic" and init is None:
        mimetic_attention_init(model, torch.Generator().manual_seed(cfg.seed))
    checkpoint = None if save is None else (lambda step: save(model, step))
    progress = _run_steps(model, cfg, first_item, log, save_every, checkpoint)
    model.eval()
    held_out = SyntheticScenes(
        cfg.eval_images, seed=cfg.eval_seed, background_bias=cfg.background_bias
    )
    accuracy = evaluate(model, held_out)
    record = _record(cfg, progress, accuracy, first_item, previous)
    log(
        f"done in {record['train_seconds']:.0f}s wall, {record['cpu_seconds']:.0f}s CPU; "
        f"held-out top-1 {accuracy:.2f}% on {cfg.eval_images} images"
    )
    return model, record


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m captum_vit.zoo.train",
        description="Train a zoo model from scratch on the package's synthetic scenes, on "
        "CPU. The defaults are the bundled weights' settings.",
    )
    parser.add_argument("model", choices=MODEL_NAMES, help="which zoo model")
    parser.add_argument(
        "--quick", action="store_true", help="a few steps on small batches (for tests)"
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the training scenes and of the init"
    )
    parser.add_argument(
        "--eval-seed",
        type=int,
        default=TrainConfig.eval_seed,
        help=f"seed of the held-out scenes (default {TrainConfig.eval_seed}; not --seed)",
    )
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step")
    parser.add_argument(
        "--label-smoothing", type=float, default=None, help="of the cross-entropy loss"
    )
    parser.add_argument(
        "--patch-drop",
        type=float,
        default=None,
        help="ViT: share of patch tokens dropped per training image (first part of the run)",
    )
    parser.add_argument(
        "--patch-drop-until",
        type=float,
        default=None,
        help="share of the steps that drop patch tokens (default 0.8)",
    )
    parser.add_argument(
        "--attention-init",
        choices=("default", "mimetic"),
        default=None,
        help="initialization of the ViT's attention layers (see mimetic_attention_init)",
    )
    parser.add_argument(
        "--init", type=Path, default=None, help="continue from this weights file (next stage)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="torch CPU threads (default 2; on a machine busy with other jobs 1 is faster)",
    )
    parser.add_argument(
        "--save-every",
        type=int,
        default=0,
        help="also write a checkpoint (OUT with suffix .stepN) every this many steps",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="weights file (default: the bundled one)"
    )
    return parser


def _output_file(args: argparse.Namespace) -> Path:
    """``--out``, or the bundled weights (which only a full run may replace), checked
    before training starts."""
    if args.out is None:
        if args.quick:
            raise ValueError(
                "--quick would replace the bundled weights with a smoke-test model: pass --out FILE"
            )
        return WEIGHTS_DIR / f"{args.model}.safetensors"
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(
            f"--out {out} is a folder: name the weights file, e.g. "
            f"{out / (args.model + '.safetensors')}"
        )
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {out}: {parent} is a file, not a folder")
            break
    return out


def _config(args: argparse.Namespace) -> TrainConfig:
    """The run's settings: the model's defaults, then ``--quick``, then explicit flags."""
    settings = dict(DEFAULTS[args.model])
    if args.quick:
        settings.update(QUICK)
    for key in (
        "steps",
        "lr",
        "warmup",
        "batch_size",
        "label_smoothing",
        "attention_init",
        "patch_drop",
        "patch_drop_until",
    ):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    return TrainConfig(seed=args.seed, eval_seed=args.eval_seed, **settings)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = _config(args)
        out = _output_file(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    command = "python -m captum_vit.zoo.train " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )

    def checkpoint(model: torch.nn.Module, step: int) -> None:
        info = {"command": command, "checkpoint_step": step, "config": vars(cfg)}
        save_model(model, args.model, out.with_suffix(f".step{step}.safetensors"), info=info)

    model, record = train(
        args.model,
        cfg,
        log=lambda msg: print(msg, flush=True),
        init=args.init,
        save_every=args.save_every,
        save=checkpoint,
    )
    record["command"] = command
    save_model(model, args.model, out, info=record)
    print(f"saved {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

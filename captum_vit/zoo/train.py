"""Train a zoo model from scratch on :class:`~captum_vit.zoo.SyntheticScenes`, on CPU.

Usage::

    python -m captum_vit.zoo.train vit            # full run, writes zoo/weights/vit.safetensors
    python -m captum_vit.zoo.train cnn --quick --out /tmp/cnn.safetensors   # a few steps

Every training image is fresh (item ``step * batch + i`` of seed ``--seed``); the held-out
accuracy is measured on seed ``--eval-seed``, which training never sees.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models import ImageModel
from .data import SyntheticScenes
from .registry import MODEL_NAMES, WEIGHTS_DIR, build_model, load_model, save_model

__all__ = ["TrainConfig", "evaluate", "main", "train"]


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (the defaults are the bundled models')."""

    steps: int
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 60
    seed: int = 0
    eval_seed: int = 1
    eval_images: int = 2000
    background_bias: float = 0.5
    bf16: bool = True
    log_every: int = 50


#: Full-run settings per model; ``--quick`` overrides steps and sizes.
DEFAULTS: dict[str, dict] = {
    "vit": {
        "steps": 3000,
        "batch_size": 32,
        "lr": 1e-3,
        "warmup": 100,
        "bf16": False,
        "log_every": 250,
    },
    "cnn": {"steps": 800, "lr": 2e-3, "bf16": False, "log_every": 100},
}


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
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _total_seconds(record: dict | None) -> float:
    """Wall-clock seconds of all stages of a training record (0 for none)."""
    if record is None:
        return 0.0
    return record.get("total_train_seconds", record["train_seconds"])


def train(
    name: str, cfg: TrainConfig, log=print, init: str | Path | None = None
) -> tuple[torch.nn.Module, dict]:
    """Train zoo model ``name`` with ``cfg``; returns the model (eval mode) and a record
    (time, held-out accuracy, settings) for the weights' metadata and the model card.

    ``init``: continue from a weights file written by this script (a further stage with
    its own warm-up and cosine schedule); its training images are the next unseen items of
    the same seed, and its record is kept under ``"previous"``."""
    torch.manual_seed(cfg.seed)
    previous, first_item = None, 0
    if init is not None:
        model = load_model(name, init).train()
        previous = model.zoo_info
        config = previous["config"]
        first_item = previous.get("last_item", config["steps"] * config["batch_size"])
        if previous["config"]["seed"] != cfg.seed:
            raise ValueError("a continued run must use the seed of the run it continues")
    else:
        model = build_model(name)
    classifier = ImageModel(model)  # normalizes [0, 1] images with the model's mean / std
    last_item = first_item + cfg.steps * cfg.batch_size
    data = SyntheticScenes(last_item, seed=cfg.seed, background_bias=cfg.background_bias)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.99),
    )
    held_out = SyntheticScenes(
        min(cfg.eval_images, 250), seed=cfg.eval_seed, background_bias=cfg.background_bias
    )
    model.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    running = []
    for step in range(cfg.steps):
        offset = first_item + step * cfg.batch_size
        batch = data.batch(range(offset, offset + cfg.batch_size))
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = classifier(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["label"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running.append((loss.item(), (logits.argmax(1) == batch["label"]).float().mean().item()))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            loss_avg = sum(r[0] for r in running) / len(running)
            acc_avg = 100 * sum(r[1] for r in running) / len(running)
            running.clear()
            val = evaluate(model, held_out)
            log(
                f"step {step + 1}/{cfg.steps}  loss {loss_avg:.3f}  train acc {acc_avg:.1f}%  "
                f"held-out acc {val:.1f}% (250 imgs)  {time.perf_counter() - start:.0f}s"
            )
    train_seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    model.eval()
    accuracy = evaluate(
        model,
        SyntheticScenes(cfg.eval_images, seed=cfg.eval_seed, background_bias=cfg.background_bias),
    )
    record = {
        "train_seconds": round(train_seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "total_train_seconds": round(train_seconds + _total_seconds(previous), 1),
        "first_item": first_item,
        "last_item": last_item,
        "previous": previous,
        "held_out_top1": round(accuracy, 2),
        "held_out": f"SyntheticScenes({cfg.eval_images}, seed={cfg.eval_seed}, background_bias={cfg.background_bias})",
        "config": {k: v for k, v in vars(cfg).items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    log(f"done in {train_seconds:.0f}s; held-out top-1 {accuracy:.2f}% on {cfg.eval_images} images")
    return model, record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m captum_vit.zoo.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("model", choices=MODEL_NAMES)
    parser.add_argument(
        "--quick", action="store_true", help="a few steps on small batches (for tests)"
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument(
        "--init", type=Path, default=None, help="continue from this weights file (next stage)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is fastest on a busy shared machine; 2 on an idle one)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="weights file (default: the bundled one)"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    settings = dict(DEFAULTS[args.model])
    if args.quick:
        settings.update(steps=3, batch_size=8, warmup=1, eval_images=16, log_every=1)
    for key in ("steps", "lr", "warmup", "batch_size"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    cfg = TrainConfig(seed=args.seed, **settings)
    out = args.out or WEIGHTS_DIR / f"{args.model}.safetensors"
    model, record = train(args.model, cfg, log=lambda msg: print(msg, flush=True), init=args.init)
    record["command"] = "python -m captum_vit.zoo.train " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    save_model(model, args.model, out, info=record)
    print(f"saved {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

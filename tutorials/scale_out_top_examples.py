"""Top activating examples of the zoo ViT over a folder of PNG images, in one process or
sharded over several with ``torchrun`` (used by ``06_scaling_out.ipynb``).

    python scale_out_top_examples.py IMAGE_DIR OUT.pt
    torchrun --standalone --nproc_per_node 2 scale_out_top_examples.py IMAGE_DIR OUT.pt

Under ``torchrun`` every process joins a gloo process group, scans a contiguous shard of
the sorted file list (rank ``r`` takes the ``r``-th block), and
``TopActivatingExamples.attribute`` merges the candidates of all ranks exactly: every rank
gets the result one process gets over the whole folder, and rank 0 saves it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

import captum_vit as cv
from captum_vit import zoo

LAYER = "blocks.3.mlp.act"


class ImageFolder(Dataset):
    """The ``*.png`` files of a folder in sorted order, as RGB tensors in [0, 1]."""

    def __init__(self, folder: str | Path) -> None:
        self.files = sorted(Path(folder).glob("*.png"))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        pixels = np.asarray(Image.open(self.files[index]).convert("RGB"), dtype=np.float32)
        return torch.from_numpy(pixels / 255.0).permute(2, 0, 1)


def shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """Rank ``rank``'s contiguous block of the dataset."""
    bounds = np.linspace(0, len(dataset), world_size + 1).astype(int)
    return Subset(dataset, range(bounds[rank], bounds[rank + 1]))


def top_examples(folder: str | Path, k: int = 6, batch_size: int = 32) -> cv.ExampleSet:
    """Scan the folder (this process's shard under torch.distributed) for every unit's
    top-k images of the zoo ViT's ``blocks.3.mlp.act``."""
    dataset = ImageFolder(folder)
    if torch.distributed.is_initialized():
        dataset = shard(dataset, torch.distributed.get_rank(), torch.distributed.get_world_size())
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model = zoo.load_model("vit")
    return cv.TopActivatingExamples(model, LAYER, k=k).attribute(loader)


def main(folder: str, out: str) -> None:
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        torch.distributed.init_process_group("gloo")
    try:
        result = top_examples(folder)
        rank = torch.distributed.get_rank() if distributed else 0
        sys.stdout.write(f"rank {rank}: {result.num_images} images scanned in all\n")
        sys.stdout.flush()
        if rank == 0:
            result.save(out)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])

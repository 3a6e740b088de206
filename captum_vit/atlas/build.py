"""Building an atlas: validate everything, scan the images at all layers, visualize the units
(split over processes), then the per-model figures and the site.

Order of work, each step skipped where its files exist (resume / incremental):

1. checks that need no writing: the model, the layers (exist, have a patch grid), the
   images, the settings against an existing atlas in ``out``;
2. per layer, ``data/<layer>.scan.pt``: every unit's top-k images and the activation
   statistics (one pass over the images for all layers, split over processes);
3. per unit, its folder under ``layers/<layer>/`` (written by the process that owns its
   chunk; ``unit.json`` last);
4. by the first process: locality and Table 1 (``data/model.json``), the manifest and the
   pages, ``index.html`` last.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .._progress import resolve_progress
from ..capture import find_module, module_name, user_class_name
from ..layout import resolve_layout
from ..locality.probe import find_blocks, find_stages
from ..models import (
    ImageModel,
    _clip_image_tower,
    check_images,
    fixed_input_size,
    model_device,
    unwrap_vision,
    user_layer_path,
)
from ..optim.presets import get_preset
from .model_stats import layer_locality, pooling_table
from .pages import write_site
from .resume import AtlasFiles
from .scan import LayerScan, scan_layers
from .shard import Shard
from .sources import (
    ImageFiles,
    ImageTensor,
    LoadedModel,
    ZooScenes,
    open_images,
    weights_fingerprint,
)
from .units import FVSettings, select_units, unit_folder, visualize_units, write_unit

__all__ = ["build_atlas", "default_layers", "default_preset"]


#: How the MLP hidden activation (the paper's layer) of each block is named: timm
#: ``blocks.3.mlp.act``, Hugging Face ViT / DeiT / DINOv2 / CLIP ``...layers.3.mlp.activation_fn``
#: (DINOv3: ``model.layer.3.mlp.act_fn``), open_clip ``transformer.resblocks.3.mlp.gelu``.
MLP_HIDDEN_SUFFIXES = ("mlp.act", "mlp.activation_fn", "mlp.act_fn", "mlp.gelu")
_DOTTED_SUFFIXES = tuple(f".{suffix}" for suffix in MLP_HIDDEN_SUFFIXES)


def default_layers(model: nn.Module) -> list[str]:
    """Every block's MLP hidden layer, the paper's layer (a name ending in one of
    :data:`MLP_HIDDEN_SUFFIXES`: timm ``mlp.act``, Hugging Face ``mlp.activation_fn`` /
    ``mlp.act_fn`` (DINOv3), open_clip ``mlp.gelu``; torchvision's ``mlp.1``), else every
    block, else a timm model's stages (its ``feature_info``). Swin-V2-CR's
    ``attn.meta_mlp.act`` (its position-bias MLP) is not one. The names come from the
    module tree alone; the atlas leaves out those that turn out to have no patch grid
    (CaiT's class-attention blocks, the MLP of an attention-pool head), and where none of
    them has one (MobileViT's MLPs work on unfolded patches) it takes the next kind.

    Raises:
        ValueError: the model has none of them.
    """
    for names in _default_layer_kinds(model):
        if names:
            return names
    raise ValueError(
        f"found no MLP hidden layers, blocks or stages in "
        f"{user_class_name(unwrap_vision(model))}; name the layers to show (--layers)"
    )


def _default_layer_kinds(model: nn.Module) -> list[list[str]]:
    """The atlas's default layers in order of preference: the MLP hidden layers, the
    blocks, the stages (paths the user passes for them)."""
    vision = unwrap_vision(model)
    hidden = []
    for name, module in vision.named_modules():
        if f".{name}".endswith(_DOTTED_SUFFIXES):  # whole path parts: not "meta_mlp.act"
            hidden.append(name)
        elif (inner := _torchvision_mlp_hidden(module)) is not None:
            hidden.append(f"{name}.{inner}")
    kinds = [hidden, find_blocks(vision), find_stages(vision)]
    return [[user_layer_path(model, name) for name in names] for names in kinds]


def _torchvision_mlp_hidden(module: nn.Module) -> str | None:
    """The child name of a torchvision ``ops.MLP``'s hidden activation (``"1"`` in ViT's
    and Swin's blocks, whose activation has no name of its own); ``None`` for any other
    module."""
    is_mlp = any(
        kind.__module__ == "torchvision.ops.misc" and kind.__name__ == "MLP"
        for kind in type(module).__mro__
    )
    if not is_mlp:
        return None
    activations = [
        child
        for child, inner in module.named_children()
        if type(inner).__module__ == "torch.nn.modules.activation"
    ]
    return activations[0] if activations else None


def default_preset(device: torch.device) -> str:
    """``"ghiasi2023"`` (the paper's) on a GPU, ``"fast"`` on a CPU."""
    return "ghiasi2023" if device.type == "cuda" else "fast"


def _check_layers(
    model: nn.Module, layers: Sequence[str] | None, image: torch.Tensor
) -> tuple[dict, list[str], str]:
    """Each layer's grid and width, the default layers left out and a note on them.

    A missing or non-spatial layer the user named (``layers``) is a clear error. Of the
    defaults (``layers=None``, :func:`default_layers`), one without a patch grid (CaiT's
    class-attention blocks, an attention-pool head's MLP) is left out instead; where most
    of a kind have none, the next kind is tried (MobileViT's MLPs and most of its blocks
    work on unfolded patches: its stages are shown), and where no kind is mostly
    spatial, the one with the most maps."""
    vision = unwrap_vision(model)
    check_images(image, size=fixed_input_size(vision))  # before the model's own assert
    probe = ImageModel(model).normalize(image.to(model_device(vision)))
    if layers is not None:
        found, _, _ = _spatial_layers(model, vision, layers, probe, strict=True)
        return found, [], ""
    kinds = [names for names in _default_layer_kinds(model) if names]
    if not kinds:
        default_layers(model)  # raises: the model has none
    results, chosen = [], None
    for kind in kinds:
        found, left_out, reason = _spatial_layers(model, vision, kind, probe, strict=False)
        results.append((kind, found, left_out, reason))
        if 2 * len(found) >= len(kind):  # mostly spatial: this kind shows the model
            chosen = results[-1]
            break
    if chosen is None:  # no kind is: the one with the most maps
        chosen = max(results, key=lambda result: len(result[1]))
    kind, found, left_out, _ = chosen
    if not found:
        tried = [layer for result in results for layer in result[0]]
        raise ValueError(
            f"none of the default layers of {user_class_name(vision)} has a patch grid "
            f"({', '.join(tried)}); name spatial layers to show (--layers). The first "
            f"one's reason: {results[0][3]}"
        )
    note = ""
    if left_out:
        note = (
            f"left out {len(left_out)} default layer(s) without a patch grid (no map to show): "
            + ", ".join(left_out)
        )
    if kind is not kinds[0]:
        note = (
            f"most of the default layers {_few(kinds[0])} have no patch grid (the first "
            f"one's reason: {results[0][3]}); showing {_few(kind)} instead"
            + (f"; {note}" if note else "")
        )
    return found, left_out, note


def _few(names: Sequence[str]) -> str:
    return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")


def _spatial_layers(
    model: nn.Module,
    vision: nn.Module,
    layers: Sequence[str],
    probe: torch.Tensor,
    *,
    strict: bool,
) -> tuple[dict, list[str], str]:
    """The grid and width of each of ``layers`` that has a patch grid, the others and the
    first one's reason; with ``strict`` one without is an error."""
    found, left_out, first_reason = {}, [], ""
    for layer in layers:
        name, _ = find_module(vision, layer)
        shown = user_layer_path(model, name)  # the path the user passes for it
        try:
            layout = resolve_layout(vision, name, probe)
        except ValueError as error:
            if strict:
                raise ValueError(f"layer {shown} cannot be shown in an atlas: {error}") from error
            left_out.append(shown)
            first_reason = first_reason or str(error)
            continue
        found[shown] = {"grid": list(layout.grid), "channels": layout.num_channels}
    return found, left_out, first_reason


def _say(talk: bool, text: str) -> None:
    if talk:
        print(text, flush=True)


def _wanted_units(units: str | int | Sequence[int], channels: int) -> int:
    if units == "all":
        return channels
    if isinstance(units, int):
        return min(units, channels)
    return len(set(units))


def _estimate(
    model, images, layer_info, pending_scans, units, fv: FVSettings, options, files, shard
) -> str:
    """One line, before the work: the estimated cost, from one timed forward of a batch
    and timed optimization runs of a chunk at the first and the last layer (a deeper
    layer runs more of the model; the layers between are interpolated)."""
    batch_size, fv_batch = options["batch_size"], options["fv_batch"]
    start = time.perf_counter()
    batch = images.batch(range(min(batch_size, len(images))))["image"]
    with torch.no_grad():
        ImageModel(model)(batch.to(model_device(model)))
    # One pass of (at most) full forwards scans every pending layer.
    scan = (time.perf_counter() - start) * len(range(0, len(images), batch_size))
    scan *= bool(pending_scans)
    pending = {}
    for name, info in layer_info.items():
        done = len(list((files.out / "layers" / name).glob("unit_*/unit.json")))
        pending[name] = max(0, _wanted_units(units, info["channels"]) - done)
    count = sum(pending.values())
    steps = fv.steps or get_preset(fv.preset).steps
    optimize = 0.0
    if count:
        names = list(layer_info)
        ends = {names[0], names[-1]}
        chunk = {
            name: _chunk_seconds(model, name, layer_info, fv, fv_batch, steps) for name in ends
        }
        first, last = chunk[names[0]], chunk[names[-1]]
        for position, name in enumerate(names):
            share = position / max(1, len(names) - 1)
            seconds = first + (last - first) * share
            optimize += seconds * -(-pending[name] // fv_batch)
    total = (scan + optimize) / shard.world
    return (
        f"estimated cost: about {total:.0f} s on {model_device(model).type} with "
        f"{shard.world} process(es) (top-k scan of {len(images)} images at "
        f"{len(pending_scans)} layer(s) in one pass ~{scan:.0f} s; feature visualization of {count} "
        f"unit(s) x {steps} steps ~{optimize:.0f} s; then locality, Table 1 and the pages)"
    )


def _chunk_seconds(model, name: str, layer_info, fv: FVSettings, fv_batch: int, steps: int):
    """Seconds to visualize one chunk of units of layer ``name``: runs of 1 and 3 steps
    give the set-up and the cost of a step."""
    chunk = list(range(min(fv_batch, layer_info[name]["channels"])))
    times = []
    for trial_steps in (1, 3):
        start = time.perf_counter()
        visualize_units(model, name, chunk, dataclasses.replace(fv, steps=trial_steps))
        times.append(time.perf_counter() - start)
    per_step = max((times[1] - times[0]) / 2, 0.1 * times[0])
    return times[0] + per_step * (steps - 1)


def build_atlas(
    model: nn.Module | LoadedModel,
    images: str | Path | torch.Tensor | ImageFiles | ZooScenes | ImageTensor | None = None,
    out: str | Path = "atlas",
    *,
    layers: Sequence[str] | None = None,
    units: str | int | Sequence[int] = 8,
    k: int = 8,
    preset: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    fv_batch: int = 8,
    scenes: int = 256,
    show_progress: bool | None = None,
) -> Path:
    """Build (or resume, or extend) the atlas of ``model`` over ``images`` in ``out``.

    Run it under ``torchrun --nproc_per_node N`` to split the work; the files are the same
    as with one process.

    Args:
        model: an image model (timm, open_clip, Hugging Face, zoo, any ``nn.Module``)
            or a :class:`LoadedModel` from :func:`~captum_vit.atlas.sources.load_model`.
            For an open_clip CLIP model the atlas shows its image tower ``visual``, and
            layer paths are the tower's (``transformer.resblocks.3.mlp.gelu``).
        images: a folder of image files (recursive), ``zoo.SyntheticScenes``, an
            ``(N, 3, H, W)`` tensor in [0, 1], an image source, or ``None`` for ``scenes``
            zoo scenes (see :func:`~captum_vit.atlas.sources.open_images`).
        out: the atlas folder; an existing atlas with the same settings is resumed or
            extended with new layers and units.
        layers: dotted paths; default every block's MLP hidden layer
            (:func:`default_layers`).
        units: ``"all"``, a list of unit ids (every layer), or ``N``: the ``N`` most
            active units of each layer.
        k: top images per unit.
        preset, steps, seed: feature visualization (default preset: ``"fast"`` on CPU,
            ``"ghiasi2023"`` on GPU; default steps: the preset's).
        batch_size: images per forward of the scan. fv_batch: units optimized together.
        show_progress: progress bars (``None``: when stderr is a terminal); unless
            ``False``, the first process also prints the images and layers, the estimated
            cost before the work and where the atlas was written. ``False`` prints
            nothing (default layers left out are then reported as a warning).

    Returns:
        The path of ``index.html``.

    Raises:
        ValueError: no readable image, a layer that does not exist or has no patch grid, an
            ``out`` folder that holds another atlas or other files, bad units.

    Examples::

        >>> build_atlas(zoo.load_model("vit"), None, "atlas")            # zoo scenes
        >>> build_atlas(timm_model, "photos/", "atlas", units=16, layers=["blocks.6.mlp.act"])
    """
    loaded = model if isinstance(model, LoadedModel) else None
    model = loaded.model if loaded else model
    # A full open_clip CLIP model: its image tower, whose layer paths name no text module
    # (``transformer.resblocks.3`` would also be the text transformer's block).
    tower = _clip_image_tower(model)
    tower_name = module_name(model, tower) if tower is not None else None
    model = tower or model
    shard = Shard.from_environment()
    try:
        return _build(
            model,
            loaded,
            images,
            Path(out),
            shard,
            layers=layers,
            units=units,
            k=k,
            preset=preset,
            steps=steps,
            seed=seed,
            batch_size=batch_size,
            fv_batch=fv_batch,
            scenes=scenes,
            show_progress=show_progress,
            tower=tower_name,
        )
    finally:
        shard.close()


def _check_arguments(k: int, batch_size: int, fv_batch: int, steps: int | None) -> None:
    counts = [("k", k), ("batch_size", batch_size), ("fv_batch", fv_batch)]
    for name, value in counts + ([("steps", steps)] if steps is not None else []):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_units(units: str | int | Sequence[int], layer_info: dict) -> None:
    """The unit choice against every layer's width (before anything is written)."""
    if isinstance(units, str):
        if units != "all":
            raise ValueError(f"units must be 'all', N or a list of unit ids, got {units!r}")
        return
    if isinstance(units, int) and not isinstance(units, bool):
        if units < 1:
            raise ValueError(f"the number of most active units must be >= 1, got {units}")
        return
    if not units:
        raise ValueError("the list of units is empty")
    for name, info in layer_info.items():
        bad = [u for u in units if not 0 <= int(u) < info["channels"]]
        if bad:
            raise ValueError(
                f"unit {bad[0]} does not exist in layer {name} (it has units "
                f"0..{info['channels'] - 1})"
            )


def _build(model, loaded, images, out: Path, shard: Shard, **options: Any) -> Path:
    k, batch_size, fv_batch = options["k"], options["batch_size"], options["fv_batch"]
    _check_arguments(k, batch_size, fv_batch, options["steps"])
    talk = options["show_progress"] is not False and shard.is_main  # False: a quiet call
    progress = resolve_progress(options["show_progress"]) and shard.is_main
    images = open_images(model, images, scenes=options["scenes"])
    named = options["layers"]
    first = images.batch([0])["image"]
    layer_info, _, note = _check_layers(model, named or None, first)
    if note:
        _say(talk, note)
        if not talk and shard.is_main:
            warnings.warn(note, stacklevel=3)
    _check_units(options["units"], layer_info)
    device = model_device(model)
    # at the images' size: a model that takes any size would otherwise use its recorded
    # (pretrained) one, so its pictures would not match its top images (timm's Gemma 4:
    # 768 px pictures beside 48 px images, at a cost that exhausted the memory)
    size = tuple(first.shape[-2:])
    fv = FVSettings(
        options["preset"] or default_preset(device), options["steps"], options["seed"], size
    )
    get_preset(fv.preset)  # an unknown preset fails here, before anything is written
    settings = {
        "model": loaded.fingerprint if loaded else weights_fingerprint(model),
        "images": images.fingerprint,
        "k": k,
        "batch_size": batch_size,
        "preset": fv.preset,
        "steps": fv.steps,
        "seed": fv.seed,
    }
    files = AtlasFiles(out)
    error = None
    if shard.is_main:
        try:
            old_layers = files.check_settings(settings)
        except ValueError as caught:
            error, old_layers = str(caught), {}
    shard.agree(error is None if shard.is_main else True, error or "")
    old_layers = shard.gather(old_layers if shard.is_main else None)[0]
    if shard.is_main:
        files.discard_work()
        files.write_manifest(settings, old_layers)
    shard.barrier()

    scans_done = shard.gather(
        [files.exists(_scan_file(name)) for name in layer_info] if shard.is_main else None
    )[0]
    scans: dict[str, LayerScan] = {}
    pending_scans = [name for name, done in zip(layer_info, scans_done, strict=True) if not done]
    for name, done in zip(layer_info, scans_done, strict=True):
        if done:
            scans[name] = LayerScan.from_file(files.out / _scan_file(name))

    _say(talk, f"{images.description}; {len(layer_info)} layer(s)")
    if talk:
        line = _estimate(
            model, images, layer_info, pending_scans, options["units"], fv, options, files, shard
        )
        print(line, flush=True)
    if pending_scans:
        new = scan_layers(
            model,
            pending_scans,
            images,
            k=k,
            batch_size=batch_size,
            shard=shard,
            show_progress=progress,
        )
        for name, scan in new.items():
            scans[name] = scan
            if shard.is_main:
                files.write_bytes(_scan_file(name), scan.to_bytes())

    chosen = {name: select_units(scans[name], options["units"]) for name in layer_info}
    pending = shard.gather(
        {
            name: [u for u in chosen[name] if not files.exists(f"{unit_folder(name, u)}/unit.json")]
            for name in layer_info
        }
        if shard.is_main
        else None
    )[0]
    _visualize(model, scans, images, pending, fv, fv_batch, files, shard, progress)
    shard.barrier()
    if shard.is_main:
        layers_record = _merge_layers(old_layers, layer_info, chosen)
        overview = _overview(model, loaded, images, files, layers_record, options["tower"])
        files.write_manifest(settings, layers_record)
        index = write_site(files, {"settings": settings, "layers": layers_record}, overview)
        files.discard_work()
        _say(talk, f"atlas written: {index}")
    shard.barrier()
    return files.out / "index.html"


def _scan_file(layer: str) -> str:
    return f"data/{layer}.scan.pt"


def _visualize(model, scans, images, pending, fv, fv_batch, files, shard, progress) -> None:
    chunks = [
        (name, units[start : start + fv_batch])
        for name, units in pending.items()
        for start in range(0, len(units), fv_batch)
    ]
    mine = shard.mine(chunks)
    total = sum(len(units) for _, units in mine)
    with tqdm(
        total=total, disable=not progress or total == 0, unit="unit", desc="feature visualization"
    ) as bar:
        for name, units in mine:
            pictures, scores = visualize_units(model, name, units, fv)
            for unit, picture, score in zip(units, pictures, scores.tolist(), strict=True):
                write_unit(files, scans[name], unit, picture.cpu(), score, images)
            bar.update(len(units))


def _merge_layers(old: dict, found: dict, chosen: dict) -> dict:
    """Layers of the atlas in forward order of this run, then earlier ones; units merged."""
    merged = {}
    for name in list(found) + [name for name in old if name not in found]:
        info = dict(old.get(name, {}))
        info.update(found.get(name, {}))
        info["units"] = sorted(set(old.get(name, {}).get("units", [])) | set(chosen.get(name, [])))
        merged[name] = info
    return merged


def _overview(model, loaded, images, files: AtlasFiles, layers: dict, tower: str | None) -> dict:
    """Locality of every layer and Table 1, cached in ``data/model.json`` (recomputed only
    when the atlas's layers change). ``tower``: where the layers' paths start in the full
    model (``"visual"`` for an open_clip CLIP model), else ``None``."""
    names = list(layers)
    cached = files.read_json("data/model.json") if files.exists("data/model.json") else {}
    if cached.get("layers") != names:
        cached = {
            "layers": names,
            "locality": layer_locality(model, names, images),
            "pooling": cached.get("pooling") or pooling_table(model, images),
        }
        files.write_json("data/model.json", cached)
    return {
        "model": loaded.description if loaded else user_class_name(unwrap_vision(model)),
        "tower": tower,
        "images": images.description,
        "num_images": len(images),
        "skipped_files": len(images.skipped),
        "locality": cached["locality"],
        "pooling": cached["pooling"],
    }

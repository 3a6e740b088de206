"""TopActivatingExamples against a brute-force ranking of every (unit, image) pair, computed
from the test's own hook on a full forward; the distributed merge against one process."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from archs import TIMM_ARCHS, hooks_left

import captum_vit as cv
from captum_vit.top_examples import (
    ExampleSet,
    _rank_ties_by_column,
    rank_candidates,
    scan_top_examples,
)

LAYER = "blocks.1.mlp.fc1"  # 128 channels, 4x4 grid, 1 cls token


def vit():
    factory, size = TIMM_ARCHS["vit"]
    return factory(), size


def stream(count, size, seed=0):
    return torch.rand(count, 3, *size, generator=torch.Generator().manual_seed(seed))


def brute_force(model, images, k, *, score="mean", units=None, mean_std=(0.5, 0.5)):
    """Every image's full map by a plain hook; rank (score desc, index asc) in Python.
    ``mean_std`` defaults to timm's normalization of vit_tiny_patch16_224."""
    seen = []
    module = dict(model.named_modules())[LAYER]
    handle = module.register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad():
        model((images - mean_std[0]) / mean_std[1])
    handle.remove()
    tokens = seen[0][:, 1:]  # drop cls
    batch, _, channels = tokens.shape
    maps = tokens.reshape(batch, 4, 4, channels).permute(3, 0, 1, 2)  # (C, B, 4, 4)
    units = range(channels) if units is None else units
    scores, indices, kept = [], [], []
    for unit in units:
        per_image = maps[unit].flatten(1)
        values = per_image.mean(1) if score == "mean" else per_image.amax(1)
        ranked = sorted(range(batch), key=lambda i: (-float(values[i]), i))[:k]
        pad = k - len(ranked)
        scores.append([float(values[i]) for i in ranked] + [float("-inf")] * pad)
        indices.append(ranked + [-1] * pad)
        kept.append(torch.stack([maps[unit, i] for i in ranked] + [torch.zeros(4, 4)] * pad))
    return torch.tensor(scores), torch.tensor(indices), torch.stack(kept)


def assert_same(result, expected):
    scores, indices, maps = expected
    assert torch.equal(result.indices, indices)
    torch.testing.assert_close(result.scores, scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.maps, maps, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "count, batch_size, k, score",
    [(13, 4, 5, "mean"), (13, 5, 3, "max"), (7, 7, 4, "mean"), (3, 2, 6, "mean"), (9, 1, 2, "max")],
)
def test_streaming_top_k_equals_brute_force(count, batch_size, k, score):
    model, size = vit()
    images = stream(count, size)
    ex = cv.TopActivatingExamples(model, LAYER, k=k, mean=(0.5,) * 3, std=(0.25,) * 3)
    batches = list(images.split(batch_size))  # last batch partial when count % batch_size
    result = ex.attribute(batches, score=score)
    assert result.scores.shape == (128, k) and result.maps.shape == (128, k, 4, 4)
    assert torch.equal(result.channels, torch.arange(128))
    assert result.num_images == count and result.score == score and result.layer == LAYER
    assert_same(result, brute_force(model, images, k, score=score, mean_std=(0.5, 0.25)))
    if k > count:  # unfilled slots
        assert (result.indices[:, count:] == -1).all()
        assert torch.isinf(result.scores[:, count:]).all()
        assert len(result.unit(0)[1]) == count


def test_batch_formats_subsets_and_ties():
    model, size = vit()
    base = stream(5, size, seed=3)
    images = torch.cat([base, base[1:3]])  # images 5, 6 duplicate 1, 2: exact score ties
    units = [3, 0, 127]
    ex = cv.TopActivatingExamples(model, LAYER, k=4)
    data = [images[:2], (images[2:4], torch.tensor([0, 1])), {"image": images[4:], "label": 0}]
    result = ex.attribute(iter(data), target=units)  # a generator: no len()
    assert torch.equal(result.channels, torch.tensor(units))
    assert_same(result, brute_force(model, images, 4, units=units))
    # A single 4-D tensor is one batch.
    assert_same(ex.attribute(images, target=units), brute_force(model, images, 4, units=units))


@pytest.mark.parametrize(
    "arch, layer", [("swin", "layers.1.blocks.0"), ("pit", "transformers.0"), ("resnet", "layer1")]
)
def test_other_layouts_keep_the_maps_patch_activation_map_gives(arch, layer):
    factory, size = TIMM_ARCHS[arch]
    model = factory()
    images = torch.rand(5, 3, *size, generator=torch.Generator().manual_seed(2))
    result = cv.TopActivatingExamples(model, layer, k=2).attribute(images.split(2), target=[0, 5])
    pam = cv.PatchActivationMap(model, layer)
    for row, unit in enumerate((0, 5)):
        maps = pam.attribute(images, target=unit)
        scores = maps.flatten(1).mean(1)
        best = sorted(range(5), key=lambda i: (-float(scores[i]), i))[:2]
        assert result.indices[row].tolist() == best
        torch.testing.assert_close(result.maps[row], maps[best], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.scores[row], scores[best], rtol=1e-5, atol=1e-6)


def test_given_indices_and_offset():
    model, size = vit()
    images = stream(6, size)
    expected = brute_force(model, images, 3)
    ex = cv.TopActivatingExamples(model, LAYER, k=3)
    reordered = [
        {"image": images[[4, 0, 2]], "index": torch.tensor([4, 0, 2])},
        {"image": images[[5, 1, 3]], "index": [5, 1, 3]},
    ]
    assert_same(ex.attribute(reordered), expected)
    shifted = ex.attribute(images.split(4), offset=100)
    assert torch.equal(shifted.indices, expected[1] + 100)
    with pytest.raises(ValueError, match="every batch"):
        ex.attribute([reordered[0], images[:2]])


def test_forward_stops_at_the_layer_and_model_is_left_as_found():
    model, size = vit()
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    later = []
    handle = model.blocks[1].mlp.fc2.register_forward_hook(lambda m, a, o: later.append(1))
    images = stream(4, size)
    copy = images.clone()
    try:
        cv.TopActivatingExamples(model, LAYER, k=2).attribute(images.split(2))
        assert later == []  # nothing after the layer ran
    finally:
        handle.remove()
    assert torch.equal(images, copy)
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert hooks_left(model) == 0

    def bad_batches():
        yield images[:2]
        yield torch.full((1, 3, *size), float("nan"))

    with pytest.raises(ValueError, match="NaN"):
        cv.TopActivatingExamples(model, LAYER, k=2).attribute(bad_batches())
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert hooks_left(model) == 0


def test_one_pass_over_several_layers_equals_each_layer_alone():
    model, size = vit()
    images = stream(11, size, seed=4)
    layers = ["blocks.1.mlp.fc1", "blocks.0.mlp.act", "blocks.1.norm1"]
    methods = [cv.TopActivatingExamples(model, layer, k=3) for layer in layers]
    for method in methods:
        method.layout_for(images)  # resolved (one forward each) before counting
    forwards, later = [], []
    handles = [
        model.patch_embed.register_forward_hook(lambda m, a, o: forwards.append(1)),
        model.blocks[1].mlp.fc2.register_forward_hook(lambda m, a, o: later.append(1)),
    ]
    seen = []
    try:
        together = scan_top_examples(
            methods, images.split(4), on_batch=lambda i, s, p, sc: seen.append((i, sc.shape))
        )
        assert len(forwards) == 3 and later == []  # one forward per batch, stopped early
        alone = [method.attribute(images.split(4)) for method in methods]
    finally:
        for handle in handles:
            handle.remove()
    # each layer as the forward produces it: blocks.0.mlp.act, blocks.1.norm1, blocks.1.mlp.fc1
    assert seen[:3] == [(1, (128, 4)), (2, (32, 4)), (0, (128, 4))]
    for one_pass, single in zip(together, alone, strict=True):
        assert one_pass.layer == single.layer
        assert torch.equal(one_pass.indices, single.indices)
        assert torch.equal(one_pass.scores, single.scores)
        assert torch.equal(one_pass.maps, single.maps)
    assert_same(together[0], brute_force(model, images, 3))
    other = cv.TopActivatingExamples(model, LAYER, k=4)
    with pytest.raises(ValueError, match="scan them separately"):
        scan_top_examples([methods[0], other], images.split(4))
    renormalized = cv.TopActivatingExamples(model, LAYER, k=3, mean=(0.1,) * 3)
    with pytest.raises(ValueError, match="normalize images differently"):
        scan_top_examples([methods[0], renormalized], images.split(4))


def test_one_topk_ranking_equals_the_two_sort_ranking_on_ties():
    """The fast ranking of an in-order stream (kept ranks first, then new images in
    ascending order) against the general one, on scores full of ties: repeated values,
    0.0 and -0.0, huge and tiny magnitudes, +inf; empty kept slots at -inf."""
    generator = torch.Generator().manual_seed(0)
    values = torch.tensor([0.0, -0.0, 1.5, -1.5, 3e38, -3e38, 1e-40, -1e-40, float("inf")])
    for _ in range(200):
        units, k = 17, int(torch.randint(1, 9, (1,), generator=generator))
        batch = int(torch.randint(1, 20, (1,), generator=generator))
        pick = lambda *shape: values[torch.randint(len(values), shape, generator=generator)]  # noqa: E731
        kept_scores = pick(units, k).sort(dim=1, descending=True, stable=True).values
        kept_indices = torch.arange(k).repeat(units, 1)  # ties among kept in index order
        empty = torch.rand(units, generator=generator) < 0.3
        kept_scores[empty, -1], kept_indices[empty, -1] = float("-inf"), -1
        scores = torch.cat([kept_scores, pick(units, batch)], 1)
        indices = torch.cat([kept_indices, torch.arange(k, k + batch).repeat(units, 1)], 1)
        assert torch.equal(_rank_ties_by_column(scores, k), rank_candidates(scores, indices, k))


def test_bad_arguments():
    model, size = vit()
    with pytest.raises(ValueError, match="k must be"):
        cv.TopActivatingExamples(model, LAYER, k=0)
    ex = cv.TopActivatingExamples(model, LAYER, k=2)
    images = stream(2, size)
    with pytest.raises(ValueError, match="score must be"):
        ex.attribute([images], score="median")
    with pytest.raises(IndexError, match="out of range"):
        ex.attribute([images], target=[0, 128])
    with pytest.raises(ValueError, match="no images"):
        ex.attribute([])
    with pytest.raises(ValueError, match="'image' or 'pixel_values' key"):
        ex.attribute([{"pixels": images}])
    with pytest.raises(ValueError, match="single image"):
        ex.attribute(list(images))
    with pytest.raises(ValueError, match="not spatial"):
        cv.TopActivatingExamples(model, "head", k=2).attribute([images])


def test_dynamic_size_grid_change_is_refused():
    factory, size = TIMM_ARCHS["vit_dynamic"]
    ex = cv.TopActivatingExamples(factory(), "blocks.0", k=2)
    with pytest.raises(ValueError, match="share a patch grid"):
        ex.attribute([torch.rand(2, 3, *size), torch.rand(2, 3, 32, 32)])


def test_save_and_load_round_trip(tmp_path):
    model, size = vit()
    result = cv.TopActivatingExamples(model, LAYER, k=3).attribute([stream(4, size)], target=[1, 2])
    path = tmp_path / "top.pt"
    result.save(path)
    loaded = ExampleSet.load(path)
    for name in ("channels", "scores", "indices", "maps"):
        assert torch.equal(getattr(loaded, name), getattr(result, name))
    assert (loaded.layer, loaded.score, loaded.num_images) == (LAYER, "mean", 4)
    # A summary, not every tensor in full.
    grid = "x".join(map(str, result.maps.shape[2:]))
    assert repr(loaded) == (
        f"ExampleSet(layer={LAYER!r}, 2 unit(s) [1, 2], k=3, score='mean', maps {grid}, "
        "num_images=4)"
    )
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an ExampleSet"):
        ExampleSet.load(tmp_path / "other.pt")
    (tmp_path / "notes.txt").write_text("not a torch file")  # was an UnpicklingError
    with pytest.raises(ValueError, match=r"notes.txt is not an ExampleSet saved by .*\(Unpick"):
        ExampleSet.load(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):
        ExampleSet.load(tmp_path / "missing.pt")


# --------------------------------------------------------------------------- distributed


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        model, size = vit()
        images = stream(11, size, seed=5)
        ex = cv.TopActivatingExamples(model, LAYER, k=4)
        # Contiguous shards (5 + 6 images), default offsets from the ranks' counts.
        shard = images[:5] if rank == 0 else images[5:]
        ex.attribute(shard.split(2)).save(f"{out_dir}/contiguous{rank}.pt")
        # Interleaved shards, as a DistributedSampler makes them: the data yields indices.
        mine = torch.arange(rank, 11, 2)
        batches = [{"image": images[i], "index": i} for i in mine.split(3)]
        ex.attribute(batches, score="max").save(f"{out_dir}/interleaved{rank}.pt")
        # One rank with nothing to scan, and k above the total (3 images).
        ex6 = cv.TopActivatingExamples(model, LAYER, k=6)
        ex6.attribute([images[:3]] if rank == 0 else []).save(f"{out_dir}/empty{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_merge_equals_one_process(tmp_path):
    mp.spawn(_distributed_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    model, size = vit()
    images = stream(11, size, seed=5)
    expected = {
        "contiguous": brute_force(model, images, 4),
        "interleaved": brute_force(model, images, 4, score="max"),
        "empty": brute_force(model, images[:3], 6),
    }
    one_process_tiling = cv.TopActivatingExamples(model, LAYER, k=1).attribute(images).tiling
    assert one_process_tiling is not None
    for name, reference in expected.items():
        for rank in (0, 1):
            result = ExampleSet.load(tmp_path / f"{name}{rank}.pt")
            assert_same(result, reference)
            assert result.num_images == (3 if name == "empty" else 11)
            assert result.tiling == one_process_tiling  # also on the rank that saw none


def test_nan_activations_raise_instead_of_leaving_the_unit_empty():
    """A unit whose activations are NaN came back with no examples (-inf scores, index -1)
    as if no image had been seen."""
    model = TIMM_ARCHS["vit"][0]()
    with torch.no_grad():  # unit 5's pre-activation overflows to inf; GELU(-inf) is NaN
        model.blocks[1].mlp.fc1.weight[5] = 1e38
        model.blocks[1].mlp.fc1.bias[5] = -1e38
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    method = cv.TopActivatingExamples(model, "blocks.1.mlp.act", k=2)
    with pytest.raises(FloatingPointError, match=r"NaN for unit\(s\) 5 on image\(s\) 0, 1, 2"):
        method.attribute([images[:3], images[3:]])
    assert not hooks_left(model)
    others = method.attribute([images[:3], images[3:]], target=[4, 6])  # unit 5 not asked
    assert bool((others.indices >= 0).all())


def test_hugging_face_batches_and_items_by_their_key_names():
    """{"pixel_values", "labels"} batches (a Hugging Face data collator's) were refused as
    dicts without an 'image' key; example_grid reads such dataset items too."""
    from captum_vit import render

    model, size = vit()
    images = stream(6, size)
    ex = cv.TopActivatingExamples(model, LAYER, k=2)
    plain = ex.attribute([images[:3], images[3:]], target=[0, 1])
    hf = [{"pixel_values": b, "labels": torch.zeros(3, dtype=torch.long)} for b in images.split(3)]
    named = ex.attribute(hf, target=[0, 1])
    assert torch.equal(named.indices, plain.indices)
    torch.testing.assert_close(named.scores, plain.scores)
    items = [{"pixel_values": image} for image in images]
    grid = render.example_grid(named, 0, items)
    assert grid.tobytes() == render.example_grid(plain, 0, images).tobytes()


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "index": i}


def test_a_loader_that_does_not_read_in_order_is_warned_about():
    """Shuffled or interleaved loaders gave indices that silently pointed at other images
    of the dataset; with each image's own 'index' the result is exact."""
    import warnings

    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    model, size = vit()
    images = stream(8, size)
    ex = cv.TopActivatingExamples(model, LAYER, k=2)
    dataset = TensorDataset(images)
    ordered = ex.attribute(DataLoader(dataset, batch_size=3), target=[0, 1])
    with pytest.warns(UserWarning, match="RandomSampler.*dataset\\[i\\] is not image i"):
        ex.attribute(DataLoader(dataset, batch_size=3, shuffle=True), target=[0, 1])
    interleaved = DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=False)
    with pytest.warns(UserWarning, match="DistributedSampler"):
        ex.attribute(DataLoader(dataset, batch_size=3, sampler=interleaved), target=[0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ex.attribute(DataLoader(dataset, batch_size=3), target=[0, 1])
        torch.manual_seed(0)
        loader = DataLoader(_Indexed(images), batch_size=3, shuffle=True)
        indexed = ex.attribute(loader, target=[0, 1])
    assert torch.equal(indexed.indices, ordered.indices)
    torch.testing.assert_close(indexed.scores, ordered.scores)


def test_example_grid_draws_maps_on_the_pixels_their_patches_covered(tmp_path):
    """A padding ViT on 36x44 images (a 5x6 grid over 40x48): the grid's overlays were
    stretched over the images; they now match PatchActivationMap(interpolate=True)."""
    from archs import padded_vit

    from captum_vit import render

    model = padded_vit()
    images = torch.rand(6, 3, 36, 44, generator=torch.Generator().manual_seed(0))
    result = cv.TopActivatingExamples(model, "blocks.1", k=2).attribute(images, target=[3])
    assert result.tiling == ((5, 6), (8, 8))
    scores, indices, _ = result.unit(3)
    up = cv.PatchActivationMap(model, "blocks.1").attribute(
        images[indices], target=3, interpolate=True
    )
    expected = np.asarray(render.unit_grid(images[indices], up, scores=scores), dtype=float)
    drawn = np.asarray(render.example_grid(result, 3, images), dtype=float)
    assert np.abs(drawn - expected).max() <= 1  # the scan's batch: float rounding only
    result.save(tmp_path / "set.pt")
    assert cv.ExampleSet.load(tmp_path / "set.pt").tiling == result.tiling
    older = torch.load(tmp_path / "set.pt", weights_only=True)
    del older["tiling"]  # a set saved before the field existed
    torch.save(older, tmp_path / "older.pt")
    assert cv.ExampleSet.load(tmp_path / "older.pt").tiling is None

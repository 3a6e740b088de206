"""The shared pieces every consumer uses: the batch reader, the top-k accuracy counter,
progress bars (auto: on only when stderr is a terminal), the token-order definition in
TokenLayout, and a repository that stands alone."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import timm
import torch

import captum_vit as cv
from captum_vit._accuracy import TopKCounter
from captum_vit._batches import as_batch_stream, unpack_batch
from captum_vit._progress import progress, progress_default, resolve_progress

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- batches


def test_unpack_batch_reads_every_format():
    images = torch.rand(3, 3, 8, 8)
    labels = torch.tensor([0, 2, 1])
    masks = torch.ones(3, 1, 8, 8)
    plain = unpack_batch(images)
    assert plain.images is images and plain.labels is None and plain.index is None
    pair = unpack_batch((images, labels), labels=True)
    assert pair.images is images and torch.equal(pair.labels, labels)
    triple = unpack_batch([images, labels, masks], labels=True)
    assert triple.masks is masks
    as_dict = unpack_batch(
        {"image": images, "label": labels, "index": [5, 6, 9], "mask": masks}, labels=True
    )
    assert torch.equal(as_dict.labels, labels) and as_dict.masks is masks
    assert as_dict.index.tolist() == [5, 6, 9] and as_dict.index.dtype == torch.long
    listed = unpack_batch((images, [0, 2, 1]), labels=True)  # labels as a list
    assert listed.labels.dtype == torch.long and listed.labels.tolist() == [0, 2, 1]
    assert unpack_batch((images,)).labels is None  # labels not needed: not required
    stream = as_batch_stream(images)
    assert len(stream) == 1 and stream[0] is images


@pytest.mark.parametrize(
    ("batch", "error", "match"),
    [
        (torch.rand(3, 8, 8), ValueError, "single image"),
        ({"label": torch.tensor([0])}, ValueError, "'image' or 'pixel_values' key"),
        ({"image": torch.rand(1, 3, 8, 8)}, ValueError, "'label' or 'labels' key"),
        (torch.rand(2, 3, 8, 8), TypeError, "no labels"),
        ((torch.rand(2, 3, 8, 8), torch.tensor([0.0, 1.0])), TypeError, "integer"),
        ((torch.rand(2, 3, 8, 8), torch.tensor([0, 1, 2])), ValueError, r"shape \(2,\)"),
        (("not images", torch.tensor([0])), TypeError, "must be a tensor"),
        (42, TypeError, "int"),
        ((), TypeError, "tuple"),
        (
            {"image": torch.rand(2, 3, 8, 8), "label": [0, 1], "index": [0.5, 1]},
            ValueError,
            "index",
        ),
        ({"image": torch.rand(2, 3, 8, 8), "label": [0, 1], "index": [0, -1]}, ValueError, ">= 0"),
    ],
)
def test_unpack_batch_rejects_bad_batches(batch, error, match):
    with pytest.raises(error, match=match):
        unpack_batch(batch, 3, labels=True)


def test_bad_data_is_not_a_stream():
    with pytest.raises(TypeError, match="iterable of batches"):
        as_batch_stream({"image": torch.rand(1, 3, 8, 8)})
    with pytest.raises(TypeError, match="iterable of batches"):
        as_batch_stream(3)


# --------------------------------------------------------------------------- accuracy


def test_top_k_counter_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    counter, per_position = TopKCounter(), TopKCounter(k=3, shape=(4,))
    brute1 = brute5 = 0
    brute_pos1, brute_pos3 = torch.zeros(4), torch.zeros(4)
    for batch in (5, 7):
        logits = torch.randn(batch, 8, generator=generator)
        labels = torch.randint(0, 8, (batch,), generator=generator)
        counter.add(logits, labels)
        positional = torch.randn(batch, 4, 8, generator=generator)
        per_position.add(positional, labels)
        for b in range(batch):
            order = sorted(range(8), key=lambda c: -float(logits[b, c]))
            brute1 += order[0] == labels[b]
            brute5 += int(labels[b]) in order[:5]
            for p in range(4):
                ranked = sorted(range(8), key=lambda c: -float(positional[b, p, c]))
                brute_pos1[p] += ranked[0] == labels[b]
                brute_pos3[p] += int(labels[b]) in ranked[:3]
    assert counter.total == 12
    assert float(counter.top1_percent()) == pytest.approx(100 * brute1 / 12)
    assert float(counter.topk_percent()) == pytest.approx(100 * brute5 / 12)
    torch.testing.assert_close(per_position.top1_percent().float(), 100 * brute_pos1 / 12)
    torch.testing.assert_close(per_position.topk_percent().float(), 100 * brute_pos3 / 12)


def test_top_k_counter_small_heads_and_bad_labels():
    counter = TopKCounter(k=5)
    counter.add(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([0]))  # 3 classes: top-3
    assert float(counter.top1_percent()) == 0 and float(counter.topk_percent()) == 100
    assert torch.isnan(TopKCounter().top1_percent())
    with pytest.raises(ValueError, match="class indices"):
        counter.add(torch.zeros(1, 3), torch.tensor([3]))
    with pytest.raises(TypeError, match="integer"):
        counter.add(torch.zeros(1, 3), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="k must"):
        TopKCounter(k=0)
    # topk ranks NaN first: a NaN logit on the label's class was counted as a hit.
    with pytest.raises(FloatingPointError, match="logits hold NaN"):
        counter.add(torch.tensor([[float("nan"), 0.0, 1.0]]), torch.tensor([0]))
    assert counter.total == 1


# --------------------------------------------------------------------------- progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_automatic_on_a_terminal_only(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert progress_default() is False and resolve_progress(None) is False
    assert resolve_progress(True) is True
    assert list(progress(range(3), desc="work")) == [0, 1, 2]
    assert "work" not in __import__("sys").stderr.getvalue()
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert progress_default() is True
    assert list(progress(range(3), desc="work")) == [0, 1, 2]
    assert "work" in terminal.getvalue() and "3/3" in terminal.getvalue()
    with pytest.raises(TypeError, match="show_progress"):
        resolve_progress("yes")


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=16,
        num_heads=2,
        num_classes=4,
    ).eval()


@pytest.mark.parametrize("method", ["top_examples", "locality", "pooling"])
def test_long_methods_show_progress_on_a_terminal_by_default(monkeypatch, method):
    model = tiny_vit()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batches = [(images, torch.tensor([0, 1]))]
    run, word = {
        "top_examples": (
            lambda: cv.TopActivatingExamples(model, "blocks.1", k=1).attribute(batches),
            "top examples",
        ),
        "locality": (
            lambda: cv.SpatialLocalityProbe(model, "blocks.0", batch_size=8).attribute(images[:1]),
            "locality",
        ),
        "pooling": (
            lambda: cv.pooling_experiments(model, batches, isolate=[0], tear=[]),
            "pooling experiments",
        ),
    }[method]
    quiet = io.StringIO()
    monkeypatch.setattr("sys.stderr", quiet)
    run()
    assert quiet.getvalue() == ""
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    run()
    assert word in terminal.getvalue()


# --------------------------------------------------------------------------- token order


@pytest.mark.parametrize("registers", [0, 3])
def test_token_order_is_defined_by_the_layout(registers):
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=16,
        num_heads=2,
        reg_tokens=registers,
    ).eval()
    images = torch.rand(2, 3, 32, 32)
    layout = cv.resolve_layout(model, "blocks.1", images)
    tokens = cv.capture_layers(model, "blocks.1", images)
    p = model.num_prefix_tokens  # timm's own count: the oracle
    prefix, patches = layout.split_tokens(tokens)
    assert torch.equal(prefix, tokens[:, :p]) and torch.equal(patches, tokens[:, p:])
    assert torch.equal(layout.join_tokens(prefix, patches), tokens)
    assert torch.equal(layout.prefix_tokens(tokens[:, : p + 1]), tokens[:, :p])
    spatial, split_prefix = layout.split(tokens)
    assert torch.equal(spatial.flatten(2).transpose(1, 2), patches)
    with pytest.raises(ValueError, match="does not match"):
        layout.split_tokens(tokens[:, 1:])
    with pytest.raises(ValueError, match="prefix token"):
        layout.join_tokens(prefix[:, :0], patches)


def test_feature_maps_have_no_token_sequence():
    model = timm.create_model("resnet18", num_classes=4).eval()
    layout = cv.resolve_layout(model, "layer1", torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="not a token sequence"):
        layout.split_tokens(torch.rand(1, 256, 64))


# --------------------------------------------------------------------------- repository


def test_nothing_refers_outside_the_repository_or_to_issue_numbers():
    pattern = re.compile(r"\.\./shared|/work/|DESIGN\.md|shared/facts|\bissue\s*#?\d+", re.I)
    files = [ROOT / "README.md", *ROOT.joinpath("docs").rglob("*.md")]
    for folder in ("captum_vit", "tests", "benchmarks", "docs"):
        files += ROOT.joinpath(folder).rglob("*.py")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in files
        if path.resolve() != Path(__file__).resolve()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_readme_links_resolve_inside_the_repository():
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#]+)\)", readme)
    local = [t for t in targets if "://" not in t]
    assert "docs/api/index.md" in local
    for target in local:
        assert (ROOT / target).exists(), target


def test_every_hook_is_registered_in_capture():
    """Hooks live in one place (``capture.py``: ``LayerTap`` and ``HookSet``), whose
    removal is guaranteed; no other module registers one itself."""
    package = ROOT / "captum_vit"
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in package.rglob("*.py")
        if path.name != "capture.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\.register_\w*hook\(", line)
    ]
    assert not offenders, f"hooks registered outside capture.py: {offenders}"


def test_dir_of_the_package_lists_its_names_not_its_helpers():
    import captum_vit

    names = dir(captum_vit)
    assert set(captum_vit.__all__) <= set(names)
    for helper in ("importlib", "Any", "annotations", "ModuleType"):  # tab completion noise
        assert helper not in names
    assert "models" in names  # a submodule already loaded by the package

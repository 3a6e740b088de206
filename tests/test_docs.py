"""The documentation: the MkDocs site builds with warnings as errors (so a renamed or moved
function, or a broken docstring section, fails here), the API reference covers every
public name, and nothing user-facing points outside the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import captum_vit

ROOT = Path(__file__).resolve().parents[1]
API_PAGES = sorted((ROOT / "docs" / "api").glob("*.md"))


def test_mkdocs_strict_build(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "mkdocs.yml", "-d", site],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reference = (site / "api" / "methods" / "index.html").read_text()
    # the reference is generated from the docstrings, not written by hand
    assert "Optimize one image per target" in reference
    assert (site / "images" / "zoo_vit_feature_viz.png").exists()


def _documented_objects() -> set[str]:
    """Last components of every ``::: dotted.path`` and of every listed member."""
    names = set()
    for page in API_PAGES:
        text = page.read_text()
        for path in re.findall(r"^:::\s*([\w.]+)", text, flags=re.M):
            names.add(path.rsplit(".", 1)[-1])
        for members in re.findall(r"members:\s*\[([^\]]*)\]", text):
            names.update(m.strip() for m in members.split(","))
    return names


def test_api_reference_lists_every_public_name():
    documented = _documented_objects()
    missing = [name for name in captum_vit.__all__ if name not in documented]
    assert not missing, f"public names without an API reference entry: {missing}"


_OUTSIDE = re.compile(r"\.\./shared|DESIGN\.md|facts/[\w-]+\.md|" + "/wor" + "k/")


def _user_facing_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    files += sorted((ROOT / "tutorials").glob("*.ipynb"))
    files += sorted((ROOT / "tutorials").glob("*.py"))
    files += sorted((ROOT / "captum_vit").rglob("*.py"))
    files += sorted((ROOT / "captum_vit").rglob("*.md"))
    return files


def test_no_reference_to_files_outside_the_repository():
    hits = {
        str(path.relative_to(ROOT)): [m.group(0) for m in _OUTSIDE.finditer(path.read_text())]
        for path in _user_facing_files()
    }
    hits = {path: found for path, found in hits.items() if found}
    assert not hits, f"user-facing files refer outside the repository: {hits}"


def test_the_readme_tour_runs_as_written():
    """The README's ten-line tour is the first code a user copies: run it verbatim."""
    readme = (ROOT / "README.md").read_text()
    tour = re.search(r"## A ten-line tour\n\n```python\n(.*?)```", readme, re.S)
    assert tour, "the README has no ten-line tour"
    names: dict = {}
    exec(compile(tour.group(1), "README.md (tour)", "exec"), names)
    assert names["viz"].shape == (2, 3, 64, 64)
    assert names["maps"].shape == (8, 8, 8)
    assert names["top"].num_images == 1024 and names["top"].scores.shape == (256, 6)
    assert names["report"].locality.shape == (6,)
    assert names["pooling"].natural.top1 > 90  # the zoo ViT knows its scenes

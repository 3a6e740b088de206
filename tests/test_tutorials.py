"""The tutorial notebooks: each runs top to bottom in a fresh kernel at small settings
(``CAPTUM_VIT_TUTORIAL_SMALL=1``; a failing cell fails the test), and the committed
notebooks are complete stories whose stored outputs come from a full, error-free run of
the code they hold (``python tutorials/run_all.py`` re-executes them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("run_all", ROOT / "tutorials" / "run_all.py")
run_all = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_all)

NOTEBOOKS = run_all.notebooks()
EXPECTED = {
    "01_quickstart",
    "02_reproducing_the_paper",
    "03_token_layouts",
    "04_clip",
    "05_next_to_captum",
    "06_scaling_out",
}


def _figures(cell) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def _code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_every_tutorial_is_there():
    assert {path.stem for path in NOTEBOOKS} == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_a_complete_error_free_run(path):
    notebook = nbformat.read(path, as_version=4)
    cells = _code_cells(notebook)
    assert run_all.error_outputs(notebook) == []
    # executed top to bottom in one kernel, every cell once
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1))
    # the first code cell holds the settings and says which were used: the full ones
    assert run_all.SMALL_ENV in cells[0].source
    printed = "".join(out.get("text", "") for out in cells[0].outputs)
    assert "full settings" in printed
    assert sum(_figures(cell) for cell in cells) >= 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_tells_a_story(path):
    """Opens with what it shows, ends with what the reader learned, and every figure is
    followed by a caption cell that says how to read it."""
    cells = nbformat.read(path, as_version=4).cells
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# ")
    assert cells[-1].cell_type == "markdown" and "What you learned" in cells[-1].source
    for number, cell in enumerate(cells):
        if cell.cell_type == "code" and _figures(cell):
            following = cells[number + 1] if number + 1 < len(cells) else None
            assert following is not None and following.cell_type == "markdown", number
            assert "How to read it" in following.source, f"figure in cell {number}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_a_fresh_kernel(path):
    executed = run_all.execute(path, small=True, timeout=600)
    assert run_all.error_outputs(executed) == []
    printed = "".join(out.get("text", "") for out in _code_cells(executed)[0].outputs)
    assert "small settings" in printed
    # the stored outputs are current: the same cells draw figures now as when committed
    committed = nbformat.read(path, as_version=4)
    now = [bool(_figures(cell)) for cell in _code_cells(executed)]
    then = [bool(_figures(cell)) for cell in _code_cells(committed)]
    assert now == then

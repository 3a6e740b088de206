"""Execute the tutorial notebooks top to bottom, each in a fresh kernel.

    python tutorials/run_all.py                  # full settings; outputs written into the notebooks
    python tutorials/run_all.py --small          # small settings (what the test suite runs)
    python tutorials/run_all.py --small --no-write 03_token_layouts.ipynb

Every notebook reads its settings in its first code cell: with the environment variable
``CAPTUM_VIT_TUTORIAL_SMALL=1`` (``--small``) it uses tiny step counts and few images, so the
whole set runs in a few minutes on two CPU cores. The committed notebooks are executed at
full settings with the first command. Needs ``nbclient``, ``nbformat`` and ``ipykernel``
(the ``test`` extra).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
SMALL_ENV = "CAPTUM_VIT_TUTORIAL_SMALL"


def notebooks() -> list[Path]:
    """The tutorial notebooks, in reading order."""
    return sorted(HERE.glob("[0-9][0-9]_*.ipynb"))


def kernel_env(small: bool) -> dict[str, str]:
    """The environment of the kernel: this process's, with the small-settings switch and
    the repository first on ``PYTHONPATH`` (so a checkout runs its own ``captum_vit``)."""
    env = dict(os.environ)
    env[SMALL_ENV] = "1" if small else "0"
    paths = [str(HERE.parent), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # figures as outputs
    return env


def execute(path: Path, *, small: bool, timeout: int = 1200) -> nbformat.NotebookNode:
    """Run one notebook in a fresh ``python3`` kernel started in ``tutorials/``; a failing
    cell raises ``nbclient.exceptions.CellExecutionError``. Returns the executed notebook."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute(env=kernel_env(small))
    return notebook


def error_outputs(notebook: nbformat.NotebookNode) -> list[str]:
    """``"cell N: ename: evalue"`` for every error output stored in the notebook."""
    found = []
    for number, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                found.append(f"cell {number}: {output.get('ename')}: {output.get('evalue')}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook file names (default: all)")
    parser.add_argument("--small", action="store_true", help="small settings (fast)")
    parser.add_argument("--no-write", action="store_true", help="do not save the outputs")
    args = parser.parse_args(argv)
    paths = [HERE / name for name in args.names] if args.names else notebooks()
    for path in paths:
        start = time.perf_counter()
        notebook = execute(path, small=args.small)
        if not args.no_write:
            nbformat.write(notebook, path)
        print(f"{path.name}: {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The command line's memory setting: freed activations are reused, not faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROGRAM = """
import resource, sys, torch
from captum_vit._memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(16 * 2**20)
steps = []
for step in range(8):  # an MLP's two hidden tensors (64 MiB each), made and freed
    before = faults()
    hidden = x * 2
    activated = torch.relu(hidden)
    del hidden, activated
    steps.append(faults() - before)
print(min(steps[2:]))  # steady state (glibc may still move a block in some steps)
"""


def _huge_pages_always() -> bool:
    try:
        return "[always]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
@pytest.mark.skipif(_huge_pages_always(), reason="2 MiB pages fault 512x less: no signal")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    def page_faults(mode: str) -> int:
        return int(subprocess.check_output([sys.executable, "-c", PROGRAM, mode], text=True))

    pages = 2 * 64 * 2**20 // 4096
    default, kept = page_faults("default"), page_faults("keep")
    assert default > pages // 4, default  # glibc maps and unmaps blocks this large
    assert kept < pages // 20, kept


def test_the_programs_set_it_and_the_library_does_not():
    """``captum-vit`` and ``python -m captum_vit`` start at ``cli.run``, which sets it;
    ``cli.main``, what Python callers use, leaves the process alone."""
    from pathlib import Path

    import tomllib

    import captum_vit.cli as cli

    root = Path(cli.__file__).parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["captum-vit"] == "captum_vit.cli:run"
    assert "run()" in (root / "captum_vit" / "__main__.py").read_text()
    assert "keep_freed_memory" not in cli.main.__code__.co_names

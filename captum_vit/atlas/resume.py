"""Files of an atlas: atomic writes, the manifest, and what is already done.

Every file is written to ``<out>/.work/`` and moved into place with ``os.replace`` (atomic
on one file system), so a run killed at any point leaves each file either absent or whole.
A unit is done when its ``unit.json`` exists; it is written after the unit's images. The
manifest ``atlas.json`` records the settings that decide the results (model weights,
images, seed, preset, steps, k); a later run with the same settings resumes or adds layers
and units, one with other settings is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["AtlasFiles"]

MANIFEST = "atlas.json"
FORMAT = "captum_vit.atlas/1"


class AtlasFiles:
    """The atlas folder ``out``: atomic writes and the record of finished work."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.work = self.out / ".work"

    # ------------------------------------------------------------------ writing

    def write_bytes(self, relative: str, data: bytes) -> Path:
        """Write ``data`` to ``out/relative`` atomically."""
        target = self.out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        temporary = self.work / f"{os.getpid()}-{relative.replace('/', '__')}"
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
        return target

    def write_text(self, relative: str, text: str) -> Path:
        return self.write_bytes(relative, text.encode("utf-8"))

    def write_json(self, relative: str, value: Any) -> Path:
        return self.write_text(relative, json.dumps(value, indent=1, sort_keys=True) + "\n")

    def read_json(self, relative: str) -> Any:
        return json.loads((self.out / relative).read_text(encoding="utf-8"))

    def exists(self, relative: str) -> bool:
        return (self.out / relative).is_file()

    def discard_work(self) -> None:
        """Remove the temporary files of runs killed while writing."""
        shutil.rmtree(self.work, ignore_errors=True)

    # ------------------------------------------------------------------ manifest

    def check_settings(self, settings: dict) -> dict:
        """The manifest's record of layers and units (empty for a new atlas).

        Raises:
            ValueError: ``out`` holds an atlas built with other settings, or files that
                are not an atlas.
        """
        if not self.exists(MANIFEST):
            if self.out.exists() and any(p.name != ".work" for p in self.out.iterdir()):
                raise ValueError(
                    f"{self.out} is not empty and holds no atlas; choose an empty or new --out"
                )
            return {}
        manifest = self.read_json(MANIFEST)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{self.out / MANIFEST} is not an atlas manifest ({FORMAT})")
        old = manifest["settings"]
        changed = sorted(
            key for key in set(old) | set(settings) if old.get(key) != settings.get(key)
        )
        if changed:
            detail = ", ".join(
                f"{key}: {old.get(key)!r} -> {settings.get(key)!r}" for key in changed
            )
            raise ValueError(
                f"{self.out} holds an atlas built with other settings ({detail}); use a new "
                "--out, or the same settings to resume or add layers and units"
            )
        return manifest["layers"]

    def write_manifest(self, settings: dict, layers: dict) -> None:
        self.write_json(MANIFEST, {"format": FORMAT, "settings": settings, "layers": layers})

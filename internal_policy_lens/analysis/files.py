"""Figures to files: each as PNG and PDF, written atomically."""

from __future__ import annotations

import warnings
from pathlib import Path

from ..folders import Folder

FORMATS: tuple[str, ...] = ("png", "pdf")
DPI = 200


def save_figure(fig, stem: Path) -> list[Path]:
    """Write ``fig`` as ``stem.png`` and ``stem.pdf`` (each atomically); return the paths."""
    folder = Folder(stem.parent).create()
    paths = []
    with warnings.catch_warnings():  # tokens in scripts the font lacks are drawn as boxes
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        for fmt in FORMATS:
            with folder.atomic(f"{stem.name}.{fmt}") as tmp:
                fig.savefig(tmp, dpi=DPI, format=fmt)
            paths.append(stem.with_name(f"{stem.name}.{fmt}"))
    return paths

"""How results are shown and written, once for the CLI, the analyses and the benchmarks:
progress bars, CSV files, Markdown tables, and figures that need an optional package.

tqdm, matplotlib and safetensors come with ``pip install 'tike_cuda[analysis]'``; without
them progress bars are silent and figures are skipped with a warning, never a traceback.
"""
from __future__ import annotations

import csv
import math
import sys
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

__all__ = ["progress", "write_csv", "markdown_table", "pyplot", "EXTRA"]

EXTRA = "pip install 'tike_cuda[analysis]'"  # the extra that brings the optional packages


class _NoBar:
    """What progress() gives without tqdm, or when disabled: the same calls, no output."""

    def __init__(self, items=None):
        self.items = items

    def __iter__(self):
        return iter(self.items or ())

    def update(self, n=1):
        pass

    def set_description(self, desc):
        pass

    def close(self):
        pass


def progress(items: Optional[Iterable] = None, *, total: Optional[int] = None,
             enabled: bool = True, desc: Optional[str] = None, unit: str = "it"):
    """A tqdm bar on stderr over ``items`` (or a manual one of ``total`` steps); silent when
    disabled or when tqdm is not installed."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ModuleNotFoundError:
            pass
        else:
            return tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr,
                        dynamic_ncols=True)
    return _NoBar(items)


def write_csv(rows: list, path, columns: Optional[Sequence[str]] = None,
              float_format: Optional[str] = None) -> Path:
    """A list of dicts as CSV; columns default to the first row's keys; floats at full
    precision unless ``float_format`` (e.g. ".6g") is given."""
    path = Path(path)
    columns = list(columns) if columns is not None else (list(rows[0]) if rows else [])
    fmt = (lambda v: f"{v:{float_format}}" if isinstance(v, float) else v) if float_format \
        else (lambda v: v)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({c: fmt(r[c]) for c in columns})
    return path


def _fmt(v):
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        return f"{v:.4f}" if 1e-2 <= abs(v) < 1e4 or v == 0 else f"{v:.3g}"
    return str(v)


def markdown_table(rows: list) -> str:
    """A GitHub-markdown table of a list of dicts (columns from the first row)."""
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def pyplot(path):
    """matplotlib.pyplot on the Agg backend, or None after a warning that the figure `path`
    is skipped because matplotlib is not installed (the CSVs are written regardless)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        warnings.warn(f"matplotlib is not installed: figure {path} not written ({EXTRA})",
                      stacklevel=3)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt

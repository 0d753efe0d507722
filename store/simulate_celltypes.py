"""Planted cell types for simulated collections (``simulate --cell-types N``).

Each of the first ``N`` types of :data:`PLANT_ORDER` gets a marker programme: its genes in the
bundled marker table (``classify/analyze/data/celltype_markers.csv``, read as a file so that this
module imports nothing from ``classify``) are raised by 1.5-2.5 on the log-mean scale in its cells.
Every sample draws its own type composition around a label-specific one (resistant samples have a
different make-up from sensitive ones, so the per-type resistant fractions differ, as in real
tumours). Cells keep the resistance programme of their sample whatever their type. The truth is
``obs['cell_type']`` of each simulated file. With ``N = 0`` (default) nothing here is used and the
simulation is unchanged.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from scdrugmap.store.errors import InputError

__all__ = ["MARKERS_CSV", "PLANT_ORDER", "CellTypeModel", "planted_markers"]

MARKERS_CSV = Path(__file__).resolve().parents[1] / "classify" / "analyze" / "data" / "celltype_markers.csv"
PLANT_ORDER = (
    "epithelial", "T cell", "myeloid", "fibroblast", "endothelial", "B cell", "NK cell", "plasma cell",
    "mast cell", "melanocytic",
)  # fmt: skip


def planted_markers(n_types: int) -> dict[str, list[str]]:
    """Marker genes of the first ``n_types`` types of :data:`PLANT_ORDER`.

    Raises
    ------
    InputError
        ``n_types`` outside 0 to 10.
    """
    if isinstance(n_types, bool) or not isinstance(n_types, int) or not 0 <= n_types <= len(PLANT_ORDER):
        msg = f"cell_types={n_types!r} must be an integer from 0 (none) to {len(PLANT_ORDER)}"
        raise InputError(msg)
    with MARKERS_CSV.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return {t: [r["gene"] for r in rows if r["cell_type"] == t] for t in PLANT_ORDER[:n_types]}


class CellTypeModel:
    """Marker programmes ``(n_types, n_genes)`` and label-specific type compositions."""

    def __init__(self, symbols: np.ndarray, markers: dict[str, list[str]], rng: np.random.Generator) -> None:
        self.names = list(markers)
        k, g = len(self.names), len(symbols)
        self.effects = np.zeros((k, g), np.float32)
        for i, genes in enumerate(markers.values()):
            idx = np.flatnonzero(np.isin(symbols, genes))
            self.effects[i, idx] = rng.uniform(1.5, 2.5, len(idx))
        # the first type (tumour lineage) dominates; resistant samples have their own make-up
        base = np.concatenate([[0.5], np.full(k - 1, 0.5 / max(k - 1, 1))])[:k]
        self.composition = {
            "sensitive": base / base.sum(),
            "resistant": 0.5 * base / base.sum() + 0.5 * rng.dirichlet(np.full(k, 2.0)),
        }

    def assign(self, rng: np.random.Generator, labels: list[str], sample: np.ndarray) -> np.ndarray:
        """Type index of each cell: per sample a Dirichlet draw around its label's composition."""
        out = np.zeros(len(sample), dtype=np.int64)
        k = len(self.names)
        for s, lab in enumerate(labels):
            cells = np.flatnonzero(sample == s)
            p = rng.dirichlet(30.0 * self.composition[lab] + 0.05)
            out[cells] = rng.choice(k, len(cells), p=p)
        return out

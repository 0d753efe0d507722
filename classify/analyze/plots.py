"""Figures of the biology views: PNG + SVG files and a caption line each in the report index.

The report folder (default ``<store>/analysis/figures``) holds ``index.md``: one line per figure,
``- [stem](stem.png) ([svg](stem.svg)): caption``, replaced when the figure is redrawn.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

__all__ = [
    "INDEX_NAME",
    "bubble_plot",
    "embedding_panels",
    "safe_stem",
    "save_figure",
    "violin_by_label",
    "volcano_plot",
]

INDEX_NAME = "index.md"
LABEL_COLOURS = {"sensitive": "#1f77b4", "resistant": "#d62728"}


def safe_stem(*parts: str) -> str:
    """A file-name-safe stem from parts (letters, digits, ``._-``)."""
    return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", str(p)).strip("-") for p in parts if p)


def save_figure(fig: Figure, out_dir: Path, stem: str, caption: str) -> list[Path]:
    """Write ``stem.png`` (150 dpi) and ``stem.svg`` and record the caption in ``index.md``.

    Returns
    -------
    list of Path
        The PNG and SVG paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    index = out_dir / INDEX_NAME
    lines = index.read_text(encoding="utf-8").splitlines() if index.exists() else ["# scdrugmap figures", ""]
    entry = f"- [{stem}]({stem}.png) ([svg]({stem}.svg)): {' '.join(caption.split())}"
    lines = [ln for ln in lines if not ln.startswith(f"- [{stem}](")] + [entry]
    index.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def volcano_plot(table: pd.DataFrame, *, title: str, x_label: str, n_label: int = 12) -> Figure:
    """Volcano plot of a DE table (``gene, log2fc, padj, significant``).

    Significant genes are red (up in resistant) or blue (down); the ``n_label`` most significant
    are named.
    """
    fig, ax = plt.subplots(figsize=(6.0, 5.0))
    y = -np.log10(np.clip(table["padj"].to_numpy(dtype=float), 1e-300, 1.0))
    x = table["log2fc"].to_numpy(dtype=float)
    sig = table["significant"].to_numpy(dtype=bool)
    colour = np.where(
        ~sig, "#b0b0b0", np.where(x > 0, LABEL_COLOURS["resistant"], LABEL_COLOURS["sensitive"])
    )
    ax.scatter(x, y, c=colour, s=8, linewidths=0, alpha=0.8)
    top = np.argsort(-y)[:n_label]
    for i in top:
        if sig[i]:
            ax.annotate(
                str(table["gene"].iloc[i]),
                (x[i], y[i]),
                fontsize=7,
                xytext=(2, 2),
                textcoords="offset points",
            )
    ax.set_xlabel(x_label)
    ax.set_ylabel("-log10 adjusted p (BH)")
    ax.set_title(title, fontsize=10)
    ax.axhline(-np.log10(0.05), color="k", lw=0.5, ls=":")
    return fig


def bubble_plot(table: pd.DataFrame, *, title: str, n_terms: int = 10) -> Figure:
    """Bubble plot of enrichment results: top ``n_terms`` per direction.

    x = fold enrichment, bubble size = hits, colour = -log10 adjusted p; one panel per direction.
    """
    directions = [d for d in ("up", "down") if d in set(table["direction"])] or ["up"]
    fig, axes = plt.subplots(
        1, len(directions), figsize=(8.5 * len(directions), 0.35 * n_terms + 1.8), layout="constrained"
    )
    axes = np.atleast_1d(axes)
    for ax, d in zip(axes, directions, strict=True):
        part = table[table["direction"] == d].nsmallest(n_terms, "p").iloc[::-1]
        if part.empty:
            ax.set_axis_off()
            continue
        names = [
            f"{t} {str(desc)[:45]}".strip() for t, desc in zip(part["term"], part["description"], strict=True)
        ]
        sc = ax.scatter(
            part["fold_enrichment"],
            np.arange(len(part)),
            s=20 + 15 * part["n_hits"].to_numpy(dtype=float),
            c=-np.log10(np.clip(part["padj"].to_numpy(dtype=float), 1e-300, 1.0)),
            cmap="viridis",
        )
        ax.set_yticks(np.arange(len(part)), names, fontsize=7)
        ax.set_xlabel("fold enrichment")
        ax.set_title(f"{d} in resistant", fontsize=9)
        fig.colorbar(sc, ax=ax, label="-log10 adjusted p")
    fig.suptitle(title, fontsize=10)
    return fig


def violin_by_label(
    values: np.ndarray, labels: np.ndarray, genes: Sequence[str], *, title: str, y_label: str
) -> Figure:
    """Violins of each gene's expression, sensitive vs resistant side by side.

    Parameters
    ----------
    values
        ``(n_cells, n_genes)`` expression of ``genes``.
    labels
        ``(n_cells,)`` sensitive/resistant.
    """
    n = len(genes)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * n + 1.5), 4.0))
    for lab, off in (("sensitive", -0.2), ("resistant", 0.2)):
        data = [values[labels == lab, g] for g in range(n)]
        data = [d if d.size else np.array([np.nan]) for d in data]
        parts = ax.violinplot(data, positions=np.arange(n) + off, widths=0.38, showmedians=True)
        for body in parts["bodies"]:
            body.set_facecolor(LABEL_COLOURS[lab])
            body.set_alpha(0.6)
        for key in ("cbars", "cmins", "cmaxes", "cmedians"):
            parts[key].set_color(LABEL_COLOURS[lab])
        ax.plot([], [], color=LABEL_COLOURS[lab], label=lab, lw=6)
    ax.set_xticks(np.arange(n), list(genes), rotation=60, fontsize=7)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return fig


def embedding_panels(
    coords: np.ndarray, colourings: dict[str, np.ndarray], *, title: str, size: float = 4.0
) -> Figure:
    """Scatter of 2-D coordinates, one panel per colouring (categorical or numeric)."""
    fig, axes = plt.subplots(1, len(colourings), figsize=(size * len(colourings) + 1.0, size))
    axes = np.atleast_1d(axes)
    order = np.random.default_rng(0).permutation(len(coords))
    for ax, (name, values) in zip(axes, colourings.items(), strict=True):
        vals = np.asarray(values)[order]
        xy = coords[order]
        if np.issubdtype(vals.dtype, np.number):
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=vals, s=4, cmap="viridis", linewidths=0)
            fig.colorbar(sc, ax=ax, shrink=0.8)
        else:
            cats = sorted({str(v) for v in vals})
            cmap = plt.get_cmap("tab20", max(len(cats), 1))
            for i, cat in enumerate(cats):
                m = vals.astype(str) == cat
                colour = LABEL_COLOURS.get(cat, cmap(i))
                ax.scatter(xy[m, 0], xy[m, 1], s=4, color=colour, label=cat[:30], linewidths=0)
            if len(cats) <= 20:
                ax.legend(fontsize=6, markerscale=2, loc="best")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig

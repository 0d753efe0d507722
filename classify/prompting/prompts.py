"""Prompt templates, gene ranking and chat-completion request bodies.

Templates are versioned TOML files in ``classify/prompting/templates/`` (``top10``, ``top100``,
``cot``); the SHA-256 of the file is part of the run spec, so editing a template gives new runs
and new cache keys. Each cell is shown by the HGNC symbols of its most highly expressed genes
(from the ingested ``datasets/<id>.h5ad``, ``var['symbol']``) and the data source of its dataset
(dataset metadata), ``cells_per_request`` cells per request, as scDrugMap's GPT-4o-mini baseline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np

from scdrugmap.store.errors import InputError, StoreError

__all__ = [
    "CLASSES",
    "STYLES",
    "PromptTemplate",
    "ResponseFormat",
    "Style",
    "cell_ids",
    "describe_source",
    "request_body",
    "top_genes",
]

log = logging.getLogger(__name__)

Style = Literal["top10", "top100", "cot"]
ResponseFormat = Literal["json_schema", "json_object", "text"]
STYLES: tuple[str, ...] = ("top10", "top100", "cot")
CLASSES = ("sensitive", "resistant")
_CHUNK_ROWS = 2048


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt template file (``templates/<style>.toml``).

    Attributes
    ----------
    style, version
        Name and version written in the file.
    n_genes
        Genes listed per cell.
    cells_format
        ``lines`` (``C1: GENE, GENE, …``) or ``nested`` (a JSON list of gene lists in id order).
    answer_shape
        ``flat`` (``{"C1": "sensitive", …}``) or ``reasoning``
        (``{"reasoning": "…", "answers": {"C1": …}}``).
    max_tokens_per_cell
        Answer-token cap: ``max_completion_tokens = 64 + max_tokens_per_cell × cells``.
    completion_tokens_per_cell
        Expected answer tokens per cell (dry-run estimate only).
    system, user
        Message texts with ``$`` placeholders.
    sha256
        Hex SHA-256 of the file bytes.
    """

    style: str
    version: int
    n_genes: int
    cells_format: Literal["lines", "nested"]
    answer_shape: Literal["flat", "reasoning"]
    max_tokens_per_cell: int
    completion_tokens_per_cell: int
    system: str
    user: str
    sha256: str

    @property
    def hash(self) -> str:
        """First 16 hex characters of :attr:`sha256` (stored as the run's ``revision``)."""
        return self.sha256[:16]

    @classmethod
    def load(cls, style: str, path: str | Path | None = None) -> PromptTemplate:
        """Read a bundled template by style, or a template file from ``path``.

        Raises
        ------
        InputError
            Unknown style, missing or malformed file.
        """
        if path is None:
            if style not in STYLES:
                msg = f"unknown prompt style {style!r}; choose one of: {', '.join(STYLES)}"
                raise InputError(msg)
            raw = (
                resources.files("scdrugmap.classify.prompting")
                .joinpath("templates", f"{style}.toml")
                .read_bytes()
            )
        else:
            if not Path(path).is_file():
                msg = f"prompt template {str(path)!r} not found"
                raise InputError(msg)
            raw = Path(path).read_bytes()
        return _parse_template(raw, str(path or style))

    def max_tokens(self, n_cells: int) -> int:
        """Default ``max_completion_tokens`` for a request of ``n_cells`` cells."""
        return 64 + self.max_tokens_per_cell * n_cells

    def messages(self, *, source: str, genes: Sequence[Sequence[str]]) -> list[dict[str, str]]:
        """Chat messages for one request: cells ``C1 … Cn`` with their gene lists (highest first)."""
        ids = cell_ids(len(genes))
        if self.cells_format == "lines":
            cells = "\n".join(
                f"{i}: {', '.join(g) if g else '(no expressed genes)'}"
                for i, g in zip(ids, genes, strict=True)
            )
        else:
            cells = "[\n" + ",\n".join("  " + json.dumps(list(g)) for g in genes) + "\n]"
        example: dict[str, Any] = dict(zip(ids[:2], CLASSES, strict=False))
        if self.answer_shape == "reasoning":
            example = {"reasoning": "C1: ...; C2: ...", "answers": example}
        fields = {
            "n_cells": len(ids),
            "n_genes": self.n_genes,
            "source": source,
            "ids": ", ".join(ids),
            "cells": cells,
            "example": json.dumps(example),
        }
        return [
            {"role": "system", "content": string.Template(self.system).substitute(fields)},
            {"role": "user", "content": string.Template(self.user).substitute(fields)},
        ]

    def json_schema(self, ids: Sequence[str]) -> dict[str, Any]:
        """Strict JSON schema of the answer object for these cell ids."""
        answers = {
            "type": "object",
            "properties": {i: {"type": "string", "enum": list(CLASSES)} for i in ids},
            "required": list(ids),
            "additionalProperties": False,
        }
        if self.answer_shape == "flat":
            return answers
        return {
            "type": "object",
            "properties": {"reasoning": {"type": "string"}, "answers": answers},
            "required": ["reasoning", "answers"],
            "additionalProperties": False,
        }


def _parse_template(raw: bytes, name: str) -> PromptTemplate:
    try:
        d = tomllib.loads(raw.decode())
        t = PromptTemplate(
            style=str(d["style"]),
            version=int(d["version"]),
            n_genes=int(d["n_genes"]),
            cells_format=d["cells_format"],
            answer_shape=d["answer_shape"],
            max_tokens_per_cell=int(d["max_tokens_per_cell"]),
            completion_tokens_per_cell=int(d["completion_tokens_per_cell"]),
            system=str(d["system"]),
            user=str(d["user"]),
            sha256=hashlib.sha256(raw).hexdigest(),
        )
    except (KeyError, ValueError, TypeError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        msg = f"prompt template {name!r} is malformed: {exc}"
        raise InputError(msg) from exc
    if t.cells_format not in ("lines", "nested") or t.answer_shape not in ("flat", "reasoning"):
        msg = f"prompt template {name!r}: cells_format must be lines/nested and answer_shape flat/reasoning"
        raise InputError(msg)
    if t.n_genes < 1:
        msg = f"prompt template {name!r}: n_genes must be ≥ 1"
        raise InputError(msg)
    return t


@cache
def cell_ids(n: int) -> tuple[str, ...]:
    """``("C1", …, "Cn")``: the ids cells carry inside one request."""
    return tuple(f"C{i + 1}" for i in range(n))


def describe_source(row: Mapping[str, Any]) -> str:
    """One-line data source of a dataset from its ``datasets`` row.

    ``<accession or study or dataset_id>; cancer type: …; tissue: …; samples: …; treatment: … (class)``,
    leaving out fields that are not set.
    """

    def val(key: str) -> str | None:
        v = row.get(key)
        return None if v is None or (isinstance(v, float) and np.isnan(v)) or str(v) == "" else str(v)

    parts = [val("accession") or val("study") or str(row["dataset_id"])]
    for key, label in (("cancer_type", "cancer type"), ("tissue", "tissue"), ("source", "samples")):
        if val(key):
            parts.append(f"{label}: {val(key)}")
    drug = val("drug") or val("regimen")
    if drug:
        parts.append(f"treatment: {drug}" + (f" ({val('drug_class')})" if val("drug_class") else ""))
    return "; ".join(parts)


def top_genes(path: str | Path, obs_names: Sequence[str], n_genes: int) -> list[list[str]]:
    """HGNC symbols of each cell's ``n_genes`` highest values in an ingested dataset.

    Parameters
    ----------
    path
        ``Store.dataset_file(id)``: the ingested h5ad (``var['symbol']``, ``""`` when unmapped).
    obs_names
        Cells to rank (``cells.obs_name``).
    n_genes
        Genes per cell.

    Returns
    -------
    list of list of str
        Per cell (in ``obs_names`` order) up to ``n_genes`` symbols, highest value first; only
        genes with a value > 0 and an HGNC symbol count; ties go to the earlier gene in the file.
        Ranking by raw counts or log-normalised values is the same; z-scored (``scaled``) input
        ranks genes by how far they sit above their mean (a warning says so).

    Raises
    ------
    StoreError
        Missing dataset file or cells absent from it.
    """
    import anndata as ad
    import scipy.sparse as sp

    path = Path(path)
    if not path.exists():
        msg = f"ingested dataset file {str(path)!r} is missing; re-ingest the dataset"
        raise StoreError(msg)
    adata = ad.read_h5ad(path, backed="r")
    try:
        if adata.uns.get("scdrugmap", {}).get("x_kind") == "scaled":
            log.warning("%s holds z-scored values: 'most highly expressed' ranks genes by z-score", path.name)
        symbols = (
            adata.var["symbol"].astype(str).to_numpy()
            if "symbol" in adata.var
            else adata.var_names.to_numpy(str)
        )
        usable = (symbols != "") & (symbols != "nan")
        pos = adata.obs_names.get_indexer(list(obs_names))
        if (pos < 0).any():
            msg = f"{int((pos < 0).sum())} cells are missing from {path.name}; the store is inconsistent"
            raise StoreError(msg)
        order = np.argsort(pos, kind="stable")
        out: list[list[str]] = [[] for _ in pos]
        for start in range(0, len(order), _CHUNK_ROWS):
            take = order[start : start + _CHUNK_ROWS]
            block = adata.X[pos[take]]
            block = block.tocsr() if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
            for j, i in enumerate(take):
                lo, hi = block.indptr[j], block.indptr[j + 1]
                idx, vals = block.indices[lo:hi], block.data[lo:hi]
                keep = (vals > 0) & usable[idx]
                idx, vals = idx[keep], vals[keep]
                ranked = idx[np.lexsort((idx, -vals))]
                out[i] = list(dict.fromkeys(symbols[ranked[: n_genes * 2]]))[:n_genes]
    finally:
        adata.file.close()
    return out


def request_body(
    template: PromptTemplate,
    *,
    model: str,
    source: str,
    genes: Sequence[Sequence[str]],
    temperature: float,
    seed: int,
    max_tokens: int | None,
    response_format: ResponseFormat,
    logprobs: bool,
) -> dict[str, Any]:
    """The JSON body of one ``POST /chat/completions`` request (deterministic for its inputs).

    ``max_tokens=None`` uses :meth:`PromptTemplate.max_tokens`; it is sent as
    ``max_completion_tokens``. ``logprobs`` asks for ``top_logprobs = 5``.
    """
    ids = cell_ids(len(genes))
    body: dict[str, Any] = {
        "model": model,
        "messages": template.messages(source=source, genes=genes),
        "temperature": temperature,
        "seed": seed,
        "max_completion_tokens": max_tokens or template.max_tokens(len(ids)),
    }
    if response_format == "json_schema":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "cell_calls", "strict": True, "schema": template.json_schema(ids)},
        }
    elif response_format == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif response_format != "text":
        msg = f"unknown response format {response_format!r}; use json_schema, json_object or text"
        raise InputError(msg)
    if logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = 5
    return body

"""Cell–cell communication (CCC) between resistant and sensitive cells and cell types, with liana.

scDrugAtlas runs CellPhoneDB between cell groups; here liana (Dimitrov et al., Nat Commun 2022;
https://github.com/saezlab/liana-py) runs CellPhoneDB v2's statistical method (Efremova et al., Nat
Protoc 2020: mean of ligand and receptor expression, permutation p-value of group specificity) or
its consensus rank aggregate of several methods, on its bundled ``consensus`` ligand–receptor
resource (shipped in the wheel: no network).

Groups (``groupby``): ``label`` (resistant / sensitive), ``cell_type`` (from ``scdrugmap analyze
celltypes``) or ``label+cell_type`` (e.g. ``T cell|resistant``). A dataset that is all tumour cells
of one type (cell lines, sorted tumour cells — the common case) gives resistant vs sensitive tumour
cells: autocrine (resistant→resistant) and paracrine interactions between tumour states only; no
microenvironment interaction can be inferred, and the run's note says so (one type: no other type holds
≥ 5 % of the annotated cells).

Input: the dataset's analysis view (:func:`classify.analyze.data.load_expression`): log1p CP10k of
counts, or log-normalised values as given. Z-scored input (e.g. SCAD) is shifted per gene to a
minimum of 0 (``x - min``) because the methods need non-negative expression; CellPhoneDB's
permutation p-values of single-gene ligands and receptors are unchanged by a per-gene shift (not
those of complexes, scored by their lowest subunit), but magnitudes and ranks become relative and
the expressed-fraction filter no longer means "detected" (the run's note says so).

Each run (:class:`CCCSpec`, hashed with the data's content hash, the cell-type labels used and the
liana version into ``ccc_id``) is stored in ``ccc_runs``; its interactions in ``ccc_results``
(``magnitude`` / ``specificity`` = the method's columns, named in the spec). :func:`recompute`
reruns a stored run from the store.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdrugmap.classify.analyze.tables import make_id, now, replace_rows
from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError, StoreError

__all__ = ["CCCOutcome", "CCCSpec", "GroupBy", "Method", "communication", "recompute", "run_ccc"]

GroupBy = Literal["label", "cell_type", "label+cell_type"]
Method = Literal["cellphonedb", "rank_aggregate"]
#: per method: (magnitude column, specificity column, True when a larger magnitude is stronger)
_COLUMNS = {"cellphonedb": ("lr_means", "cellphone_pvals", True),
            "rank_aggregate": ("magnitude_rank", "specificity_rank", False)}  # fmt: skip
RESULT_COLUMNS = ["source", "target", "ligand", "receptor", "magnitude", "specificity"]
#: a dataset is "one type" when no other type holds this share of its assigned cells (stray calls in a cell line)
ONE_TYPE_SHARE = 0.05
SINGLE_TYPE_NOTE = (
    "all cells are of one type ({kind}): groups are resistant vs sensitive tumour cells, so interactions "
    "are autocrine or paracrine among tumour states; no microenvironment interaction can be inferred"
)


def _liana():
    try:
        import liana
    except ImportError as exc:  # pragma: no cover - liana is a dependency
        msg = "cell–cell communication needs liana: pip install 'liana>=1.10' (or pip install scdrugmap)"
        raise InputError(msg) from exc
    return liana


def communication(
    adata: ad.AnnData,
    *,
    groupby: str,
    method: Method = "cellphonedb",
    resource: str = "consensus",
    n_perms: int = 1000,
    seed: int = 0,
    expr_prop: float = 0.1,
    min_cells: int = 5,
) -> pd.DataFrame:
    """Ligand–receptor interactions between the groups of ``adata.obs[groupby]`` (liana).

    Parameters
    ----------
    adata
        ``(n_cells, n_genes)``; X non-negative log-normalised expression (natural log), var names
        HGNC symbols.
    groupby
        obs column of the groups (at least 2 with ``min_cells`` cells).
    method
        ``cellphonedb`` (magnitude = mean of ligand and receptor means, specificity = permutation
        p-value; larger / smaller is stronger) or ``rank_aggregate`` (liana's consensus: magnitude
        and specificity ranks aggregated over methods; smaller is stronger).
    resource
        liana resource name (``consensus``: its bundled consensus of OmniPath resources).
    n_perms, seed
        Permutations of the specificity test and their seed (results are reproducible).
    expr_prop
        Ligand and receptor (every subunit) must be expressed (> 0) in this fraction of their group.
    min_cells
        Groups with fewer cells are left out.

    Returns
    -------
    pandas.DataFrame
        ``source, target, ligand, receptor, magnitude, specificity`` (complexes as ``A_B``), sorted
        by source, target, ligand, receptor.

    Raises
    ------
    InputError
        Unknown method or resource, negative values, fewer than 2 groups, or no interaction left.
    """
    li = _liana()
    if method not in _COLUMNS:
        msg = f"method {method!r} is not supported; use one of {', '.join(_COLUMNS)}"
        raise InputError(msg)
    if resource not in li.resource.show_resources():
        msg = f"liana resource {resource!r} unknown; use one of {', '.join(li.resource.show_resources())}"
        raise InputError(msg)
    X = adata.X
    if (X.data if sp.issparse(X) else np.asarray(X)).min(initial=0.0) < 0:
        msg = "expression has negative values; CCC needs non-negative log-normalised expression"
        raise InputError(msg)
    sizes = adata.obs[groupby].value_counts()
    kept = sizes[sizes >= min_cells]
    if len(kept) < 2:
        msg = (f"CCC needs at least 2 groups of ≥ {min_cells} cells by {groupby!r}; got "
               f"{dict(sizes.astype(int))}")  # fmt: skip
        raise InputError(msg)
    work = adata[adata.obs[groupby].isin(kept.index)]
    work = ad.AnnData(
        X=sp.csr_matrix(work.X, dtype=np.float32),
        obs=pd.DataFrame({groupby: pd.Categorical(work.obs[groupby].astype(str))}, index=work.obs_names),
        var=pd.DataFrame(index=work.var_names),
    )
    fn = getattr(li.mt, method)
    res = fn(work, groupby=groupby, resource_name=resource, expr_prop=expr_prop, min_cells=min_cells,
             n_perms=n_perms, seed=seed, use_raw=False, inplace=False, verbose=False)  # fmt: skip
    if res is None or len(res) == 0:
        msg = f"no ligand–receptor pair of {resource!r} passes expr_prop={expr_prop} in these groups"
        raise InputError(msg)
    mag, spec, _ = _COLUMNS[method]
    out = pd.DataFrame({
        "source": res["source"].astype(str).to_numpy(), "target": res["target"].astype(str).to_numpy(),
        "ligand": res["ligand_complex"].astype(str).to_numpy(),
        "receptor": res["receptor_complex"].astype(str).to_numpy(),
        "magnitude": res[mag].to_numpy(dtype=float), "specificity": res[spec].to_numpy(dtype=float),
    })  # fmt: skip
    out = out.drop_duplicates(["source", "target", "ligand", "receptor"])
    return out.sort_values(["source", "target", "ligand", "receptor"], ignore_index=True)


@dataclass(frozen=True)
class CCCSpec:
    """Everything that determines a CCC run (stored in ``ccc_runs.spec``; hashed into ``ccc_id``)."""

    dataset_id: str
    groupby: GroupBy = "label"
    method: Method = "cellphonedb"
    resource: str = "consensus"
    n_perms: int = 1000
    seed: int = 0
    expr_prop: float = 0.1
    min_cells: int = 5
    celltype_method: str = "markers"
    include_unlabelled: bool = False


@dataclass(frozen=True)
class CCCOutcome:
    """A stored CCC run: its id, spec, interactions, groups (cells each) and note."""

    ccc_id: str
    spec: CCCSpec
    table: pd.DataFrame
    groups: dict[str, int]
    note: str


def _grouped(store: Store, spec: CCCSpec) -> tuple[ad.AnnData, str, str]:
    """The dataset's cells with a ``group`` obs column, the cell-type labels' hash and the note."""
    from scdrugmap.classify.analyze.data import load_expression

    if spec.groupby not in ("label", "cell_type", "label+cell_type"):
        msg = f"--groupby {spec.groupby!r}: use label, cell_type or label+cell_type"
        raise InputError(msg)
    adata = load_expression(store, spec.dataset_id, labelled_only=False)
    label = adata.obs["label"].astype(object).fillna("unlabelled")
    types = store.query(
        "SELECT c.cell_uid, ct.cell_type FROM cells c JOIN cell_types ct USING (cell_uid) "
        "WHERE c.dataset_id = ? AND ct.method = ? ORDER BY c.cell_uid",
        [spec.dataset_id, spec.celltype_method],
    )
    types_hash = hashlib.sha256(types.to_csv(index=False).encode()).hexdigest()[:16] if len(types) else ""
    ctype = adata.obs["cell_uid"].map(types.set_index("cell_uid")["cell_type"]) if len(types) else None
    if spec.groupby != "label" and ctype is None:
        msg = (f"dataset {spec.dataset_id!r} has no {spec.celltype_method!r} cell types; run `scdrugmap analyze "
               f"celltypes --dataset {spec.dataset_id}` first, or use --groupby label")  # fmt: skip
        raise InputError(msg)
    group = {"label": label, "cell_type": ctype, "label+cell_type": ctype.astype(str) + "|" + label
             if ctype is not None else None}[spec.groupby]  # fmt: skip
    keep = np.ones(adata.n_obs, dtype=bool)
    if "label" in spec.groupby and not spec.include_unlabelled:
        keep &= (label != "unlabelled").to_numpy()
    if ctype is not None and spec.groupby != "label":
        keep &= (ctype != "unassigned").to_numpy() & ctype.notna().to_numpy()
    adata.obs["group"] = group.astype(str).to_numpy()
    adata = adata[keep].copy()
    sizes = adata.obs["group"].value_counts()
    if (sizes >= spec.min_cells).sum() < 2:
        hint = (" (add --include-unlabelled to compare with the unlabelled cells, or --groupby cell_type)"
                if "label" in spec.groupby and not spec.include_unlabelled else "")  # fmt: skip
        msg = (f"CCC needs at least 2 groups of ≥ {spec.min_cells} cells; {spec.dataset_id} by {spec.groupby} has "
               f"{ {str(k): int(v) for k, v in sizes.items()} }{hint}")  # fmt: skip
        raise InputError(msg)
    notes = []
    n_types = ctype[keep].loc[lambda s: s != "unassigned"].value_counts() if ctype is not None else None
    if n_types is None:
        notes.append("cell types not annotated (scdrugmap analyze celltypes): if the dataset is one cell line or "
                     "sorted tumour cells, interactions are among tumour states only (no microenvironment)")  # fmt: skip
    elif (n_types >= max(spec.min_cells, ONE_TYPE_SHARE * n_types.sum())).sum() <= 1:
        kind = n_types.index[0] if len(n_types) else "none assigned"
        notes.append(SINGLE_TYPE_NOTE.format(kind=kind))
    if adata.uns["x_kind"] == "scaled" or (adata.X.min() < 0):
        X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
        adata.X = (X - X.min(axis=0, keepdims=True)).astype(np.float32)
        notes.append("z-scored input shifted per gene to a minimum of 0: CellPhoneDB p-values unchanged, magnitudes and ranks relative, "
                     "expressed fraction = above the gene's minimum")  # fmt: skip
    return adata, types_hash, "; ".join(notes)


def _ccc_id(store: Store, spec: CCCSpec, types_hash: str, liana_version: str) -> str:
    content = store.query("SELECT content_hash FROM datasets WHERE dataset_id = ?", [spec.dataset_id])
    return make_id("ccc", {**asdict(spec), "content_hash": str(content.iloc[0, 0]), "cell_types": types_hash,
                           "liana": liana_version})  # fmt: skip


def run_ccc(store: Store, spec: CCCSpec) -> CCCOutcome:
    """Run CCC on one stored dataset and store it (``ccc_runs``, ``ccc_results``; one transaction).

    Cells only talk within a sample, so datasets are never pooled: run one dataset at a time.
    Without ``include_unlabelled``, unlabelled cells are left out of label groupings (with it, they
    form the group ``unlabelled``); ``unassigned`` cells are left out of cell-type groupings.

    Raises
    ------
    InputError, StoreError
        Unknown dataset, missing cell types, fewer than 2 groups, or a bad option.
    """
    li = _liana()
    adata, types_hash, note = _grouped(store, spec)
    table = communication(adata, groupby="group", method=spec.method, resource=spec.resource,
                          n_perms=spec.n_perms, seed=spec.seed, expr_prop=spec.expr_prop,
                          min_cells=spec.min_cells)  # fmt: skip
    ccc_id = _ccc_id(store, spec, types_hash, li.__version__)
    groups = {str(k): int(v) for k, v in adata.obs["group"].value_counts().sort_index().items()}
    mag, sp_col, larger = _COLUMNS[spec.method]
    stored_spec = {**asdict(spec), "dataset_ids": [spec.dataset_id], "groups": groups, "cell_types_hash": types_hash,
                   "magnitude": mag, "specificity": sp_col, "larger_magnitude_is_stronger": larger,
                   "x_kind": adata.uns["x_kind"]}  # fmt: skip
    run = pd.DataFrame([{
        "ccc_id": ccc_id, "dataset_ids": json.dumps([spec.dataset_id]), "groupby": spec.groupby,
        "method": spec.method, "resource": spec.resource, "spec": json.dumps(stored_spec),
        "versions": json.dumps({"liana": li.__version__, "scanpy": _version("scanpy")}),
        "n_cells": int(adata.n_obs), "status": "complete", "note": note, "created_at": now(),
    }])  # fmt: skip
    replace_rows(
        store, [("ccc_runs", run), ("ccc_results", table.assign(ccc_id=ccc_id))], key={"ccc_id": ccc_id}
    )
    return CCCOutcome(ccc_id, spec, table, groups, note)


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def load_spec(store: Store, ccc_id: str) -> CCCSpec:
    """The :class:`CCCSpec` of a stored run.

    Raises
    ------
    StoreError
        No such run.
    """
    row = store.query("SELECT spec FROM ccc_runs WHERE ccc_id = ?", [ccc_id])
    if row.empty:
        msg = f'no CCC run {ccc_id!r}; list them with `scdrugmap sql "SELECT ccc_id FROM ccc_runs"`'
        raise StoreError(msg)
    stored = json.loads(row.iloc[0, 0])
    return CCCSpec(**{k: stored[k] for k in CCCSpec.__dataclass_fields__})


def recompute(store: Store, ccc_id: str) -> pd.DataFrame:
    """Recompute a stored run's interactions from the store (nothing is written).

    Raises
    ------
    StoreError
        No such run, or its inputs changed since (dataset re-ingested, cell types re-annotated,
        another liana version): the recomputed id differs.
    """
    spec = load_spec(store, ccc_id)
    adata, types_hash, _ = _grouped(store, spec)
    again = _ccc_id(store, spec, types_hash, _liana().__version__)
    if again != ccc_id:
        msg = f"the inputs of {ccc_id} changed since it was run (now {again}); rerun `scdrugmap analyze ccc`"
        raise StoreError(msg)
    return communication(adata, groupby="group", method=spec.method, resource=spec.resource, n_perms=spec.n_perms,
                         seed=spec.seed, expr_prop=spec.expr_prop, min_cells=spec.min_cells)  # fmt: skip


def stored_results(store: Store, ccc_id: str) -> pd.DataFrame:
    """A stored run's interactions, in :func:`communication`'s column order and sorting."""
    load_spec(store, ccc_id)
    return store.query(
        f"SELECT {', '.join(RESULT_COLUMNS)} FROM ccc_results WHERE ccc_id = ? "
        "ORDER BY source, target, ligand, receptor",
        [ccc_id],
    )

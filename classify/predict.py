"""Apply a trained head to new cells: QC, embedding, fold-head ensemble, validated calibration.

``predict`` takes an evaluation run and an h5ad file or an in-memory AnnData:

1. **QC, as at ingest** (:func:`store.prepare.prepare` with the same ``min_genes`` /
   ``max_pct_mito`` / input-kind detection): cells failing it are ``not_scored`` with the reason.
2. **Cells that trained the head are recognised** (content hash of their expression rows, or the
   file's content hash and their obs names); their probability is their out-of-fold prediction
   from the run's cross-validation (status ``out_of_fold``), never an in-sample score.
3. **New cells** are embedded with the run's embedder and scored by the mean of the run's fold
   heads (:mod:`classify.fold_heads`), the kind of model whose out-of-fold scores fit the
   calibrator.
4. **Calibration** defaults to ``auto``: the method that lowered out-of-study Brier in the run's
   leave-one-study-out check (:mod:`classify.calibration_check`), else none.

Output columns (:mod:`classify.predict_output`): ``obs['scdrugmap_p_sensitive']``,
``scdrugmap_p_sensitive_raw``, ``scdrugmap_call`` (sensitive / resistant / abstain / not_scored),
``scdrugmap_status`` (scored / out_of_fold / not_scored), ``scdrugmap_reason``;
``obsm['X_scdrugmap_<model>']``; ``uns['scdrugmap']``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from scdrugmap.classify.calibrate import Calibrator, abstain_mask
from scdrugmap.classify.fold_heads import oof_predictions, row_hashes
from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError
from scdrugmap.store.progress import Progress, progress, track

__all__ = ["Calibration", "PredictResult", "Prediction", "predict", "predict_file"]

Calibration = Literal["auto", "platt", "isotonic", "none"]


@dataclass(frozen=True)
class PredictResult:
    """Outcome of :func:`predict_file` (counts; ``summary`` holds the figures)."""

    out: Path
    n_cells: int
    n_scored: int
    n_out_of_fold: int
    n_not_scored: int
    n_abstained: int
    n_sensitive: int
    n_resistant: int
    dataset_id: str | None
    summary: dict[str, Any]


@dataclass
class Prediction:
    """In-memory result of :func:`predict`: the annotated AnnData, per-cell table and summary."""

    adata: Any
    cells: pd.DataFrame
    summary: dict[str, Any]
    dataset_id: str | None


def _run_row(store: Store, run_id: str) -> pd.Series:
    df = store.query("SELECT * FROM eval_runs WHERE run_id = ? AND status = 'complete'", [run_id])
    if df.empty:
        msg = f'no evaluation run {run_id!r}; list runs with `scdrugmap sql "SELECT run_id, model, head FROM eval_runs"`'
        raise InputError(msg)
    row = df.iloc[0]
    if row["strategy"] not in ("frozen", "lora"):
        msg = f"run {run_id} has strategy {row['strategy']!r}; predict applies frozen-embedding or LoRA heads"
        raise InputError(msg)
    return row


def _scorer(store: Store, row: pd.Series, fold: int, checkpoint: str | Path | None):
    """``(embedder, score(adata) -> (raw (n,), embedding (n, d) | None), meta)`` of a run."""
    from scdrugmap.classify.fold_heads import fold_ensemble, lora_meta

    if row["strategy"] == "lora":
        from scdrugmap.classify.finetune import finetuned_embedder, predict_cells
        from scdrugmap.classify.lora import CellSource

        emb, net = finetuned_embedder(store, str(row["run_id"]), fold, checkpoint=checkpoint)

        def score_lora(a: Any) -> tuple[np.ndarray, None]:
            src = CellSource({"x": a}, np.full(a.n_obs, "x"), np.arange(a.n_obs))
            return predict_cells(emb, net, src, np.arange(a.n_obs), batch_size=16), None

        return emb, score_lora, lora_meta(store, row, fold)
    from scdrugmap.embedder.runner import restore_embedder

    ens = fold_ensemble(store, row)
    emb = restore_embedder(store, ens.meta["revision"], checkpoint=checkpoint)

    def score(a: Any) -> tuple[np.ndarray, np.ndarray]:
        X = np.asarray(emb.embed(a), dtype=np.float32)
        raw = np.full(a.n_obs, np.nan)
        ok = np.isfinite(X).all(axis=1)
        if ok.any():
            raw[ok] = ens.predict_proba(X[ok])
        return raw, X

    return emb, score, {**ens.meta, "train_hash": ens.train_hash, "train_uid": ens.train_uid}


def _recognise(
    store: Store, prepared: Any, meta: dict[str, Any], run_id: str
) -> tuple[np.ndarray, str | None]:
    """cell_uid (−1 = new) of every input cell that trained the head; the catalog dataset of the input."""
    n = prepared.adata.n_obs
    uid = np.full(n, -1, dtype=np.int64)
    train_uid = np.asarray(meta["train_uid"], dtype=np.int64)
    if prepared.row.get("has_expression") and len(train_uid):
        hashes = row_hashes(prepared.adata.X)
        lookup = pd.Series(train_uid, index=np.asarray(meta["train_hash"], dtype=np.uint64))
        lookup = lookup[~lookup.index.duplicated()]
        hit = np.isin(hashes, lookup.index.to_numpy())
        uid[hit] = lookup.loc[hashes[hit]].to_numpy()
    ds = store.query("SELECT dataset_id FROM datasets WHERE content_hash = ?", [prepared.content_hash])
    dataset_id = None if ds.empty else str(ds["dataset_id"].iloc[0])
    if dataset_id is not None:  # same file as an ingested dataset: its cells by obs name
        cells = store.query("SELECT obs_name, cell_uid FROM cells WHERE dataset_id = ?", [dataset_id])
        by_name = pd.Series(cells["cell_uid"].to_numpy(), index=cells["obs_name"].astype(str))
        known = by_name.reindex(prepared.adata.obs_names.astype(str)).to_numpy()
        in_run = np.isin(known, oof_predictions(store, run_id)["cell_uid"].to_numpy()) | np.isin(
            known, train_uid
        )
        uid = np.where((uid < 0) & in_run, np.nan_to_num(known, nan=-1).astype(np.int64), uid)
    return uid, dataset_id


def predict(
    data: Any,
    *,
    head: str,
    store: Store | None = None,
    calibration: Calibration = "auto",
    abstain: tuple[float, float] | None = None,
    min_genes: int = 500,
    max_pct_mito: float = 10.0,
    input_type: Literal["auto", "counts", "lognorm", "scaled"] = "auto",
    layer: str | None = None,
    gene_key: str | None = None,
    checkpoint: str | Path | None = None,
    min_coverage: float = 0.5,
    batch_size: int = 2048,
    fold: int = 0,
) -> Prediction:
    """Score the cells of an AnnData (or an h5ad path) with a run's head.

    Parameters
    ----------
    data
        An in-memory :class:`anndata.AnnData` (not modified) or the path of an h5ad file; raw
        counts, log-normalised or scaled values as the embedder needs.
    head
        Run id of a complete frozen-embedding or LoRA evaluation run.
    store
        The store holding the run (default: ``$SCDRUGMAP_STORE`` or ``./scdrugmap-store``).
    calibration
        ``auto`` (the run's out-of-study-validated choice), ``platt``, ``isotonic`` or ``none``.
    abstain
        ``(low, high)``: cells whose calibrated positive-class probability is in the band abstain.
    min_genes, max_pct_mito, input_type, layer, gene_key
        QC and reading options, as at ingest (QC applies to raw counts only).
    checkpoint
        The embedder's checkpoint, when it moved since embedding.
    min_coverage
        Refuse when the embedder knows less than this fraction of its genes in the file.
    batch_size
        Cells embedded at a time.
    fold
        LoRA runs: whose fold's adapter and head to apply.

    Returns
    -------
    Prediction
        ``adata``: a copy of the input with the ``scdrugmap_*`` obs columns, ``obsm`` and ``uns``
        (:mod:`classify.predict_output`); ``cells``: the per-cell table; ``summary``.

    Raises
    ------
    InputError
        Unknown run, imported or transductive embedding, changed model revision, too little gene
        coverage, no cell passing QC, bad input.
    """
    from scdrugmap.store.catalog import default_store_path

    store = store if store is not None else Store.open(default_store_path())
    if calibration not in ("auto", "platt", "isotonic", "none"):
        msg = f"calibration {calibration!r} unknown; use auto, platt, isotonic or none"
        raise InputError(msg)
    bar = progress("predict", 5, unit="steps")
    with bar:
        return _predict(data, bar, head=head, store=store, calibration=calibration, abstain=abstain,
                        min_genes=min_genes, max_pct_mito=max_pct_mito, input_type=input_type, layer=layer,
                        gene_key=gene_key, checkpoint=checkpoint, min_coverage=min_coverage,
                        batch_size=batch_size, fold=fold)  # fmt: skip


def _predict(data: Any, bar: Progress, *, head: str, store: Store, calibration: Calibration,
             abstain: tuple[float, float] | None, min_genes: int, max_pct_mito: float, input_type: str,
             layer: str | None, gene_key: str | None, checkpoint: str | Path | None, min_coverage: float,
             batch_size: int, fold: int) -> Prediction:  # fmt: skip
    """:func:`predict`'s body; ``bar`` counts its five steps."""
    import anndata as ad

    from scdrugmap.classify.predict_output import annotate, build_summary
    from scdrugmap.store.prepare import IngestSpec, prepare, read_h5ad_checked
    from scdrugmap.store.qc import qc_reasons

    bar.set_stage("loading the head and the embedder")
    row = _run_row(store, head)
    emb, score, meta = _scorer(store, row, fold, checkpoint)
    bar.update(stage="reading the file and QC")
    method = meta["default_calibration"] if calibration == "auto" else calibration
    if method != "none" and method not in meta["calibrators"]:
        msg = f"--calibration {method} is not available: run {head}'s out-of-fold predictions hold one class; use auto or none"
        raise InputError(msg)
    in_memory = isinstance(data, ad.AnnData)
    spec = IngestSpec(dataset_id="predict", gene_key=gene_key, layer=layer, input_type=input_type,
                      min_genes=min_genes, max_pct_mito=max_pct_mito, allow_unmapped=True)  # fmt: skip
    prepared = prepare(data if in_memory else Path(data), spec, filter_cells=False)
    name = prepared.path.name
    adata = prepared.adata
    if emb.input_kind == "counts" and prepared.row["x_kind"] != "counts":
        msg = f"{name} holds {prepared.row['x_kind']} values but {emb.name} needs raw counts"
        raise InputError(msg)
    qc = prepared.qc
    reason = (
        qc_reasons(qc.n_genes, qc.pct_mito, min_genes=min_genes, max_pct_mito=max_pct_mito)
        if qc.applied
        else np.full(adata.n_obs, "", dtype=object)
    )
    reason = np.array([f"failed QC: {r}" if r else "" for r in reason], dtype=object)
    passed = reason == ""
    cov = emb.coverage(adata[passed])
    if cov["genes"] < min_coverage:
        msg = (
            f"{emb.name} (revision {meta['revision']}) covers only {100 * cov['genes']:.0f} % of the genes it was "
            f"trained on in {name} (minimum {100 * min_coverage:.0f} %); check gene identifiers (--gene-key) "
            "or lower --min-coverage"
        )
        raise InputError(msg)
    uid, dataset_id = _recognise(store, prepared, meta, head)
    bar.update(stage=f"embedding and scoring {int(passed.sum()):,} cells")
    raw = np.full(adata.n_obs, np.nan)
    embedding: np.ndarray | None = None
    idx = np.flatnonzero(passed)
    for start in track(range(0, idx.size, batch_size), "predict: cells", unit="batches"):
        part = idx[start : start + batch_size]
        r, X = score(adata[part])
        raw[part] = r
        if X is not None:
            if embedding is None:
                embedding = np.full((adata.n_obs, X.shape[1]), np.nan, dtype=np.float32)
            embedding[part] = X
    bar.update(stage="out-of-fold predictions and calibration")
    status = np.where(passed, "scored", "not_scored").astype(object)
    no_emb = passed & ~np.isfinite(raw)
    reason[no_emb] = f"no gene known to {emb.name} is expressed"
    status[no_emb] = "not_scored"
    trained = passed & (uid >= 0)
    if trained.any():  # cells that trained the head: their out-of-fold prediction, never an in-sample score
        oof = oof_predictions(store, head).set_index("cell_uid")
        known = pd.Series(uid[trained]).isin(oof.index).to_numpy()
        t_idx = np.flatnonzero(trained)
        raw[t_idx[known]] = oof.loc[uid[t_idx[known]], "probability"].to_numpy(dtype=float)
        status[t_idx[known]] = "out_of_fold"
        reason[t_idx[known]] = "trained the head: out-of-fold prediction of its cross-validation"
        gone = t_idx[~known]
        raw[gone], status[gone] = np.nan, "not_scored"
        reason[gone] = "trained the head and has no out-of-fold prediction"
    cal = Calibrator("none") if method == "none" else Calibrator.from_dict(meta["calibrators"][method])
    ok = status != "not_scored"
    prob = np.where(ok, cal(np.nan_to_num(raw, nan=0.5)), np.nan)
    pos = str(meta["positive_class"])
    neg = "resistant" if pos == "sensitive" else "sensitive"
    call = np.where(prob >= 0.5, pos, neg).astype(object)
    call[abstain_mask(np.nan_to_num(prob, nan=-1.0), abstain) & ok] = "abstain"
    call[~ok] = "not_scored"
    cells = pd.DataFrame(
        {"p_pos": prob, "p_pos_raw": np.where(ok, raw, np.nan), "call": call, "status": status,
         "reason": reason, "cell_uid": uid},
        index=adata.obs_names.astype(str),
    )  # fmt: skip
    bar.update(stage="summary, figures and the annotated copy")
    source = data.copy() if in_memory else read_h5ad_checked(data)
    summary = build_summary(
        store, row, meta, cells, qc=qc, x_kind=prepared.row["x_kind"], min_genes=min_genes,
        max_pct_mito=max_pct_mito, calibration=calibration, method=method, abstain=abstain,
        dataset_id=dataset_id,
    )  # fmt: skip
    out = annotate(source, cells, embedding, summary, model=str(row["model"]))
    bar.update()
    return Prediction(out, cells, summary, dataset_id)


def predict_file(
    store: Store,
    run_id: str,
    path: str | Path,
    *,
    out: str | Path | None = None,
    **options: Any,
) -> PredictResult:
    """Score an h5ad file with :func:`predict`; write the annotated copy; record catalog datasets.

    Parameters
    ----------
    store, run_id, path
        The store, the run, the h5ad to score.
    out
        Output h5ad (default ``./<stem>.scdrugmap.h5ad``), written atomically.
    **options
        Keyword options of :func:`predict`.

    Raises
    ------
    InputError
        As :func:`predict`, and an unwritable output (checked before any work).
    """
    from scdrugmap.classify.predict_record import record

    path = Path(path)
    if out is not None:  # refuse an unwritable output before any work
        from scdrugmap.store.failures import check_writable

        check_writable(out)
    res = predict(path, head=run_id, store=store, **options)
    out = Path(out) if out else Path.cwd() / f"{path.stem}.scdrugmap.h5ad"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        res.adata.write_h5ad(tmp)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    if res.dataset_id is not None:
        record(store, run_id, res.dataset_id, res.cells, res.summary)
    s = res.summary["counts"]
    return PredictResult(
        out=out, n_cells=s["cells"], n_scored=s["scored"], n_out_of_fold=s["out_of_fold"],
        n_not_scored=s["not_scored"], n_abstained=s["abstain"], n_sensitive=s["sensitive"],
        n_resistant=s["resistant"], dataset_id=res.dataset_id, summary=res.summary,
    )  # fmt: skip

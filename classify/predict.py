"""Apply a trained head to new cells (zero-shot transfer), with calibration and abstention.

``predict`` takes an evaluation run: its head is refitted once on every cell of the run's
population (same head, hyper-parameters and seed), a calibrator (Platt and isotonic) is fitted
on the run's out-of-fold predictions, and both are saved under ``<store>/heads/<run_id>/``.
New cells are embedded with the run's embedder (refused when the checkpoint/options no longer
give the same revision, or when the model covers too few of the file's genes), scored,
calibrated, and labelled sensitive / resistant / abstain.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from classify.calibrate import Calibrator, abstain_mask, fit_calibrator
from classify.heads import HeadSpec, make_head
from classify.persist import load_head, save_head
from classify.runs import write_run
from store.catalog import Store
from store.embeddings import open_array, read_rows
from store.errors import InputError

__all__ = ["PredictResult", "final_head", "predict_file"]


@dataclass(frozen=True)
class PredictResult:
    """Outcome of a prediction."""

    out: Path
    n_cells: int
    n_scored: int
    n_abstained: int
    n_sensitive: int
    n_resistant: int
    dataset_id: str | None
    accuracy_answered: float | None


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


def _calibrators(store: Store, run_id: str, positive_class: str) -> dict[str, dict[str, object]]:
    """Platt and isotonic maps fitted on the run's out-of-fold predictions."""
    oof = store.query(
        "SELECT p.probability, c.label FROM predictions p JOIN cells c USING (cell_uid) WHERE p.run_id = ?",
        [run_id],
    )
    y_oof = (oof["label"] == positive_class).to_numpy().astype(int)
    return {
        m: fit_calibrator(oof["probability"].to_numpy(), y_oof, method=m).to_dict()
        for m in ("platt", "isotonic")
    }


def final_head(store: Store, run_id: str) -> tuple[Any, dict[str, Any]]:
    """The run's head refitted on all its cells, with calibrators; trained and saved once.

    Returns
    -------
    tuple
        ``(head with predict_proba(X) -> (n,), metadata incl. calibrators)``.

    Raises
    ------
    InputError
        Unknown run, or a head type that cannot be saved.
    """
    directory = store.path / "heads" / run_id
    if (directory / "head.json").exists():
        return load_head(directory)
    row = _run_row(store, run_id)
    cells = store.query(
        "SELECT f.cell_uid, c.label FROM folds f JOIN cells c USING (cell_uid) WHERE f.fold_set_id = ? ORDER BY 1",
        [row["fold_set_id"]],
    )
    X = read_rows(open_array(store, row["model"], row["revision"]), cells["cell_uid"].to_numpy())
    ok = np.isfinite(X).all(axis=1)
    y = (cells["label"] == row["positive_class"]).to_numpy().astype(int)
    spec = HeadSpec.stored(row["head"], json.loads(row["head_params"]))
    head = make_head(spec, seed=int(row["seed"])).fit(X[ok], y[ok])
    calibrators = _calibrators(store, run_id, row["positive_class"])
    extra = {
        "run_id": run_id,
        "model": row["model"],
        "revision": row["revision"],
        "positive_class": row["positive_class"],
        "calibrators": calibrators,
        "n_train": int(ok.sum()),
    }
    save_head(head, spec, directory, extra=extra)
    return load_head(directory)


def _lora_scorer(store: Store, run_id: str, fold: int, checkpoint: str | Path | None):
    """(embedder, scoring function, metadata) of one fold of a LoRA run."""
    from classify.finetune import finetuned_embedder, predict_cells
    from classify.lora import CellSource

    row = _run_row(store, run_id)
    emb, net = finetuned_embedder(store, run_id, fold, checkpoint=checkpoint)

    def score(a: Any) -> np.ndarray:
        src = CellSource({"x": a}, np.full(a.n_obs, "x"), np.arange(a.n_obs))
        return predict_cells(emb, net, src, np.arange(a.n_obs), batch_size=16)

    meta = {"revision": row["revision"], "positive_class": row["positive_class"]}
    meta["calibrators"] = _calibrators(store, run_id, row["positive_class"])
    return emb, score, meta


def _catalog_dataset(store: Store, path: Path) -> str | None:
    from store.ingest import file_sha256

    df = store.query("SELECT dataset_id FROM datasets WHERE content_hash = ?", [file_sha256(path)])
    return None if df.empty else str(df["dataset_id"].iloc[0])


def predict_file(
    store: Store,
    run_id: str,
    path: str | Path,
    *,
    out: str | Path | None = None,
    calibration: Literal["platt", "isotonic", "none"] = "platt",
    abstain: tuple[float, float] | None = None,
    checkpoint: str | Path | None = None,
    gene_key: str | None = None,
    min_coverage: float = 0.5,
    batch_size: int = 2048,
    fold: int = 0,
) -> PredictResult:
    """Score every cell of an h5ad with a run's head; write probabilities and labels into ``obs``.

    Parameters
    ----------
    store
        The store holding the run.
    run_id
        An evaluation run (frozen embedding + head).
    path
        h5ad to score (raw counts, log-normalised or scaled as the embedder needs).
    out
        Output h5ad (default ``./<stem>.scdrugmap.h5ad``): the input with obs columns
        ``scdrugmap_probability`` (calibrated probability of the run's positive class),
        ``scdrugmap_probability_raw``, ``scdrugmap_label`` (sensitive / resistant / abstain /
        not_scored for cells without any expressed gene).
    calibration
        ``platt``, ``isotonic`` or ``none``.
    abstain
        ``(low, high)``: cells with calibrated probability in the band are abstained.
    checkpoint
        The embedder's checkpoint, when it moved since embedding.
    gene_key
        var column with gene identifiers.
    min_coverage
        Refuse when the embedder knows less than this fraction of its genes in the file.
    batch_size
        Cells embedded at a time.
    fold
        For a LoRA run: whose fold's adapter and head to apply.

    Raises
    ------
    InputError
        Unknown run, changed model revision, too little gene coverage, bad file.
    """
    from embedder.runner import restore_embedder
    from store.ingest import IngestSpec, prepare, read_h5ad_checked

    path = Path(path)
    if out is not None:  # refuse an unwritable output before any work
        from store.failures import check_writable

        check_writable(out)
    if _run_row(store, run_id)["strategy"] == "lora":
        emb, score, meta = _lora_scorer(store, run_id, fold, checkpoint)
    else:
        head, meta = final_head(store, run_id)
        emb = restore_embedder(store, meta["revision"], checkpoint=checkpoint)

        def score(a: Any) -> np.ndarray:
            X = emb.embed(a)
            raw = np.full(a.n_obs, np.nan)
            ok = np.isfinite(X).all(axis=1)
            if ok.any():
                raw[ok] = head.predict_proba(X[ok])
            return raw

    prepared = prepare(
        path, IngestSpec(dataset_id="predict", gene_key=gene_key, min_genes=0, max_pct_mito=100.0)
    )
    adata = prepared.adata
    if emb.input_kind == "counts" and prepared.row["x_kind"] != "counts":
        msg = f"{path.name} holds {prepared.row['x_kind']} values but {emb.name} needs raw counts"
        raise InputError(msg)
    cov = emb.coverage(adata)
    if cov["genes"] < min_coverage:
        msg = (
            f"{emb.name} (revision {meta['revision']}) covers only {100 * cov['genes']:.0f} % of the genes it was "
            f"trained on in {path.name} (minimum {100 * min_coverage:.0f} %); check gene identifiers (--gene-key) "
            "or lower --min-coverage"
        )
        raise InputError(msg)
    raw = np.concatenate([score(adata[i : i + batch_size]) for i in range(0, adata.n_obs, batch_size)])
    ok = np.isfinite(raw)
    cal = (
        Calibrator("none")
        if calibration == "none"
        else Calibrator.from_dict(meta["calibrators"][calibration])
    )
    prob = np.where(ok, cal(np.nan_to_num(raw)), np.nan)
    pos = meta["positive_class"]
    neg = "resistant" if pos == "sensitive" else "sensitive"
    label = np.where(prob >= 0.5, pos, neg).astype(object)
    held = abstain_mask(np.nan_to_num(prob, nan=-1.0), abstain) & ok
    label[held] = "abstain"
    label[~ok] = "not_scored"

    original = read_h5ad_checked(path)
    scored = pd.DataFrame(
        {"scdrugmap_probability": prob, "scdrugmap_probability_raw": raw, "scdrugmap_label": label},
        index=adata.obs_names,
    ).reindex(original.obs_names)
    scored["scdrugmap_label"] = scored["scdrugmap_label"].fillna("not_scored")
    for col in scored.columns:
        original.obs[col] = scored[col].to_numpy()
    original.uns["scdrugmap_predict"] = {
        "run_id": run_id,
        "revision": meta["revision"],
        "calibration": calibration,
        "abstain": list(abstain) if abstain else [],
    }
    out = Path(out) if out else Path.cwd() / f"{path.stem}.scdrugmap.h5ad"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        original.write_h5ad(tmp)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    dataset_id = _catalog_dataset(store, path)
    acc = None
    if dataset_id is not None:
        acc = _record(store, run_id, dataset_id, scored, calibration, abstain)
    labels = scored["scdrugmap_label"]
    return PredictResult(
        out=out,
        n_cells=original.n_obs,
        n_scored=int((labels != "not_scored").sum()),
        n_abstained=int((labels == "abstain").sum()),
        n_sensitive=int((labels == "sensitive").sum()),
        n_resistant=int((labels == "resistant").sum()),
        dataset_id=dataset_id,
        accuracy_answered=acc,
    )


def _record(
    store: Store,
    run_id: str,
    dataset_id: str,
    scored: pd.DataFrame,
    calibration: str,
    abstain: tuple[float, float] | None,
) -> float | None:
    """Write predictions of an ingested dataset to the catalog; accuracy on answered labelled cells."""
    cells = store.query("SELECT cell_uid, obs_name, label FROM cells WHERE dataset_id = ?", [dataset_id])
    cells = cells.set_index("obs_name").join(scored, how="inner")
    cells = cells[cells["scdrugmap_label"] != "not_scored"]
    key = json.dumps({"run": run_id, "dataset": dataset_id, "calibration": calibration, "abstain": abstain})
    pred_id = "pred-" + hashlib.sha256(key.encode()).hexdigest()[:16]
    base = store.query("SELECT * FROM eval_runs WHERE run_id = ?", [run_id]).iloc[0].to_dict()
    base.update(
        run_id=pred_id,
        strategy="predict",
        protocol="predict",
        category="dataset_id",
        value=dataset_id,
        spec=json.dumps({"head_run": run_id, "calibration": calibration, "abstain": abstain}),
        n_cells=len(cells),
        n_excluded=0,
        created_at=datetime.now(UTC).replace(tzinfo=None),
        duration_s=0.0,
    )
    answered = cells[(cells["scdrugmap_label"] != "abstain") & cells["label"].notna()]
    acc = float((answered["scdrugmap_label"] == answered["label"]).mean()) if len(answered) else None
    labelled = cells["label"].notna()
    coverage = float((cells.loc[labelled, "scdrugmap_label"] != "abstain").mean()) if labelled.any() else None
    rows = [
        ("coverage", coverage, None if coverage is not None else "no labelled cells"),
        ("accuracy_answered", acc, None if acc is not None else "no labelled answered cells"),
    ]
    metrics = pd.DataFrame(
        [
            {"fold": -1, "metric": m, "value": v, "reason": r, "n_train": 0, "n_test": int(labelled.sum())}
            for m, v, r in rows
        ]
    )
    preds = pd.DataFrame(
        {"fold": -1, "cell_uid": cells["cell_uid"], "probability": cells["scdrugmap_probability"]}
    )
    write_run(store, base, metrics, preds)
    return acc

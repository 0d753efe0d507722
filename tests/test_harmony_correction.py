"""``embed --correct harmony`` and ``evaluate --corrected`` (issue 8, acceptance 5).

A collection simulated with strong study effects (``simulate --study-effect 3``: gene-wise log-scale
study shifts three times the default) is ingested, embedded with ``pca`` plus its Harmony-corrected
revision, and evaluated cross-data (leave-one-study-out, logreg) on both: the output reports the
AUROC with correction beside the one without, per held-out study and as the mean, and Harmony
lowers the study separation of the embedding. Everything runs through the CLI (CliRunner).

At sigma 0.1 (Harmony's default) studies this far apart are left uncorrected (every soft cluster
holds a single study, so the ridge correction is zero); the test uses ``sigma=0.2``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from scdrugmap.classify.analyze.correction import batch_labels
from scdrugmap.classify.analyze.harmony import load_correction
from scdrugmap.classify.analyze.separation import separation_scores
from scdrugmap.cli import main
from scdrugmap.store import Store
from scdrugmap.store.embeddings import open_array, read_rows

N_CELLS = 1500
STUDY_EFFECT = 3.0


def _run(store: Path, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["--store", str(store), *args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def _ok(store: Path, *args: str) -> str:
    code, out = _run(store, *args)
    assert code == 0, out
    return out


def _catalog_state(st: Store) -> dict[str, int]:
    with st.connect() as con:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        counts = {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                  for t in ("embeddings", "embedded_cells", "corrections") if t in tables}  # fmt: skip
    zarr_dirs = sorted(p.relative_to(st.zarr_path).as_posix() for p in st.zarr_path.glob("*/*") if p.is_dir())
    return {**counts, "zarr": len(zarr_dirs)}


@pytest.fixture(scope="module")
def strong(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding the strong-study-effect collection, ingested (nothing embedded yet)."""
    root = tmp_path_factory.mktemp("harmony")
    sim = root / "sim"
    _ok(root / "unused", "simulate", "--out", str(sim), "--n-cells", str(N_CELLS),
        "--study-effect", str(STUDY_EFFECT))  # fmt: skip
    store = root / "store"
    _ok(store, "ingest", "--manifest", str(sim / "manifest.csv"))
    return store


def test_bad_correction_options_are_refused_before_embedding(strong: Path) -> None:
    st = Store.open(strong)
    before = _catalog_state(st)
    code, out = _run(strong, "embed", "--model", "pca", "--batch-key", "study")
    assert code == 2
    assert "--batch-key and --correct-option apply only with --correct harmony" in out
    code, out = _run(strong, "embed", "--model", "pca", "--correct", "harmony", "--batch-key", "nosuch")
    assert code == 1
    assert out.startswith("Error: unknown batch key 'nosuch'; use sample_id or a dataset field")
    code, out = _run(strong, "embed", "--model", "pca", "--correct", "harmony", "--batch-key", "collection")
    assert code == 1
    assert "batch key 'collection' has 1 value(s) in the selection; Harmony needs ≥ 2 batches" in out
    code, out = _run(
        strong, "embed", "--model", "pca", "--correct", "harmony", "--correct-option", "sigma=-1"
    )
    assert code == 1
    assert "Harmony option(s) out of range: sigma=-1.0" in out
    code, out = _run(
        strong, "embed", "--model", "pca", "--correct", "harmony", "--correct-option", "lambda=1"
    )
    assert code == 1
    assert "unknown Harmony option 'lambda'" in out
    assert _catalog_state(st) == before  # nothing embedded, nothing corrected


def test_failed_correction_keeps_the_complete_embedding(strong: Path) -> None:
    st = Store.open(strong)
    code, out = _run(strong, "embed", "--model", "pca", "--no-progress", "--correct", "harmony",
                     "--correct-option", "nclust=100000")  # fmt: skip
    assert code == 1, out
    assert (
        "is complete and kept, but the Harmony correction failed: Harmony option nclust=100000 exceeds" in out
    )
    emb = st.query("SELECT model, status, rows_done FROM embeddings")
    assert emb["model"].tolist() == ["pca"]  # the uncorrected embedding stays, no corrected row
    assert emb["status"].iloc[0] == "complete"
    assert _catalog_state(st).get("corrections", 0) == 0
    assert not (st.zarr_path / "pca_harmony").exists() or not any((st.zarr_path / "pca_harmony").iterdir())


def _study_separation(st: Store, model: str, revision: str) -> dict[str, float]:
    uids = st.query("SELECT cell_uid FROM embedded_cells WHERE revision = ? ORDER BY 1", [revision])
    uids = uids["cell_uid"].to_numpy(dtype=np.int64)
    X = read_rows(open_array(st, model, revision), uids)
    return separation_scores(X, batch_labels(st, uids, "study").to_numpy(), k=15, seed=0)


def test_strong_study_effects_corrected_vs_uncorrected_cross_auroc(strong: Path) -> None:
    st = Store.open(strong)
    out = _ok(strong, "embed", "--model", "pca", "--no-progress", "--correct", "harmony", "--batch-key", "study",
              "--correct-option", "sigma=0.2")  # fmt: skip
    print(out)
    corr = load_correction(st, "pca_harmony")
    assert f"uncorrected: pca revision {corr.source_revision}" in out
    assert f"pca_harmony revision {corr.revision}: Harmony on pca revision {corr.source_revision}" in out
    assert "scdrugmap evaluate --model pca --corrected pca_harmony" in out
    assert corr.n_batches == 8
    assert corr.n_cells == st.query("SELECT COUNT(*) AS n FROM cells")["n"].iloc[0]
    emb = st.query("SELECT model, status, rows_done FROM embeddings ORDER BY model")
    assert emb["model"].tolist() == ["pca", "pca_harmony"]
    assert (emb["status"] == "complete").all()

    # Harmony lowers the study separation of the embedding
    before = _study_separation(st, "pca", corr.source_revision)
    after = _study_separation(st, "pca_harmony", corr.revision)
    print(f"study separation: silhouette {before['silhouette']:.3f} -> {after['silhouette']:.3f}, "
          f"kNN purity {before['knn_purity']:.3f} -> {after['knn_purity']:.3f} "
          f"(random {before['knn_purity_expected']:.3f})")  # fmt: skip
    assert after["silhouette"] < before["silhouette"]
    assert after["knn_purity"] < before["knn_purity"] - 0.1

    # the same command again reuses both revisions
    again = _ok(strong, "embed", "--model", "pca", "--no-progress", "--correct", "harmony",
                "--correct-option", "sigma=0.2")  # fmt: skip
    assert "0 cells embedded now" in again
    assert f"pca_harmony revision {corr.revision}" in again
    assert "(already stored)" in again

    out = _ok(strong, "evaluate", "--model", "pca", "--corrected", "pca_harmony", "--head", "logreg",
              "--protocol", "cross", "--category", "tissue")  # fmt: skip
    print(out)
    head = "category value protocol head fold auroc_uncorrected auroc_corrected difference"
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if " ".join(ln.split()) == head)
    assert "AUROC without and with study correction (pca vs pca_harmony)" in lines[start - 1]
    table = st.query("SELECT * FROM correction_metrics WHERE metric = 'auroc' ORDER BY value, fold")
    studies = st.query("SELECT DISTINCT study FROM datasets ORDER BY 1")["study"].tolist()
    per_study = table[table["fold"] != "mean"]
    assert sorted(per_study["fold"]) == studies  # one row per held-out study
    assert len(table[table["fold"] == "mean"]) == 3  # one mean per tissue
    for col in ("uncorrected", "corrected"):
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in table[col])
    for r in per_study.itertuples():  # printed beside each other, per held-out study
        row = next(ln for ln in lines[start:] if f" {r.fold} " in ln)
        assert f"{r.uncorrected:.4f}".rstrip("0") in row
        assert f"{r.corrected:.4f}".rstrip("0") in row
    assert set(table["run_uncorrected"]) <= set(
        st.query("SELECT run_id FROM eval_runs WHERE model = 'pca'")["run_id"]
    )
    assert set(table["run_corrected"]) <= set(
        st.query("SELECT run_id FROM eval_runs WHERE model = 'pca_harmony'")["run_id"]
    )
    means = table[table["fold"] == "mean"].set_index("value")
    print("cross-data AUROC (logreg), uncorrected vs Harmony-corrected:")
    for r in per_study.itertuples():
        print(f"  {r.value} / held-out {r.fold}: {r.uncorrected:.3f} vs {r.corrected:.3f}")
    for value, r in means.iterrows():
        print(f"  {value} mean: {r['uncorrected']:.3f} vs {r['corrected']:.3f}")
    all_metrics = st.query(
        "SELECT metric, AVG(uncorrected) AS uncorrected, AVG(corrected) AS corrected FROM correction_metrics "
        "WHERE fold = 'mean' GROUP BY metric ORDER BY metric"
    )
    print("mean over tissues, uncorrected vs corrected:")
    print(all_metrics.round(3).to_string(index=False))
    assert {"auroc", "auprc", "f1", "mcc"} <= set(all_metrics["metric"])

    # a correction of another model is refused before anything is evaluated
    code, out = _run(
        strong, "evaluate", "--model", "hvg", "--corrected", "pca_harmony", "--protocol", "cross"
    )
    assert code == 1
    assert "'pca_harmony' was corrected from 'pca', not 'hvg'; use --model pca" in out


def test_write_embedding_leaves_nothing_when_the_catalog_write_fails(strong: Path) -> None:
    import pandas as pd

    from scdrugmap.classify.analyze.harmony import write_embedding

    st = Store.open(strong)
    before = _catalog_state(st)
    uids = np.arange(10, dtype=np.int64)
    with pytest.raises(Exception, match="no_such_table"):
        write_embedding(st, "pca_broken", "rev0", uids, np.zeros((10, 4), np.float32), spec={},
                        extra_rows=[("no_such_table", pd.DataFrame({"revision": ["rev0"]}))])  # fmt: skip
    assert _catalog_state(st) == before  # no catalog row, and the new Zarr array is removed again
    assert not (st.zarr_path / "pca_broken" / "rev0").exists()
    code, out = _run(strong, "evaluate", "--model", "pca", "--corrected", "pca", "--protocol", "cross")
    assert code == 1
    assert "'pca' (revision" in out
    assert "is not a corrected embedding" in out

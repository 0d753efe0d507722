"""Label-confidence stars derived at ingest, the schema migration, evaluate --min-confidence, strata."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pytest
from click.testing import CliRunner
from synth import toy_adata

from scdrugmap.classify.analyze.confidence import confidence_stars as analyze_confidence_stars
from scdrugmap.classify.analyze.confidence import dataset_confidence
from scdrugmap.cli import main
from scdrugmap.embedder.runner import embed_datasets
from scdrugmap.store import Store
from scdrugmap.store.catalog import SCHEMA_VERSION
from scdrugmap.store.confidence import confidence_stars
from scdrugmap.store.errors import InputError
from scdrugmap.store.metadata import clean_meta

EVIDENCE_COLUMNS = ("exposure_days", "sample_origin", "intrinsic_resistance", "confidence_source")


def _run(*args: str) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def _fails(*args: str) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 1, res.output
    assert res.output.strip().startswith("Error:"), res.output
    assert "Traceback" not in res.output
    return res.output


def _files(store: Path) -> list[str]:
    return sorted(
        str(p.relative_to(store)) for p in store.rglob("*") if p.is_file() and not p.name.endswith(".wal")
    )


# ---- the rule and the metadata fields -------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "stars", "source"),
    [
        ({"sample_origin": "Metastatic"}, 3, "derived"),
        ({"sample_origin": "relapsed"}, 3, "derived"),
        ({"sample_origin": "recurrent tumour"}, 3, "derived"),
        ({"sample_origin": "PDX"}, 3, "derived"),
        ({"sample_origin": "  Patient-derived   Xenograft "}, 3, "derived"),
        ({"sample_origin": "mouse tumour", "exposure_days": "3"}, 3, "derived"),
        ({"intrinsic_resistance": "yes"}, 3, "derived"),
        ({"intrinsic_resistance": "TRUE", "exposure_days": "5"}, 3, "derived"),
        ({"exposure_days": "200"}, 3, "derived"),  # regained proliferation after > 6 months
        ({"exposure_days": "180"}, 2, "derived"),
        ({"exposure_days": "30"}, 2, "derived"),
        ({"exposure_days": "29.5"}, 1, "derived"),
        ({"exposure_days": "0"}, 1, "derived"),
        ({"sample_origin": "non-metastatic primary"}, None, None),  # negated: no evidence
        ({"sample_origin": "primary"}, None, None),
        ({"intrinsic_resistance": "no"}, None, None),
        ({"tissue": "Cell line"}, None, None),
        ({"label_confidence": "1", "sample_origin": "metastatic"}, 1, "explicit"),  # explicit wins
        ({"label_confidence": "3", "exposure_days": "2"}, 3, "explicit"),
        ({"label_confidence": "2"}, 2, "explicit"),
    ],
)
def test_clean_meta_derives_stars(meta: dict, stars: int | None, source: str | None) -> None:
    out = clean_meta(meta, dataset_id="d")
    assert out.get("label_confidence") == stars
    assert out.get("confidence_source") == source


def test_evidence_fields_are_normalised() -> None:
    out = clean_meta(
        {"exposure_days": "45", "sample_origin": " Primary  Tumour ", "intrinsic_resistance": "0"},
        dataset_id="d",
    )
    assert out["exposure_days"] == 45.0
    assert out["sample_origin"] == "primary tumour"
    assert out["intrinsic_resistance"] is False
    assert out["label_confidence"] == 2
    for value, expected in (("1", True), ("No", False), ("false", False), ("Yes", True), (True, True)):
        assert clean_meta({"intrinsic_resistance": value}, dataset_id="d")["intrinsic_resistance"] is expected


@pytest.mark.parametrize(
    ("meta", "fragment"),
    [
        ({"exposure_days": "-3"}, "exposure_days must be a number of days ≥ 0"),
        ({"exposure_days": "six months"}, "'six months'"),
        ({"exposure_days": "inf"}, "exposure_days"),
        (
            {"intrinsic_resistance": "maybe"},
            "intrinsic_resistance must be true/false, yes/no or 1/0, got 'maybe'",
        ),
    ],
)
def test_bad_evidence_is_one_clear_error(meta: dict, fragment: str) -> None:
    with pytest.raises(InputError) as exc:
        clean_meta(meta, dataset_id="d")
    assert fragment in str(exc.value)


def test_rule_lives_in_the_store_layer() -> None:
    assert analyze_confidence_stars is confidence_stars
    assert confidence_stars(exposure_days=90) == (2, "90 days of drug (1–6 months)")


# ---- ingest through the CLI ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("conf_h5") / "toy.h5ad"
    toy_adata(seed=3).write_h5ad(path)
    return path


def _ingest(store: Path, path: Path, dataset_id: str, *meta: str) -> str:
    args = ["--store", store, "ingest", path, "--dataset-id", dataset_id, "--label-key", "response"]
    args += ["--sample-key", "sample", "--min-genes", "100"]
    for m in meta:
        args += ["--meta", m]
    return _run(*args)


def test_ingest_derives_and_stores_evidence(tmp_path: Path, h5ad: Path) -> None:
    store = tmp_path / "s"
    out = _ingest(store, h5ad, "met", "sample_origin=Metastatic lymph node", "tissue=Cell line")
    assert "3 star(s) (derived)" in out
    out = _ingest(store, h5ad, "days", "exposure_days=60", "intrinsic_resistance=no")
    assert "2 star(s) (derived)" in out
    out = _ingest(store, h5ad, "expl", "label_confidence=1", "intrinsic_resistance=true")
    assert "1 star(s) (explicit)" in out
    out = _ingest(store, h5ad, "none", "sample_origin=primary")
    assert "star" not in out
    st = Store.open(store)
    ds = st.query(
        "SELECT dataset_id, label_confidence, confidence_source, exposure_days, sample_origin, "
        "intrinsic_resistance FROM datasets ORDER BY dataset_id"
    ).set_index("dataset_id")
    assert ds.loc["met", "label_confidence"] == 3
    assert ds.loc["met", "sample_origin"] == "metastatic lymph node"
    assert ds.loc["days", "exposure_days"] == 60.0
    assert not ds.loc["days", "intrinsic_resistance"]
    assert ds.loc["days", "confidence_source"] == "derived"
    assert ds.loc["expl", "label_confidence"] == 1
    assert ds.loc["expl", "confidence_source"] == "explicit"
    assert bool(ds.loc["expl", "intrinsic_resistance"])
    assert pd.isna(ds.loc["none", "label_confidence"])
    assert ds.loc["none", "confidence_source"] is None
    # the same file with the same options is a no-op
    assert "unchanged" in _ingest(store, h5ad, "days", "exposure_days=60", "intrinsic_resistance=no")
    conf = dataset_confidence(st).set_index("dataset_id")
    assert conf.loc["met", "source"] == "derived"
    assert conf.loc["expl", "source"] == "explicit"
    assert set(conf.loc[["met", "days", "expl"], "set_at"]) == {"ingest"}
    assert conf.loc["none", "source"] is None
    # a table row (analyze confidence set) overrides the ingest value and says so
    _run("--store", store, "analyze", "confidence", "set", "none", "--stars", "2")
    conf = dataset_confidence(st).set_index("dataset_id")
    assert (conf.loc["none", "stars"], conf.loc["none", "source"], conf.loc["none", "set_at"]) == (
        2,
        "explicit",
        "analyze",
    )
    shown = _run("--store", store, "analyze", "confidence", "show")
    assert "derived" in shown
    assert "ingest" in shown
    assert "analyze" in shown


def test_bad_evidence_exits_1_and_changes_nothing(tmp_path: Path, h5ad: Path) -> None:
    store = tmp_path / "s"
    _ingest(store, h5ad, "d1", "exposure_days=10")
    before, files = Store.open(store).snapshot(), _files(store)
    base = [
        "--store",
        store,
        "ingest",
        h5ad,
        "--dataset-id",
        "d2",
        "--label-key",
        "response",
        "--min-genes",
        "100",
    ]
    for meta, fragment in (
        ("exposure_days=-3", "'-3'"),
        ("exposure_days=abc", "'abc'"),
        ("intrinsic_resistance=maybe", "'maybe'"),
        ("label_confidence=4", "1, 2 or 3"),
    ):
        out = _fails(*base, "--meta", meta)
        assert fragment in out, out
        assert Store.open(store).snapshot() == before, meta
        assert _files(store) == files, meta
    # a manifest with one bad row writes nothing (all or nothing)
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "path,dataset_id,label_key,sample_key,min_genes,exposure_days,sample_origin,intrinsic_resistance\n"
        f"{h5ad},m1,response,sample,100,200,,\n"
        f"{h5ad},m2,response,sample,100,,,perhaps\n"
    )
    out = _fails("--store", store, "ingest", "--manifest", manifest)
    assert "'perhaps'" in out
    assert Store.open(store).snapshot() == before
    manifest.write_text(manifest.read_text().replace("perhaps", "yes"))
    out = _run("--store", store, "ingest", "--manifest", manifest)
    assert "m1: ingested" in out
    assert out.count("3 star(s) (derived)") == 2


# ---- migration of a store made by the previous version -----------------------------------------


def _columns(st: Store, table: str) -> list[str]:
    q = "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position"
    return st.query(q, [table])["column_name"].tolist()


def test_migration_of_an_old_store(tmp_path: Path, h5ad: Path) -> None:
    store = tmp_path / "old"
    _ingest(store, h5ad, "d1", "label_confidence=2")
    _ingest(store, h5ad, "d2")
    fresh = {t: _columns(Store.open(store), t) for t in ("datasets", "eval_runs")}
    # make it look like a version-1 catalog: without the new columns
    con = duckdb.connect(str(Store(store).catalog_path))
    for col in EVIDENCE_COLUMNS:
        con.execute(f"ALTER TABLE datasets DROP COLUMN {col}")
    con.execute("ALTER TABLE eval_runs DROP COLUMN min_confidence")
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.close()
    assert "confidence_source" not in _columns(Store(store), "datasets")
    st = Store.open(store)  # migrates
    assert {t: _columns(st, t) for t in fresh} == fresh
    assert st.query("SELECT value FROM meta WHERE key = 'schema_version'")["value"].iloc[0] == SCHEMA_VERSION
    ds = st.query("SELECT dataset_id, label_confidence, confidence_source FROM datasets ORDER BY 1")
    assert ds["confidence_source"].tolist() == ["explicit", None]  # version-1 stars were explicit
    assert Store.open(store).migrate() is None  # idempotent: nothing left to do
    assert Store.open(store).snapshot() == st.snapshot()
    # the migrated store ingests evidence and runs the commands that read it
    assert "1 star(s) (derived)" in _ingest(store, h5ad, "d3", "exposure_days=7")
    assert "derived" in _run("--store", store, "analyze", "confidence", "show")


def test_newer_catalog_is_refused(tmp_path: Path, h5ad: Path) -> None:
    store = tmp_path / "new"
    _ingest(store, h5ad, "d1")
    con = duckdb.connect(str(Store(store).catalog_path))
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    out = _fails("--store", store, "datasets")
    assert "schema version 99" in out
    assert "upgrade scdrugmap" in out


# ---- evaluate --min-confidence and metrics per stratum -------------------------------------------

STARS = {"s0": ("sample_origin=metastatic", 3), "s1": ("exposure_days=60", 2), "s2": ("label_confidence=1", 1),
         "s3": (None, 0)}  # fmt: skip


@pytest.fixture(scope="module")
def evstore(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Four studies of one tissue with 3, 2, 1 and no stars, embedded with pca."""
    tmp = tmp_path_factory.mktemp("conf_eval")
    store = tmp / "store"
    for i, (ds, (meta, _)) in enumerate(STARS.items()):
        path = tmp / f"{ds}.h5ad"
        toy_adata(n_cells=200, seed=20 + i, n_samples=12, prefix=f"{ds}_").write_h5ad(path)
        _ingest(store, path, ds, "tissue=Cell line", *([meta] if meta else []))
    st = Store.open(store)
    embed_datasets(st, "pca", progress=False, options={"n_comps": 10})
    return st


def _cells_by_dataset(st: Store) -> dict[str, int]:
    df = st.query("SELECT dataset_id, COUNT(*) AS n FROM cells WHERE label IS NOT NULL GROUP BY 1")
    return dict(zip(df["dataset_id"], df["n"], strict=True))


def _evaluate(st: Store, *extra: str) -> str:
    return _run("--store", st.path, "evaluate", "--model", "pca", "--head", "logreg", "--category", "tissue",
                "--value", "Cell line", *extra)  # fmt: skip


def test_min_confidence_filters_training_and_test_cells(evstore: Store) -> None:
    st = evstore
    n_by_ds = _cells_by_dataset(st)
    out_all = _evaluate(st)
    out2 = _evaluate(st, "--min-confidence", "2")
    assert "with ≥ 2 stars" in out2
    runs = st.query(
        "SELECT run_id, n_cells, min_confidence, fold_set_id, spec FROM eval_runs WHERE protocol = 'pooled'"
    )
    by_k = runs.set_index("min_confidence")
    assert by_k.loc[0, "n_cells"] == sum(n_by_ds.values())
    assert by_k.loc[2, "n_cells"] == n_by_ds["s0"] + n_by_ds["s1"]
    assert by_k.loc[0, "run_id"] in out_all
    assert by_k.loc[2, "run_id"] in out2
    assert by_k.loc[0, "fold_set_id"] == by_k.loc[2, "fold_set_id"]  # same persisted partition
    assert '"min_confidence": 2' in by_k.loc[2, "spec"]
    pred = st.query(
        "SELECT p.cell_uid, p.fold, c.dataset_id, f.fold AS fs_fold FROM predictions p JOIN cells c USING (cell_uid) "
        "JOIN folds f ON f.cell_uid = p.cell_uid AND f.fold_set_id = ? WHERE p.run_id = ?",
        [by_k.loc[2, "fold_set_id"], by_k.loc[2, "run_id"]],
    )
    assert set(pred["dataset_id"]) == {"s0", "s1"}
    assert len(pred) == by_k.loc[2, "n_cells"]
    assert (pred["fold"] == pred["fs_fold"]).all()
    # training sides hold only kept cells too: n_train + n_test = kept cells in every fold
    m = st.query(
        "SELECT DISTINCT fold, n_train, n_test FROM metrics WHERE run_id = ?", [by_k.loc[2, "run_id"]]
    )
    assert ((m["n_train"] + m["n_test"]) == by_k.loc[2, "n_cells"]).all()
    # the filtered run is keyed by its filter: repeating it is answered from the catalog
    assert "(from catalog)" in _evaluate(st, "--min-confidence", "2")
    # three stars: s0 only; folds left without s0 test cells say why their metrics are NULL
    _evaluate(st, "--min-confidence", "3", "--protocol", "pooled")
    r3 = st.query("SELECT run_id, n_cells FROM eval_runs WHERE min_confidence = 3").iloc[0]
    assert r3["n_cells"] == n_by_ds["s0"]
    empty = st.query("SELECT DISTINCT reason FROM metrics WHERE run_id = ? AND n_test = 0", [r3["run_id"]])
    assert set(empty["reason"]) <= {"no test cells from datasets with ≥ 3 stars"}
    # results keep filtered and unfiltered runs apart
    res = _run("--store", st.path, "results", "--where", "model = 'pca' AND protocol = 'pooled'")
    assert "min_confidence" in res


def test_min_confidence_cross_data(evstore: Store) -> None:
    st = evstore
    out = _evaluate(st, "--protocol", "cross", "--min-confidence", "2", "--by-confidence")
    run = st.query(
        "SELECT run_id, n_cells FROM eval_runs WHERE protocol = 'cross' AND min_confidence = 2"
    ).iloc[0]
    m = st.query(
        "SELECT fold, n_test, reason FROM metrics WHERE run_id = ? AND metric = 'auroc'", [run["run_id"]]
    )
    names = st.query("SELECT fold_names FROM fold_sets WHERE protocol = 'cross'")["fold_names"].iloc[0]
    assert names == '["s0", "s1", "s2", "s3"]'
    assert m.set_index("fold").loc[[2, 3], "reason"].eq("no test cells from datasets with ≥ 2 stars").all()
    assert (m.set_index("fold").loc[[0, 1], "n_test"] > 0).all()
    assert "Per label-confidence stratum" in out
    # one study with 3 stars cannot be held out against another
    before = st.snapshot()
    err = _fails("--store", st.path, "evaluate", "--model", "pca", "--head", "logreg", "--category", "tissue",
                 "--value", "Cell line", "--protocol", "cross", "--min-confidence", "3")  # fmt: skip
    assert "needs ≥ 2 studies with ≥ 3 stars" in err
    assert st.snapshot() == before


def test_min_confidence_errors_leave_catalog_unchanged(evstore: Store) -> None:
    st = evstore
    before = st.snapshot()
    base = ["--store", st.path, "evaluate", "--model", "pca", "--head", "logreg"]
    err = _fails(*base, "--category", "dataset_id", "--value", "s3", "--k", "3", "--min-confidence", "1")
    assert "no labelled cells of dataset_id = 's3' come from datasets with ≥ 1 stars" in err
    assert "no stars: " in err
    assert "lower --min-confidence" in err
    err = _fails(*base, "--category", "tissue", "--value", "Cell line", "--min-confidence", "5")
    assert "--min-confidence must be 1, 2 or 3" in err
    # every value of the category: none has cells with enough stars
    err = _fails(
        *base, "--category", "dataset_id", "--k", "3", "--min-confidence", "3", "--protocol", "cross"
    )
    assert "with --min-confidence 3" in err
    assert st.snapshot() == before


def test_metrics_per_confidence_stratum(evstore: Store) -> None:
    st = evstore
    n_by_ds = _cells_by_dataset(st)
    out = _evaluate(st, "--by-confidence")
    assert "Per label-confidence stratum" in out
    assert "stars" in out
    run_id = st.query("SELECT run_id FROM eval_runs WHERE protocol = 'pooled' AND min_confidence = 0")[
        "run_id"
    ].iloc[0]
    m = st.query(
        "SELECT stars, n_cells, n_datasets, value FROM confidence_metrics WHERE run_id = ? AND metric = 'auroc' "
        "ORDER BY stars",
        [run_id],
    )
    expected = {stars: n_by_ds[ds] for ds, (_, stars) in STARS.items()}
    assert dict(zip(m["stars"], m["n_cells"], strict=True)) == expected
    assert (m["n_datasets"] == 1).all()
    assert m["value"].between(0, 1).all()
    n_pred = st.query("SELECT COUNT(*) AS n FROM predictions WHERE run_id = ?", [run_id])["n"].iloc[0]
    assert m["n_cells"].sum() == n_pred
    # a filtered run has only its strata
    run2 = st.query("SELECT run_id FROM eval_runs WHERE protocol = 'pooled' AND min_confidence = 2")
    if not run2.empty:
        s2 = st.query(
            "SELECT DISTINCT stars FROM confidence_metrics WHERE run_id = ?", [run2["run_id"].iloc[0]]
        )
        assert set(s2["stars"]) == {2, 3}

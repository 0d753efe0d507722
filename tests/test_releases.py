"""Issue 21, acceptance 3: an integrated release built twice from the same inputs has the same id and
the same bytes; other inputs (Harmony parameters, one more dataset) give a new id; a bad value is
refused with nothing written. Everything through ``scdrugmap release`` (CliRunner)."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from scdrugmap.cli import main
from scdrugmap.embedder.runner import embed_datasets
from scdrugmap.store import Store
from scdrugmap.store.manifest import ingest_manifest
from scdrugmap.store.simulate import simulate_collection


def _run(store: Path, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["--store", str(store), *args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def _ok(store: Path, *args: str) -> str:
    code, out = _run(store, *args)
    assert code == 0, out
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _state(store: Path) -> tuple:
    st = Store.open(store)
    counts = st.snapshot()
    n_emb = int(st.query("SELECT COUNT(*) AS n FROM embeddings")["n"].iloc[0])
    files = sorted(p.name for p in (store / "releases").glob("*")) if (store / "releases").exists() else []
    return counts, n_emb, files


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Three datasets of the simulated collection (drug_class chemotherapy = SIM02 + SIM04, two studies),
    ingested and embedded with a 10-component pca. Returns (store, simulation folder)."""
    root = tmp_path_factory.mktemp("releases")
    simulate_collection(root / "sim", n_cells=600, n_genes=1000, seed=0)
    man = pd.read_csv(root / "sim" / "manifest.csv")
    man[man["dataset_id"].isin(["SIM01", "SIM02", "SIM04"])].to_csv(root / "sim" / "some.csv", index=False)
    st = Store.open(root / "store", create=True)
    ingest_manifest(st, root / "sim" / "some.csv")
    embed_datasets(st, "pca", progress=False, options={"n_comps": 10})
    return root / "store", root / "sim"


def _built(out: str) -> str:
    m = re.search(r"release (\S+) (built|exists already)", out)
    assert m, out
    return m.group(1)


@pytest.mark.slow
def test_same_inputs_same_id_and_bytes_other_inputs_new_id(sim: tuple[Path, Path], tmp_path: Path) -> None:
    store, simdir = sim
    twin = tmp_path / "twin"
    shutil.copytree(store, twin)  # the same store, before any release: a second, independent build
    args = ("release", "build", "--category", "drug_class", "--value", "chemotherapy", "--model", "pca")
    out = _ok(store, *args)
    rid = _built(out)
    assert "built" in out
    assert rid.startswith("drug_class-chemotherapy-")
    path = store / "releases" / f"{rid}.h5ad"
    first = _sha(path)
    mtime = path.stat().st_mtime_ns

    again = _ok(store, *args)  # same store, same inputs: the same release, nothing rewritten
    assert _built(again) == rid
    assert "exists already" in again
    assert path.stat().st_mtime_ns == mtime
    assert _sha(path) == first
    twin_out = _ok(twin, *args)  # another store with the same inputs: same id, same bytes
    assert _built(twin_out) == rid
    assert "built" in twin_out
    assert _sha(twin / "releases" / f"{rid}.h5ad") == first

    row = Store.open(store).query("SELECT * FROM releases WHERE release_id = ?", [rid]).iloc[0]
    assert row["content_hash"] == first
    assert row["n_datasets"] == 2
    assert str(row["created_date"])[:4] == "2026"

    exported = tmp_path / "chemo.h5ad"
    _ok(store, "release", "export", rid[:30], "-o", str(exported))
    assert _sha(exported) == first
    a = ad.read_h5ad(exported)
    assert {"label", "stars", "study", "dataset_id", "sample_id", "patient_id"} <= set(a.obs.columns)
    assert set(a.obs["dataset_id"]) == {"SIM02", "SIM04"}
    assert a.obs["study"].nunique() == 2
    assert list(a.obs["cell_uid"]) == sorted(a.obs["cell_uid"])
    stars = Store.open(store).datasets().set_index("dataset_id")["label_confidence"]
    assert (a.obs["stars"].astype(int).to_numpy() == stars.loc[a.obs["dataset_id"]].to_numpy()).all()
    assert set(a.obs["label"].dropna()) == {"sensitive", "resistant"}
    assert a.obsm["X_pca"].shape == a.obsm["X_pca_harmony"].shape == (a.n_obs, 10)
    assert not np.allclose(a.obsm["X_pca"], a.obsm["X_pca_harmony"])
    meta = a.uns["scdrugmap_release"]
    assert meta["release_id"] == rid
    assert meta["batch_key"] == "study"
    assert meta["value"] == "chemotherapy"

    # other correction parameters: a new id; the first release stays as it was
    other = _built(_ok(store, *args, "--harmony", "theta=1"))
    assert other != rid
    assert _sha(path) == first
    listing = _ok(store, "release", "list")
    assert rid in listing
    assert other in listing

    # one more dataset of the same drug class (another study): a new id over three datasets
    extra = simdir / "SIM09.h5ad"
    shutil.copyfile(simdir / "SIM02.h5ad", extra)
    man = pd.read_csv(simdir / "manifest.csv")
    row9 = man[man["dataset_id"] == "SIM02"].assign(path="SIM09.h5ad", dataset_id="SIM09", study="SIM-S09")
    row9.to_csv(simdir / "extra.csv", index=False)
    ingest_manifest(Store.open(store), simdir / "extra.csv")
    embed_datasets(Store.open(store), "pca", progress=False, options={"n_comps": 10})
    grown = _ok(store, *args)
    assert _built(grown) not in (rid, other)
    assert "3 dataset(s)" in grown
    assert _sha(path) == first


@pytest.mark.slow
def test_bad_value_is_refused_with_nothing_written(sim: tuple[Path, Path]) -> None:
    store, _ = sim
    before = _state(store)
    code, out = _run(
        store, "release", "build", "--category", "drug_class", "--value", "Chemotherapy", "--model", "pca"
    )
    assert code == 1, out
    assert "did you mean 'chemotherapy'" in out, out
    code, out = _run(
        store, "release", "build", "--category", "drug", "--value", "cisplatin", "--model", "pca"
    )
    assert code == 1, out
    assert "batch key 'study' has 1 value" in out, out  # one study: nothing to integrate
    code, out = _run(
        store, "release", "build", "--category", "drug", "--value", "cisplatin", "--model", "nomodel"
    )
    assert code == 1, out
    assert "nomodel" in out, out
    code, out = _run(store, "release", "build", "--category", "drug_class", "--value", "chemotherapy",
                     "--model", "pca", "--harmony", "theta=-1")  # fmt: skip
    assert code == 1, out
    assert "theta=-1" in out, out
    code, out = _run(store, "release", "export", "no-such-release", "-o", str(store / "x.h5ad"))
    assert code == 1, out
    assert "'no-such-release' is not stored" in out, out
    assert _state(store) == before


@pytest.mark.slow
def test_service_lists_and_serves_the_release_file(sim: tuple[Path, Path]) -> None:
    from fastapi.testclient import TestClient

    from scdrugmap.classify.analyze.releases import build_release
    from scdrugmap.classify.service import create_app

    store, _ = sim
    rel = build_release(Store.open(store), "drug_class", "chemotherapy", model="pca")  # built or found
    with TestClient(create_app(store)) as client:
        items = client.get("/releases").json()["items"]
        item = next(i for i in items if i["release_id"] == rel.release_id)
        assert item["n_cells"] == rel.n_cells
        res = client.get(item["download"])
        assert res.status_code == 200
        assert hashlib.sha256(res.content).hexdigest() == rel.content_hash
        assert f"{rel.release_id}.h5ad" in res.headers["content-disposition"]
        missing = client.get("/releases/no-such-release/download")
        assert missing.status_code == 404
        assert "no-such-release" in missing.json()["detail"]


def test_release_file_bytes_do_not_depend_on_when_they_are_written(tmp_path: Path) -> None:
    import time

    from scdrugmap.classify.analyze.releases import _anndata, _write

    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {"label": pd.Categorical(["sensitive", "resistant", None], categories=["sensitive", "resistant"]),
         "stars": pd.array([3, 2, None], dtype="Int8"), "study": pd.Categorical(["a", "b", "a"]),
         "cell_uid": np.arange(3, dtype=np.int64)},
        index=["d:x", "d:y", "e:z"],
    )  # fmt: skip
    spec = {"category": "drug", "value": "v", "model": "pca", "revision": "r", "corrected_revision": "c",
            "batch_key": "study", "datasets": ["d", "e"], "harmony": {"theta": 2.0, "nclust": None}}  # fmt: skip
    meta = {"release_id": "drug-v-0", "inputs_hash": "0" * 64, "spec": spec, "versions": {"anndata": "x"}}
    obsm = {"X_pca": rng.normal(size=(3, 4)).astype(np.float32)}
    _write(_anndata(obs, obsm, meta), tmp_path / "a.h5ad")
    time.sleep(1.1)  # HDF5 object timestamps have a one-second resolution
    _write(_anndata(obs.copy(), dict(obsm), meta), tmp_path / "b.h5ad")
    assert _sha(tmp_path / "a.h5ad") == _sha(tmp_path / "b.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    assert back.uns["scdrugmap_release"]["release_id"] == "drug-v-0"
    assert back.obs["stars"].isna().sum() == 1


def test_bad_scope_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from scdrugmap.classify.analyze.releases import build_release, export_release
    from scdrugmap.store.errors import InputError, StoreError

    st = Store.open(tmp_path / "store", create=True)
    with pytest.raises(InputError, match="unknown release category 'study'"):
        build_release(st, "study", "x", model="pca")
    with pytest.raises(InputError, match="no dataset has drug = 'cisplatin'; values in the store: none"):
        build_release(st, "drug", "cisplatin", model="pca")
    with pytest.raises(StoreError, match="'nope' is not stored"):
        export_release(st, "nope", tmp_path / "out.h5ad")
    assert not (tmp_path / "store" / "releases").exists()
    assert not (tmp_path / "out.h5ad").exists()

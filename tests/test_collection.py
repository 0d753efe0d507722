"""Issue 19: the shipped collection manifest, and `collection fetch | prepare` → `ingest --manifest` offline."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile

import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from click.testing import CliRunner
from conftest import shared_path
from http_fixture import serve

from scdrugmap.cli import main
from scdrugmap.store.catalog import Store
from scdrugmap.store.collection_build import (
    COLLECTION_COLUMNS,
    DEFAULT_COLLECTION,
    build_collection,
    geo_suppl_url,
)

GENES = [f"GENE{i}" for i in range(700)]


def _cli(*args: str, ok: bool = True):
    res = CliRunner().invoke(main, list(args))
    if ok:
        assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def test_shipped_manifest_has_the_60_catalogue_datasets():
    catalogue = shared_path("catalog", "scdrugmap_datasets.csv")
    shipped = pd.read_csv(DEFAULT_COLLECTION, dtype=str, keep_default_na=False)
    cat = pd.read_csv(catalogue, dtype=str, keep_default_na=False)
    assert len(shipped) == len(cat) == 60
    assert list(shipped.columns) == list(COLLECTION_COLUMNS)
    assert shipped["dataset_id"].is_unique
    assert (shipped["collection"].value_counts().to_dict()) == {"primary": 36, "external": 24}
    np.testing.assert_array_equal(shipped["accession"], cat["RawData_ID"].str.strip())
    np.testing.assert_array_equal(shipped["series"], cat["scDrugMap_collection_series_number"])
    assert (shipped["accession"] != "").all()
    assert shipped["geo_series"].str.match(r"GSE\d+$").all()
    assert set(shipped["access"]) == {"open", "controlled"}
    controlled = shipped["accession"].str.startswith("EGA") | shipped["accession"].str.contains("HRA")
    np.testing.assert_array_equal(shipped["access"] == "controlled", controlled)
    assert (shipped.loc[controlled, "files"] == "").all()
    assert (shipped.loc[controlled, "access_note"] != "").all()
    open_rows = shipped[~controlled]
    assert all(
        f == geo_suppl_url(g, f"{g}_RAW.tar")
        for f, g in zip(open_rows["files"], open_rows["geo_series"], strict=True)
    )
    assert (shipped["files_confirmed"] == "no").all()
    # no guessed labels: nothing is curated, and rows without a catalogue rule say so
    assert (shipped["sample_labels"] == "").all()
    assert set(shipped["status"]) == {"needs_curation", "rule_from_catalogue"}
    assert (shipped.loc[shipped["status"] == "rule_from_catalogue", "label_rule"] != "").all()
    assert (shipped.loc[shipped["status"] == "needs_curation", "label_rule"] == "").all()
    # "pre (resistant 2, sensitive 1)": per-patient response, which patient is which unknown
    first = shipped.iloc[0]
    assert (first["n_resistant"], first["n_sensitive"], first["status"]) == ("2", "1", "needs_curation")
    pdx = shipped[shipped["source"] == "PDX"]
    assert len(pdx)
    assert (pdx["sample_origin"] == "pdx").all()
    # reproducible: rebuilding from the catalogue gives the shipped file
    pd.testing.assert_frame_equal(build_collection(catalogue), shipped)


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _counts(rng, n_cells: int, shift: float) -> np.ndarray:
    lam = np.full(len(GENES), 3.0)
    lam[:50] += shift
    return rng.poisson(lam, size=(n_cells, len(GENES))).astype(np.int64)


def _tenx_tar(rng, samples: dict[str, float]) -> bytes:
    """A GEO-style _RAW.tar with one 10x v3 triplet per sample (GSM prefixes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for prefix, shift in samples.items():
            x = _counts(rng, 30, shift)
            mtx = io.BytesIO()
            scipy.io.mmwrite(mtx, sp.coo_matrix(x.T))
            feats = "".join(f"ENSG{i:011d}\t{g}\tGene Expression\n" for i, g in enumerate(GENES))
            bars = "".join(f"CELL{i:03d}-1\n" for i in range(x.shape[0]))
            for name, data in (("matrix.mtx.gz", mtx.getvalue()), ("features.tsv.gz", feats.encode()),
                               ("barcodes.tsv.gz", bars.encode())):  # fmt: skip
                info = tarfile.TarInfo(f"{prefix}{name}")
                blob = _gz(data)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def _table(rng) -> bytes:
    """A genes × cells count table of two samples (cell names S1_…, S2_…)."""
    x = np.vstack([_counts(rng, 25, 4.0), _counts(rng, 25, 0.0)])
    cols = [f"S1_{i}" for i in range(25)] + [f"S2_{i}" for i in range(25)]
    return _gz(pd.DataFrame(x.T, index=GENES, columns=cols).to_csv().encode())


def _row(dataset_id: str, gse: str, files: list[str], **kw: str) -> dict[str, str]:
    row = dict.fromkeys(COLLECTION_COLUMNS, "")
    row.update(dataset_id=dataset_id, collection="primary", series="DataX", study=gse, geo_series=gse,
               accession="PRJNA1", accession_type="SRA", access="open", files="|".join(files),
               files_confirmed="yes", label_unit="sample", status="curated", tissue="Cell line",
               cancer_type="Lung cancer", drug_class="targeted therapy", regimen="erlotinib", source="PC9 cell line",
               sample_origin="cell line", technology="10x genomics", organism="Homo sapiens", pmid="33712615")  # fmt: skip
    row.update(kw)
    return row


@pytest.fixture
def site(tmp_path):
    """Two GEO-shaped series served from 127.0.0.1: a 10x _RAW.tar and a csv.gz count table."""
    rng = np.random.default_rng(0)
    root = tmp_path / "www"
    tar_path = root / "geo/series/GSE900nnn/GSE900001/suppl/GSE900001_RAW.tar"
    tab_path = root / "geo/series/GSE900nnn/GSE900002/suppl/GSE900002_counts.csv.gz"
    for path, data in (
        (tar_path, _tenx_tar(rng, {"GSM1_pre_": 4.0, "GSM2_post_": 0.0, "GSM3_other_drug_": 1.0})),
        (tab_path, _table(rng)),
    ):
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
    tar_sha = hashlib.sha256(tar_path.read_bytes()).hexdigest()
    rows = [
        _row("pc9_a", "GSE900001", [geo_suppl_url("GSE900001", "GSE900001_RAW.tar")], sha256=tar_sha,
             size=str(tar_path.stat().st_size), sample_labels="GSM1=sensitive|GSM2=resistant|*=exclude"),
        _row("tab_b", "GSE900002", [geo_suppl_url("GSE900002", "GSE900002_counts.csv.gz")],
             sample_labels="S1=sensitive|S2=resistant", sample_regex=r"^(S\d+)_", tissue="Organoid"),
        _row("bad_sha", "GSE900001", [geo_suppl_url("GSE900001", "GSE900001_RAW.tar")], sha256="0" * 64),
        _row("needs", "GSE900002", [geo_suppl_url("GSE900002", "GSE900002_counts.csv.gz")], status="needs_curation",
             curation_note="which sample is which is not public", sample_regex=r"^(S\d+)_"),
    ]  # fmt: skip
    manifest = tmp_path / "collection.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    with serve(root) as (url, log, cut):
        yield {"manifest": manifest, "url": url, "log": log, "cut": cut, "tar": tar_path, "tmp": tmp_path}


def _col(site, *args: str, ok: bool = True):
    store = site["tmp"] / "store"
    return _cli("--store", str(store), "collection", "--collection", str(site["manifest"]), *args, ok=ok)


def test_fetch_prepare_ingest_end_to_end(site):
    out = _col(site, "fetch", "pc9_a", "tab_b", "--mirror", site["url"]).output
    assert "GSE900001_RAW.tar: 100% of" in out  # not a terminal: plain progress lines instead of a bar
    assert "GSE900001_RAW.tar downloaded" in out
    assert "GSE900002_counts.csv.gz downloaded" in out
    assert {p for p, _ in site["log"]} == {
        "geo/series/GSE900nnn/GSE900001/suppl/GSE900001_RAW.tar",
        "geo/series/GSE900nnn/GSE900002/suppl/GSE900002_counts.csv.gz",
    }  # GEO's paths, served by the mirror
    listing = _col(site, "list").output
    assert "fetched" in listing
    assert "prepared/manifest.csv" in _col(site, "prepare", "pc9_a", "tab_b").output
    manifest = site["tmp"] / "store" / "cache" / "collection" / "prepared" / "manifest.csv"
    m = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    assert list(m["dataset_id"]) == ["pc9_a", "tab_b"]
    assert set(m["drug"]) == {"erlotinib"}
    assert set(m["label_key"]) == {"response"}
    assert "prepared" in _col(site, "list").output
    _cli("--store", str(site["tmp"] / "store"), "ingest", "--manifest", str(manifest))
    st = Store.open(site["tmp"] / "store")
    ds = st.datasets().set_index("dataset_id")
    assert ds.loc["pc9_a", "tissue"] == "Cell line"
    assert ds.loc["tab_b", "tissue"] == "Organoid"
    cells = st.query(
        "SELECT dataset_id, sample_id, label, COUNT(*) AS n FROM cells GROUP BY ALL ORDER BY ALL"
    )
    assert cells.values.tolist() == [
        ["pc9_a", "GSM1_pre", "sensitive", 30], ["pc9_a", "GSM2_post", "resistant", 30],
        ["tab_b", "S1", "sensitive", 25], ["tab_b", "S2", "resistant", 25],
    ]  # fmt: skip
    # a second fetch verifies and keeps the files; nothing is downloaded again
    n = len(site["log"])
    again = _col(site, "fetch", "pc9_a", "tab_b", "--mirror", site["url"], "--no-progress").output
    assert again.count(" present (") == 2  # tab_b has no published checksum: verified against the fetch log
    assert len(site["log"]) == n


def test_interrupted_download_resumes(site):
    rel = "geo/series/GSE900nnn/GSE900001/suppl/GSE900001_RAW.tar"
    site["cut"][rel] = 5000
    res = _col(site, "fetch", "pc9_a", "--mirror", site["url"], "--retries", "0", "--no-progress", ok=False)
    assert res.exit_code == 1
    assert "interrupted after 5,000 bytes" in res.output
    assert "resume" in res.output
    folder = site["tmp"] / "store" / "cache" / "collection" / "GSE900001"
    assert not (folder / "GSE900001_RAW.tar").exists()  # nothing under the final name
    assert (folder / "GSE900001_RAW.tar.part").stat().st_size == 5000
    assert "resumed" in _col(site, "fetch", "pc9_a", "--mirror", site["url"], "--no-progress").output
    assert site["log"][-1] == (rel, "bytes=5000-")
    assert (folder / "GSE900001_RAW.tar").read_bytes() == site["tar"].read_bytes()
    assert not (folder / "GSE900001_RAW.tar.part").exists()


def test_checksum_mismatch_is_refused_and_nothing_is_left(site):
    res = _col(site, "fetch", "bad_sha", "--mirror", site["url"], "--no-progress", ok=False)
    assert res.exit_code == 1
    assert "refused: SHA-256" in res.output
    folder = site["tmp"] / "store" / "cache" / "collection" / "GSE900001"
    assert not (folder / "GSE900001_RAW.tar").exists()
    assert not (folder / "GSE900001_RAW.tar.part").exists()


def test_prepare_without_curated_labels_names_the_samples_and_writes_nothing(site):
    _col(site, "fetch", "needs", "--mirror", site["url"], "--no-progress")
    res = _col(site, "prepare", "needs", ok=False)
    assert res.exit_code == 1
    assert "no sample labels (status needs_curation)" in res.output
    assert "S1, S2" in res.output
    assert not (site["tmp"] / "store" / "cache" / "collection" / "prepared").exists()


def test_controlled_access_row_says_how_to_apply(tmp_path):
    res = _cli("--store", str(tmp_path / "store"), "collection", "fetch", "primary_Data1", ok=False)
    assert res.exit_code == 1
    assert "controlled access, nothing downloaded" in res.output
    assert "EGAD00001006903" in res.output
    assert "https://ega-archive.org/datasets/EGAD00001006903" in res.output
    assert not (tmp_path / "store").exists()
    copy = tmp_path / "mine.csv"
    _cli("--store", str(tmp_path / "store"), "collection", "export", str(copy))
    assert copy.read_bytes() == DEFAULT_COLLECTION.read_bytes()
    listing = _cli("--store", str(tmp_path / "store"), "collection", "list").output
    assert "needs access" in listing
    assert listing.count("\n") == 61

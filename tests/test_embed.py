"""Embedding runner: pca/hvg into Zarr, xarray/obsm access, resume after kill -9."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from synth import toy_adata

from scdrugmap.embedder.runner import embed_datasets
from scdrugmap.store import Store, export_obsm, open_embeddings
from scdrugmap.store.embeddings import chunk_rows_for, open_array, read_rows
from scdrugmap.store.errors import InputError
from scdrugmap.store.ingest import ingest_h5ad


@pytest.fixture
def two_datasets(tmp_path: Path) -> Store:
    st = Store.open(tmp_path / "store", create=True)
    for i, n in ((1, 300), (2, 260)):
        path = tmp_path / f"d{i}.h5ad"
        toy_adata(n_cells=n, seed=i, prefix=f"d{i}_").write_h5ad(path)
        ingest_h5ad(
            st, path, dataset_id=f"d{i}", label_key="response", sample_key="sample", min_genes=100,
            meta={"tissue": "Cell line"},
        )  # fmt: skip
    return st


def test_chunks_hold_at_least_one_mib() -> None:
    for dim in (8, 50, 512, 3072):
        assert chunk_rows_for(dim) * dim * 4 >= 1 << 20


def test_pca_embedding_is_deterministic_and_readable(two_datasets: Store, tmp_path: Path) -> None:
    st = two_datasets
    res = embed_datasets(st, "pca", progress=False, options={"n_comps": 10})
    assert res.status == "complete"
    assert res.dim == 10
    da = open_embeddings(st, "pca")
    assert da.dims == ("cell", "latent")
    assert da.shape == (560, 10)
    values = da.values
    assert np.isfinite(values).all()
    # same spec into another store gives the same numbers
    other = tmp_path / "copy"
    shutil.copytree(st.path, other)
    shutil.rmtree(other / "embeddings.zarr")
    shutil.rmtree(other / "fits")
    with Store.open(other).transaction() as con:
        con.execute("DELETE FROM embeddings")
        con.execute("DELETE FROM embedded_cells")
        con.execute("DELETE FROM coverage")
    embed_datasets(Store.open(other), "pca", progress=False, options={"n_comps": 10})
    np.testing.assert_array_equal(open_embeddings(Store.open(other), "pca").values, values)
    # obsm export follows the dataset's cells
    adata = export_obsm(st, "d2", "pca")
    np.testing.assert_array_equal(adata.obsm["X_scdrugmap_pca"], values[300:])
    cov = st.query("SELECT * FROM coverage ORDER BY dataset_id")
    assert cov["frac_genes"].between(0, 1).all()
    assert len(cov) == 2


def test_partial_selection_leaves_nan_rows(two_datasets: Store) -> None:
    st = two_datasets
    res = embed_datasets(st, "hvg", datasets=["d1"], progress=False, options={"n_top_genes": 50})
    arr = open_array(st, "hvg", res.revision)
    rows = read_rows(arr, np.arange(560))
    assert np.isfinite(rows[:300]).all()
    assert np.isnan(rows[300:]).all()
    assert st.query("SELECT status FROM embeddings")["status"].iloc[0] == "complete"


def test_bad_selection_and_options(two_datasets: Store) -> None:
    with pytest.raises(InputError, match="unknown dataset"):
        embed_datasets(two_datasets, "pca", datasets=["nope"], progress=False)
    with pytest.raises(InputError, match="unknown model"):
        embed_datasets(two_datasets, "nope", progress=False)
    with pytest.raises(InputError, match="unknown option"):
        embed_datasets(two_datasets, "pca", options={"colour": 1}, progress=False)
    with pytest.raises(InputError, match="bad --where"):
        embed_datasets(two_datasets, "pca", where="nonsense_column = 1", progress=False)


SCRIPT = textwrap.dedent(
    """
    import sys, time
    from scdrugmap.embedder.base import register
    from scdrugmap.embedder.baselines import PCAEmbedder
    from scdrugmap.embedder.runner import embed_datasets
    from scdrugmap.store import Store

    @register
    class SlowPCA(PCAEmbedder):
        name = "pca_slow"

        def embed(self, adata):
            time.sleep(float(sys.argv[2]))
            return super().embed(adata)

    embed_datasets(Store.open(sys.argv[1]), "pca_slow", chunk_rows=64, progress=False, options={"n_comps": 8})
    """
)


def _rows_done(st: Store) -> int:
    """rows_done of the one revision, read without waiting (0 while the writer holds the file)."""
    import duckdb

    try:
        con = duckdb.connect(str(st.catalog_path), read_only=True)
    except duckdb.IOException:
        return 0
    try:
        row = con.execute("SELECT rows_done FROM embeddings").fetchone()
    finally:
        con.close()
    return int(row[0] or 0) if row else 0


def test_kill_9_then_resume_matches_uninterrupted_run(two_datasets: Store, tmp_path: Path) -> None:
    st = two_datasets
    clean = tmp_path / "clean"
    shutil.copytree(st.path, clean)
    script = tmp_path / "slow_embed.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(st.path), "0.4"], env=env)
    deadline = time.time() + 120
    # written chunks are recorded in batches (at the latest at the end of each dataset): wait until
    # the catalog shows some, then kill
    while _rows_done(st) == 0 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, "the embedding finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = st.query("SELECT rows_done, rows_selected, status FROM embeddings").iloc[0]
    assert partial["status"] == "partial"
    assert 0 < partial["rows_done"] < partial["rows_selected"]
    subprocess.run([sys.executable, str(script), str(st.path), "0"], env=env, check=True)
    subprocess.run([sys.executable, str(script), str(clean), "0"], env=env, check=True)
    resumed = open_embeddings(st, "pca_slow").values
    uninterrupted = open_embeddings(Store.open(clean), "pca_slow").values
    np.testing.assert_array_equal(resumed, uninterrupted)
    assert np.isfinite(resumed).all()
    final = st.query("SELECT rows_done, rows_selected, status FROM embeddings").iloc[0]
    assert final["status"] == "complete"
    assert final["rows_done"] == final["rows_selected"] == 560
    counts = st.query("SELECT COUNT(*) AS n, COUNT(DISTINCT cell_uid) AS u FROM embedded_cells").iloc[0]
    assert counts["n"] == counts["u"] == 560


def test_cli_embed_takes_comma_separated_datasets(two_datasets: Store) -> None:
    from click.testing import CliRunner

    from scdrugmap.cli import main

    res = CliRunner().invoke(
        main,
        ["--store", str(two_datasets.path), "embed", "--model", "hvg", "--datasets", "d1,d2", "--no-progress",
         "--option", "n_top_genes=20"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "560 done" in res.output
    res = CliRunner().invoke(
        main, ["--store", str(two_datasets.path), "embed", "--model", "hvg", "--datasets", "d1,nope"]
    )
    assert res.exit_code == 1
    assert "unknown dataset id(s) ['nope']" in res.output


def test_stacking_the_fit_blocks_equals_vstack() -> None:
    import scipy.sparse as sp

    from scdrugmap.embedder.baselines import _stack_csr

    rng = np.random.default_rng(0)
    blocks = [
        sp.random(n, 7, density=0.3, format="csr", dtype=np.float32, random_state=rng) for n in (5, 0, 9, 1)
    ]
    expected = sp.vstack(blocks, format="csr", dtype=np.float32)
    got = _stack_csr(list(blocks), n_cols=7)
    assert got.dtype == np.float32
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got.toarray(), expected.toarray())


def test_column_sums_of_a_backed_dataset_equal_in_memory(two_datasets: Store) -> None:
    import anndata as ad

    from scdrugmap.embedder.reading import abs_column_sums

    path = sorted(two_datasets.datasets_dir.glob("*.h5ad"))[0]
    mem = ad.read_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        got = abs_column_sums(backed.X, block_rows=17)
    finally:
        backed.file.close()
    np.testing.assert_allclose(got, np.asarray(abs(mem.X).sum(axis=0), dtype=np.float64).ravel(), rtol=1e-6)
    np.testing.assert_allclose(abs_column_sums(mem.X), got, rtol=1e-12)

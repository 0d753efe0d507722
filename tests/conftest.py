"""Shared pytest fixtures: paths to ../shared (skipping when absent) and small helpers."""

from __future__ import annotations

import ctypes
import gc
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SCDRUGMAP_SHARED", REPO.parent / "shared"))


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return None


_LIBC = _libc()
if _LIBC is not None:
    # The test process lives for the whole run and its threads (torch, thread pools, the web service) would
    # each get a glibc malloc arena that never shrinks: two arenas keep its RSS near what it uses.
    _LIBC.mallopt(-8, 2)  # M_ARENA_MAX


@pytest.fixture(autouse=True, scope="module")
def _release_memory():
    """After each test module: collect its garbage and hand freed heap pages back to the OS.

    Keeps the long-lived test process near its live size (module fixtures hold stores, AnnData and models);
    the default run's 1.91 GiB peak was measured with it (its own share was not isolated).
    """
    yield
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def shared_path(*parts: str) -> Path:
    """Path inside ../shared; skips the calling test when it does not exist."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available (../shared is absent)")
    return path


def model_fixture(model: str) -> Path:
    """``../shared/fixtures/models/<model>``; skips when absent."""
    return shared_path("fixtures", "models", model)


def fixture_adata(model: str):
    """The fixture's ``input.h5ad`` converted to the embedder AnnData contract.

    ``var['symbol']`` ← ``var['gene_symbols']``, ``var['ensembl_id']`` kept, ``obs['n_counts']``
    kept, ``uns['scdrugmap']['x_kind'] = 'counts'``.
    """
    import anndata as ad

    adata = ad.read_h5ad(model_fixture(model) / "input.h5ad")
    adata.var["symbol"] = adata.var["gene_symbols"].astype(str).to_numpy()
    adata.var["ensembl_id"] = adata.var["ensembl_id"].astype(str).to_numpy()
    adata.uns["scdrugmap"] = {"x_kind": "counts"}
    return adata


@pytest.fixture
def tmp_store(tmp_path: Path) -> Path:
    """A fresh store directory path (not yet created)."""
    return tmp_path / "store"

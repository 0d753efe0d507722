"""Checks shared by the model-adapter tests; each takes the model-specific pieces as arguments."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import model_fixture, shared_path

PC9_H5AD = ("data", "real", "pc9_erlotinib_d11", "GSE149214_PC9_D11_erlotinib_raw_counts.h5ad")


# -- checkpoint directories -------------------------------------------------------------
def copy_tiny(model: str, dst: Path) -> Path:
    """A writable copy of the model's ``tiny`` fixture checkpoint at ``dst``."""
    shutil.copytree(model_fixture(model) / "tiny", dst)
    dst.chmod(0o755)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def link_tiny(fixture_dir: Path, dest: Path, skip: tuple[str, ...] = ()) -> Path:
    """``dest`` with symlinks to the ``tiny`` checkpoint's files, leaving out ``skip``."""
    dest.mkdir()
    for f in (fixture_dir / "tiny").iterdir():
        if f.name not in skip:
            (dest / f.name).symlink_to(f)
    return dest


# -- embedding behaviour ----------------------------------------------------------------
def assert_batch_invariant(
    embed: Callable[[int], np.ndarray], sizes: tuple[int, ...] = (1, 7, 32), atol: float = 1e-5
) -> np.ndarray:
    """``embed(batch_size)`` gives the same rows for every size; returns the first size's result."""
    ref = embed(sizes[0])
    for bs in sizes[1:]:
        np.testing.assert_allclose(embed(bs), ref, rtol=0, atol=atol)
    return ref


def assert_oov_cell_is_nan(emb, adata, caplog, *, check_padding: bool = True) -> None:
    """Of 3 cells, the middle one expresses only out-of-vocabulary genes: NaN row, a warning."""
    sub = adata[:3].copy()
    sub.X = sub.X.toarray()
    oov = ~emb.in_vocabulary(sub.var)
    sub.X[1] = 0
    sub.X[1, oov] = 5
    with caplog.at_level(logging.WARNING):
        out = emb.embed(sub)
    assert np.isnan(out[1]).all()
    assert not np.isnan(out[[0, 2]]).any()
    assert "no in-vocabulary" in caplog.text
    if check_padding:
        assert emb.padding_report.padded_sorted <= emb.padding_report.padded_unsorted


# -- state dicts ------------------------------------------------------------------------
def release_shapes(meta: dict) -> dict[str, list[int]]:
    """``{key: shape}`` of a ``state_dict_full.json``."""
    return {t["key"]: t["shape"] for t in meta["tensors"]}


def module_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    """``{key: shape}`` of a module's state dict."""
    return {k: list(v.shape) for k, v in module.state_dict().items()}


# -- LoRA -------------------------------------------------------------------------------
def assert_lora_gradients(module: torch.nn.Module, count: int) -> dict[str, torch.nn.Parameter]:
    """``count`` LoRA parameters, each with a non-zero gradient; returns them by name."""
    lora = {n: p for n, p in module.named_parameters() if "lora_" in n}
    assert len(lora) == count
    for name, p in lora.items():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    return lora


def inject_lora(emb) -> torch.nn.Module:
    """Inject rank-4 LoRA (random B) into ``emb.torch_module()`` at ``emb.lora_targets``."""
    pytest.importorskip("peft")
    from scdrugmap.classify import lora

    return lora.inject_lora(
        emb.torch_module(), targets=tuple(emb.lora_targets), r=4, lora_alpha=8, init_lora_weights=False
    )


def lora_attention_gradients(emb, adata, count: int) -> dict[str, torch.nn.Parameter]:
    """Rank-2 LoRA on ``lora_targets`` and ``lora_target_parameters``; a random projection of the
    pooled embeddings of ``adata`` is backpropagated; see :func:`assert_lora_gradients`."""
    pytest.importorskip("peft")
    from scdrugmap.classify import lora

    model = lora.inject_lora(
        emb.torch_module(),
        targets=tuple(emb.lora_targets),
        target_parameters=tuple(emb.lora_target_parameters),
        r=2,
        init_lora_weights=False,
    )
    tokens = emb.tokenize(adata)
    pooled = emb.pool_torch(emb.hidden_states(tokens), tokens)
    (pooled * torch.randn_like(pooled)).sum().backward()
    return assert_lora_gradients(model, count)


def lora_hf_gradients(emb, adata, count: int, **lora_options) -> None:
    """Rank-4 peft model on ``lora_targets``; the squared pooled embeddings of ``adata[:4]`` are
    backpropagated; see :func:`assert_lora_gradients`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=list(emb.lora_targets), init_lora_weights=False, **lora_options
    )
    peft_model = get_peft_model(emb.torch_module(), lora)
    tokens = emb.tokenize(adata[:4])
    emb.pool_torch(emb.hidden_states(tokens), tokens).pow(2).sum().backward()
    assert_lora_gradients(peft_model, count)


# -- real PC9 data through the runner ----------------------------------------------------
def pc9_two_sample_store(tmp_path_factory, per_sample: int):
    """``per_sample`` + ``per_sample`` real PC9 cells (two replicates = two samples) in a fresh store."""
    import anndata as ad

    from scdrugmap.store import Store
    from scdrugmap.store.ingest import ingest_h5ad

    full = ad.read_h5ad(shared_path(*PC9_H5AD))
    rich = np.flatnonzero(full.obs["n_genes"].to_numpy() >= 800)
    batch = full.obs["batch"].to_numpy()
    pick = np.concatenate([rich[batch[rich] == b][:per_sample] for b in ("Day11_Erlotinib", "Day11_control")])
    tmp = tmp_path_factory.mktemp("pc9")
    full[pick].copy().write_h5ad(tmp / "pc9.h5ad")
    store = Store.open(tmp / "store", create=True)
    ingest_h5ad(store, tmp / "pc9.h5ad", dataset_id="pc9", sample_key="batch")
    return store


def pc9_store(tmp_path: Path, n_cells: int = 40):
    """``(store, var_names)``: ``n_cells`` real PC9 cells (≥ 600 genes) in a fresh store (default QC)."""
    import anndata as ad

    from scdrugmap.store.catalog import Store
    from scdrugmap.store.ingest import ingest_h5ad

    raw = ad.read_h5ad(shared_path(*PC9_H5AD))
    raw[np.flatnonzero(np.diff(raw.X.indptr) >= 600)[:n_cells]].copy().write_h5ad(tmp_path / "pc9.h5ad")
    store = Store.open(tmp_path / "store", create=True)
    ingest_h5ad(store, tmp_path / "pc9.h5ad", dataset_id="pc9_d11")
    return store, list(raw.var_names)


def embed_pc9(store, model: str, checkpoint: Path, *, options: dict | None = None, n_done: int | None = None):
    """Embed the store with the runner; check it completed with one coverage row. Returns ``(res, cov)``."""
    from scdrugmap.embedder.runner import embed_datasets

    res = embed_datasets(
        store, model, checkpoint=checkpoint, options={"device": "cpu", **(options or {})}, progress=False
    )
    assert res.status == "complete"
    if n_done is not None:
        assert res.n_done == n_done
    cov = store.query("SELECT * FROM coverage WHERE revision = ?", [res.revision])
    assert len(cov) == 1
    return res, cov


def check_pc9_two_samples(store, model: str, *, options: dict | None = None):
    """The tiny checkpoint embeds every ingested cell finitely; coverage fractions in (0, 1]."""
    from scdrugmap.store.embeddings import open_embeddings

    res, cov = embed_pc9(store, model, model_fixture(model) / "tiny", options=options)
    assert 0 < cov["frac_genes"].iloc[0] <= 1
    assert 0 < cov["frac_counts"].iloc[0] <= 1
    uids = store.query("SELECT cell_uid FROM cells WHERE dataset_id = 'pc9'")["cell_uid"].to_numpy()
    values = open_embeddings(store, model, revision=res.revision).sel(cell=uids).values
    assert values.shape == (len(uids), res.dim)
    assert np.isfinite(values).all()
    return res


def check_pc9_runner(
    tmp_path: Path,
    model: str,
    checkpoint: Path | Callable[[list[str]], Path],
    *,
    options: dict | None = None,
    min_frac_genes: float = 0.0,
    dim: int | None = None,
) -> None:
    """40 real PC9 cells → ingest → runner (``checkpoint`` may be built from the var names) → coverage
    with ``frac_genes`` in (``min_frac_genes``, 1], finite embeddings (``(40, dim)`` when given)."""
    from scdrugmap.store.embeddings import open_embeddings

    store, var_names = pc9_store(tmp_path)
    if callable(checkpoint):
        checkpoint = checkpoint(var_names)
    res, cov = embed_pc9(store, model, checkpoint, options=options, n_done=40)
    assert min_frac_genes < cov["frac_genes"].iloc[0] <= 1
    values = open_embeddings(store, model, revision=res.revision).values
    if dim is not None:
        assert values.shape == (40, dim)
    assert np.isfinite(values).all()

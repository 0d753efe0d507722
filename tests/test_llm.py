"""LLM adapter on a tiny random LlamaForCausalLM with an offline word-level tokenizer."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from adapter_checks import check_pc9_runner, lora_hf_gradients

from scdrugmap.embedder import load_embedder
from scdrugmap.embedder.llm import write_tiny_checkpoint
from scdrugmap.store.errors import CheckpointError, InputError

N_CELLS, N_GENES = 40, 150


def _adata(seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    mu = rng.lognormal(0, 1, N_GENES) * rng.lognormal(0, 0.5, (N_CELLS, 1))
    X = rng.negative_binomial(0.6, 0.6 / (0.6 + mu)).astype(np.float32)
    X[:5, 40:] = 0  # a few short cells so lengths differ
    symbols = [f"GENE{i}" for i in range(N_GENES - 5)] + ["HLA-A", "MT-CO1", "NKX2.8", "", "ACTB"]
    var = pd.DataFrame({"symbol": symbols, "ensembl_id": ""}, index=[f"g{i}" for i in range(N_GENES)])
    obs = pd.DataFrame({"n_counts": X.sum(1)}, index=[f"c{i}" for i in range(N_CELLS)])
    out = ad.AnnData(X=X, obs=obs, var=var)
    out.uns["scdrugmap"] = {"x_kind": "counts"}
    return out


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    return _adata()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, adata) -> Path:
    symbols = [s for s in adata.var["symbol"] if s][:120]  # the rest become <unk>
    return write_tiny_checkpoint(tmp_path_factory.mktemp("llm") / "tiny", symbols)


@pytest.fixture(scope="module")
def emb(ckpt):
    return load_embedder("llm", ckpt, device="cpu")


def test_embed_shape(emb, adata):
    out = emb.embed(adata)
    assert out.dtype == np.float32
    assert out.shape == (N_CELLS, 32) == (adata.n_obs, emb.dim)
    assert np.isfinite(out).all()
    assert emb.in_vocabulary(adata.var).sum() == N_GENES - 1  # only the empty symbol is out


def test_sentences_rank_and_top_k(ckpt, adata):
    emb = load_embedder("llm", ckpt, device="cpu", top_k=3)
    sub = adata[:1].copy()
    sub.X = np.zeros((1, N_GENES), dtype=np.float32)
    sub.X[0, [7, 3, 11, 1, 148]] = [2, 5, 2, 1, 9]  # 148 has no symbol
    texts, n_genes = emb.sentences(sub)
    assert texts == ["GENE3 GENE7 GENE11"]
    assert n_genes.tolist() == [3]
    tokens = emb.tokenize(sub)
    assert tokens.ids[0].tolist() == emb.tokenizer(texts[0])["input_ids"]
    assert tokens.ids[0][0] == emb.tokenizer.bos_token_id


def test_max_length_truncates(ckpt, adata):
    emb = load_embedder("llm", ckpt, device="cpu", max_length=16)
    assert emb.tokenize(adata).lengths.max() == 16


def test_padding_does_not_change_embedding(emb, adata):
    tokens = emb.tokenize(adata)
    short, long = int(np.argmin(tokens.lengths)), int(np.argmax(tokens.lengths))
    assert tokens.lengths[short] < tokens.lengths[long]
    alone = emb.pool(emb.forward(tokens.subset([short])), tokens.subset([short]))
    pair = tokens.subset([short, long])
    padded = emb.pool(emb.forward(pair), pair)
    np.testing.assert_allclose(padded[0], alone[0], rtol=0, atol=1e-5)


def test_batch_invariance_and_order(ckpt, adata):
    ref = load_embedder("llm", ckpt, device="cpu", batch_size=1).embed(adata)
    for bs in (7, 32):
        out = load_embedder("llm", ckpt, device="cpu", batch_size=bs).embed(adata)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    emb = load_embedder("llm", ckpt, device="cpu", batch_size=7)
    perm = np.random.default_rng(1).permutation(N_CELLS)
    np.testing.assert_allclose(emb.embed(adata[perm].copy()), ref[perm], rtol=0, atol=1e-5)
    assert emb.padding_report.padded_sorted < emb.padding_report.padded_unsorted


def test_last_token_pooling(ckpt, adata):
    emb = load_embedder("llm", ckpt, device="cpu", pooling="last_token")
    tokens = emb.tokenize(adata[:6])
    hidden = emb.forward(tokens).numpy()
    want = hidden[np.arange(6), tokens.lengths - 1]
    np.testing.assert_allclose(emb.embed(adata[:6]), want, rtol=0, atol=1e-5)


def test_cell_without_genes_is_nan(emb, adata, caplog):
    sub = adata[:3].copy()
    sub.X[1] = 0
    sub.X[1, 148] = 4  # only the gene without a symbol
    with caplog.at_level(logging.WARNING):
        out = emb.embed(sub)
    assert np.isnan(out[1]).all()
    assert not np.isnan(out[[0, 2]]).any()


def test_sharded_checkpoint(ckpt, tmp_path, emb, adata):
    from transformers import LlamaForCausalLM

    sharded = tmp_path / "sharded"
    shutil.copytree(ckpt, sharded)
    (sharded / "model.safetensors").unlink()
    LlamaForCausalLM.from_pretrained(ckpt).save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    out = load_embedder("llm", sharded, device="cpu").embed(adata[:8])
    np.testing.assert_allclose(out, emb.embed(adata[:8]), rtol=0, atol=1e-6)
    shard = sorted(sharded.glob("model-0*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_embedder("llm", sharded, device="cpu")


def test_spec_and_options(emb, ckpt):
    spec = emb.spec()
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        spec["files"]
    )
    assert spec["tokenizer"]["top_k"] == 1024
    assert spec["pooling"] == "mean"
    assert load_embedder("llm", ckpt, top_k=10).revision() != emb.revision()
    with pytest.raises(InputError, match="top_k"):
        load_embedder("llm", ckpt, top_k=0)
    with pytest.raises(InputError, match="exceeds"):
        load_embedder("llm", ckpt, max_length=4096)
    with pytest.raises(InputError, match="seed"):
        load_embedder("llm", ckpt, seed=3)


def test_bad_checkpoints(ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    (bad / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json or tokenizer\.model"):
        load_embedder("llm", bad)

    bad2 = tmp_path / "bad2"
    shutil.copytree(ckpt, bad2)
    config = json.loads((ckpt / "config.json").read_text())
    (bad2 / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_embedder("llm", bad2)
    (bad2 / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(CheckpointError, match="not a causal language model"):
        load_embedder("llm", bad2)
    (bad2 / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_embedder("llm", bad2)


def test_lora_gradients(ckpt, adata):
    emb = load_embedder("llm", ckpt, device="cpu")
    lora_hf_gradients(emb, adata, 2 * 3 * 2)  # A and B x q/k/v x 2 layers


@pytest.mark.slow
def test_real_pc9_through_runner(tmp_path):
    """Real raw counts (PC9, erlotinib day 11): ingest 40 cells, embed via the runner, coverage recorded."""
    check_pc9_runner(
        tmp_path, "llm", lambda genes: write_tiny_checkpoint(tmp_path / "llm", genes), min_frac_genes=0.5
    )


def test_legacy_rotary_buffers_ignored(ckpt, tmp_path, emb, adata):
    from safetensors.torch import load_file, save_file

    old = tmp_path / "old"
    shutil.copytree(ckpt, old)
    sd = load_file(str(ckpt / "model.safetensors"))
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(sd, str(old / "model.safetensors"))
    np.testing.assert_allclose(load_embedder("llm", old).embed(adata[:4]), emb.embed(adata[:4]), atol=1e-6)
    sd["model.extra.weight"] = torch.ones(4)
    save_file(sd, str(old / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['model\.extra\.weight'\]"):
        load_embedder("llm", old)

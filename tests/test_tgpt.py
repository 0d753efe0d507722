"""tGPT adapter: golden parity with the README pipeline, release layout, batching, errors, LoRA."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from adapter_checks import check_pc9_runner, link_tiny, lora_hf_gradients
from conftest import fixture_adata, model_fixture

from scdrugmap.embedder import load_embedder
from scdrugmap.embedder._hf import build_model, read_config
from scdrugmap.embedder.tgpt import normalise_symbol
from scdrugmap.store.errors import CheckpointError, InputError


@pytest.fixture(scope="module")
def fixture_dir() -> Path:
    return model_fixture("tgpt")


@pytest.fixture(scope="module")
def expected(fixture_dir):
    with np.load(fixture_dir / "expected.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def adata():
    return fixture_adata("tgpt")


@pytest.fixture(scope="module")
def emb(fixture_dir):
    return load_embedder("tgpt", fixture_dir / "tiny", device="cpu")


def test_golden_tokens(emb, adata, expected):
    assert int(expected["max_length"]) == emb.max_length == 64
    ids, mask = emb.tokenize(adata).padded()
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    assert emb.in_vocabulary(adata.var).all()


def test_tokens_match_readme_tokenizer_call(emb, adata, expected):
    """Our ids equal the checkpoint tokenizer applied to the ranked, regex-substituted lines."""
    enc = emb.tokenizer(
        list(expected["ranked_gene_lines"]), max_length=64, truncation=True, padding=True, return_tensors="np"
    )
    np.testing.assert_array_equal(enc["input_ids"], expected["input_ids"])
    assert normalise_symbol("HLA-B") == "HLA_B"
    assert normalise_symbol("NKX2.8") == "NKX2_8"


def test_golden_embeddings(emb, fixture_dir, adata, expected):
    out = emb.embed(adata)
    assert out.dtype == np.float32
    assert out.shape == (24, 32) == (adata.n_obs, emb.dim)
    np.testing.assert_allclose(out, expected["cell_embeddings"], rtol=0, atol=1e-5)
    real = load_embedder("tgpt", fixture_dir / "tiny", device="cpu", pooling="real_token_mean")
    np.testing.assert_allclose(
        real.embed(adata), expected["cell_embeddings_mean_all_real_tokens"], rtol=0, atol=1e-5
    )


def test_state_dict_matches_release(fixture_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    ref = json.loads((fixture_dir / "state_dict_full.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(ref["config"]))
    cfg = read_config(tmp_path, GPT2Config.from_json_file, model="tgpt", model_types=("gpt2",))
    module = build_model(GPT2LMHeadModel, cfg, "meta")
    ours = [(k, list(v.shape)) for k, v in module.state_dict().items()]
    assert ours == [(t["key"], t["shape"]) for t in ref["tensors"]]


def test_safetensors_without_legacy_buffers(fixture_dir, tmp_path, adata, expected):
    from safetensors.torch import save_file

    sd = torch.load(fixture_dir / "tiny" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    legacy = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight")
    sd = {k: v for k, v in sd.items() if not legacy.fullmatch(k)}
    ckpt = link_tiny(fixture_dir, tmp_path / "ckpt", skip=("pytorch_model.bin",))
    save_file(sd, str(ckpt / "model.safetensors"))
    out = load_embedder("tgpt", ckpt, device="cpu").embed(adata)
    np.testing.assert_allclose(out, expected["cell_embeddings"], rtol=0, atol=1e-5)


def test_batch_invariance_and_order(fixture_dir, adata):
    # shorter sequences make padding differ between batches
    ref = load_embedder("tgpt", fixture_dir / "tiny", device="cpu", batch_size=1, max_length=40)
    sub = adata.copy()
    sub.X = sub.X.toarray()
    sub.X[::3, 50:] = 0  # some cells with few genes
    want = ref.embed(sub)
    assert len(set(ref.tokenize(sub).lengths)) > 1
    for bs in (7, 32):
        out = load_embedder("tgpt", fixture_dir / "tiny", device="cpu", batch_size=bs, max_length=40).embed(
            sub
        )
        np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)
    perm = np.random.default_rng(0).permutation(sub.n_obs)
    emb = load_embedder("tgpt", fixture_dir / "tiny", device="cpu", batch_size=7, max_length=40)
    np.testing.assert_allclose(emb.embed(sub[perm].copy()), want[perm], rtol=0, atol=1e-5)


def test_ranking_ties_and_oov(emb, adata):
    sub = adata[:1].copy()
    sub.X = np.zeros((1, adata.n_vars), dtype=np.float32)
    sub.X[0, [5, 2, 9]] = [3, 3, 7]
    names = sub.var_names.to_numpy().copy()
    names[9] = "NOT_A_GENE"
    sub.var_names = names
    sub.var = sub.var.drop(columns=["ensembl_id"])  # else gene 9 is found again by its Ensembl id
    tokens = emb.tokenize(sub)
    vocab = emb.tokenizer.get_vocab()
    want = [vocab[normalise_symbol(sub.var_names[j])] for j in (2, 5)]  # tie → var order; OOV dropped
    assert tokens.ids[0].tolist() == [emb.bos_id, *want, emb.eos_id]
    assert not emb.in_vocabulary(sub.var)[9]


def test_cell_without_genes_is_nan(emb, adata, caplog):
    sub = adata[:3].copy()
    sub.X = sub.X.toarray()
    sub.X[2] = 0
    with caplog.at_level(logging.WARNING):
        out = emb.embed(sub)
    assert np.isnan(out[2]).all()
    assert not np.isnan(out[:2]).any()
    assert "no in-vocabulary" in caplog.text


def test_spec(emb, fixture_dir):
    spec = emb.spec()
    assert set(spec["files"]) == {
        "config.json",
        "pytorch_model.bin",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert spec["tokenizer"]["max_length"] == 64
    assert spec["pooling"] == "gene_mean"
    other = load_embedder("tgpt", fixture_dir / "tiny", device="cpu", max_length=32)
    assert other.revision() != emb.revision()


def test_bad_options(fixture_dir):
    with pytest.raises(InputError, match="top_k"):
        load_embedder("tgpt", fixture_dir / "tiny", top_k=3)
    with pytest.raises(InputError, match="max_length"):
        load_embedder("tgpt", fixture_dir / "tiny", max_length=2)
    with pytest.raises(InputError, match="n_positions"):
        load_embedder("tgpt", fixture_dir / "tiny", max_length=2000)
    with pytest.raises(InputError, match="precision"):
        load_embedder("tgpt", fixture_dir / "tiny", precision="int8")


@pytest.mark.parametrize("missing", ["tokenizer.json", "special_tokens_map.json", "config.json"])
def test_missing_file(fixture_dir, tmp_path, missing):
    ckpt = link_tiny(fixture_dir, tmp_path / "ckpt", skip=(missing,))
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        load_embedder("tgpt", ckpt)


def test_missing_weights(fixture_dir, tmp_path):
    ckpt = link_tiny(fixture_dir, tmp_path / "ckpt", skip=("pytorch_model.bin",))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin"):
        load_embedder("tgpt", ckpt)


def test_wrong_shapes_and_keys(fixture_dir, tmp_path):
    ckpt = link_tiny(fixture_dir, tmp_path / "ckpt", skip=("config.json",))
    config = json.loads((fixture_dir / "tiny" / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_embedder("tgpt", ckpt)
    (ckpt / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(CheckpointError, match="missing keys"):
        load_embedder("tgpt", ckpt)

    sd = torch.load(fixture_dir / "tiny" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    ckpt2 = link_tiny(fixture_dir, tmp_path / "ckpt2", skip=("pytorch_model.bin",))
    torch.save({"model": sd}, ckpt2 / "pytorch_model.bin")  # a train.py checkpoint, not a state dict
    with pytest.raises(CheckpointError, match="flat state dict"):
        load_embedder("tgpt", ckpt2)


def test_lora_gradients(fixture_dir, adata):
    emb = load_embedder("tgpt", fixture_dir / "tiny", device="cpu")
    lora_hf_gradients(emb, adata, 2 * 1 * 2, fan_in_fan_out=True)  # A and B x c_attn x 2 layers


@pytest.mark.slow
def test_real_pc9_through_runner(tmp_path, fixture_dir):
    """Real raw counts (PC9, erlotinib day 11): ingest 40 cells, embed via the runner, coverage recorded."""
    check_pc9_runner(tmp_path, "tgpt", fixture_dir / "tiny", min_frac_genes=0.3)

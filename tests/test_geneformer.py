"""Geneformer adapter: golden parity with the original, release layout, batching, errors, LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from adapter_checks import assert_oov_cell_is_nan, check_pc9_runner, link_tiny, lora_hf_gradients
from conftest import fixture_adata, model_fixture

from scdrugmap.embedder import load_embedder
from scdrugmap.embedder._hf import build_model, read_config
from scdrugmap.store.errors import CheckpointError, InputError

# config.json of the released 6-layer model (HF ctheodoris/Geneformer, 2021; transformers 4.6)
REAL_CONFIG = {
    "architectures": ["BertForMaskedLM"],
    "attention_probs_dropout_prob": 0.02,
    "gradient_checkpointing": False,
    "hidden_act": "relu",
    "hidden_dropout_prob": 0.02,
    "hidden_size": 256,
    "initializer_range": 0.02,
    "intermediate_size": 512,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 2048,
    "model_type": "bert",
    "num_attention_heads": 4,
    "num_hidden_layers": 6,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "transformers_version": "4.6.0",
    "type_vocab_size": 2,
    "use_cache": True,
    "vocab_size": 25426,
}
# geneformer-12L-30M/config.json differs in these fields
REAL_CONFIG_12L = {**REAL_CONFIG, "hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8}
REAL_CONFIG_12L["num_hidden_layers"] = 12


@pytest.fixture(scope="module")
def fixture_dir() -> Path:
    return model_fixture("geneformer")


@pytest.fixture(scope="module")
def expected(fixture_dir):
    with np.load(fixture_dir / "expected.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def adata():
    return fixture_adata("geneformer")


@pytest.fixture(scope="module")
def emb(fixture_dir):
    return load_embedder("geneformer", fixture_dir / "tiny", device="cpu")


def test_golden_tokens(emb, adata, expected):
    ids, mask = emb.tokenize(adata).padded()
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    np.testing.assert_array_equal(mask.sum(1), expected["lengths"])
    np.testing.assert_array_equal(emb.in_vocabulary(adata.var), expected["var_in_vocab"])


def test_golden_embeddings(emb, fixture_dir, adata, expected):
    assert int(expected["hidden_state_index_used"]) == emb._hidden_index() == 1
    out = emb.embed(adata)
    assert out.dtype == np.float32
    assert out.shape == (adata.n_obs, emb.dim) == (24, 32)
    np.testing.assert_allclose(out, expected["cell_embeddings"], rtol=0, atol=1e-5)
    last = load_embedder("geneformer", fixture_dir / "tiny", device="cpu", pooling="last_mean")
    np.testing.assert_allclose(last.embed(adata), expected["cell_embeddings_last_layer"], rtol=0, atol=1e-5)


def test_n_counts_default_is_row_sum(emb, adata):
    no_counts = adata.copy()
    del no_counts.obs["n_counts"]
    # n_counts only rescales a cell, so the rank order and hence the tokens are unchanged
    a, _ = emb.tokenize(adata).padded()
    b, _ = emb.tokenize(no_counts).padded()
    np.testing.assert_array_equal(a, b)


def test_legacy_release_bin(fixture_dir, tmp_path, adata, expected):
    """The 2021 pytorch_model.bin also stores position_ids and the tied decoder weight."""
    from safetensors.torch import load_file

    sd = load_file(str(fixture_dir / "tiny" / "model.safetensors"))
    sd["bert.embeddings.position_ids"] = torch.arange(2048).unsqueeze(0)
    sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"].clone()
    sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"].clone()
    ckpt = link_tiny(fixture_dir, tmp_path / "ckpt", skip=("model.safetensors",))
    torch.save(sd, ckpt / "pytorch_model.bin")
    out = load_embedder("geneformer", ckpt, device="cpu").embed(adata)
    np.testing.assert_allclose(out, expected["cell_embeddings"], rtol=0, atol=1e-5)

    sd["cls.predictions.decoder.weight"] += 1.0  # untied in the file but tied in the model
    torch.save(sd, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="tied"):
        load_embedder("geneformer", ckpt, device="cpu")


@pytest.mark.parametrize(
    ("config", "reference"),
    [(REAL_CONFIG, "state_dict_full.json"), (REAL_CONFIG_12L, "state_dict_full_12L.json")],
)
def test_state_dict_matches_release(fixture_dir, tmp_path, config, reference):
    from transformers import BertConfig, BertForMaskedLM

    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = read_config(tmp_path, BertConfig.from_json_file, model="geneformer", model_types=("bert",))
    module = build_model(BertForMaskedLM, cfg, "meta")
    ours = [(k, list(v.shape)) for k, v in module.state_dict().items()]
    ref = json.loads((fixture_dir / reference).read_text())
    assert ours == [(t["key"], t["shape"]) for t in ref["tensors"]]


def test_batch_invariance_and_order(fixture_dir, adata):
    ref = load_embedder("geneformer", fixture_dir / "tiny", device="cpu", batch_size=1).embed(adata)
    for bs in (7, 32):
        out = load_embedder("geneformer", fixture_dir / "tiny", device="cpu", batch_size=bs).embed(adata)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    emb = load_embedder("geneformer", fixture_dir / "tiny", device="cpu", batch_size=7)
    perm = np.random.default_rng(0).permutation(adata.n_obs)
    np.testing.assert_allclose(emb.embed(adata[perm].copy()), ref[perm], rtol=0, atol=1e-5)
    assert emb.padding_report.padded_sorted < emb.padding_report.padded_unsorted


def test_cell_without_vocabulary_genes_is_nan(emb, adata, caplog):
    assert_oov_cell_is_nan(emb, adata, caplog, check_padding=False)


def test_requires_counts(emb, adata):
    lognorm = adata[:2].copy()
    lognorm.uns["scdrugmap"] = {"x_kind": "lognorm"}
    with pytest.raises(InputError, match="raw counts"):
        emb.tokenize(lognorm)


def test_symbol_only_file(fixture_dir, emb, adata):
    """A file naming genes by symbol only: the original finds nothing; the default recovers the
    genes through HGNC's symbol → Ensembl map, symbol_fallback through gene_name_id_dict."""
    sub = adata.copy()
    sub.var_names = sub.var["gene_symbols"].astype(str).to_numpy()
    sub.var = sub.var.drop(columns=["ensembl_id", "symbol"])
    kw = {"device": "cpu", "gene_matching": "original"}
    assert not load_embedder("geneformer", fixture_dir / "tiny", **kw).in_vocabulary(sub.var).any()
    fb = load_embedder("geneformer", fixture_dir / "tiny", symbol_fallback=True, **kw)
    assert (fb.match_genes(sub.var).route == "crossmap").sum() > 0
    best = emb.match_genes(sub.var)
    exact = emb.match_genes(adata.var)
    mapped = best.found
    assert mapped.sum() >= 0.9 * exact.found.sum()
    assert set(best.route[mapped]) == {"crossmap"}
    np.testing.assert_array_equal(best.index[mapped], exact.index[mapped])  # the same genes


def test_spec(emb, fixture_dir):
    spec = emb.spec()
    assert set(spec["files"]) == {
        "config.json",
        "model.safetensors",
        "token_dictionary.pkl",
        "gene_median_dictionary.pkl",
        "gene_name_id_dict.pkl",
    }
    assert spec["pooling"] == "penultimate_mean"
    assert spec["precision"] == "fp32"
    assert "device" not in json.dumps(spec)
    assert "batch_size" not in json.dumps(spec)
    other = load_embedder("geneformer", fixture_dir / "tiny", device="cpu", pooling="last_mean", batch_size=3)
    assert other.revision() != emb.revision()
    assert load_embedder("geneformer", fixture_dir / "tiny", batch_size=3).revision() == emb.revision()


def test_bad_options(fixture_dir):
    with pytest.raises(InputError, match="colour"):
        load_embedder("geneformer", fixture_dir / "tiny", colour="red")
    with pytest.raises(InputError, match="pooling"):
        load_embedder("geneformer", fixture_dir / "tiny", pooling="cls")
    with pytest.raises(InputError, match="batch_size"):
        load_embedder("geneformer", fixture_dir / "tiny", batch_size=0)


@pytest.mark.parametrize("missing", ["token_dictionary.pkl", "gene_median_dictionary.pkl", "config.json"])
def test_missing_file(fixture_dir, tmp_path, missing):
    ckpt = link_tiny(fixture_dir, tmp_path / "ckpt", skip=(missing,))
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")) as err:
        load_embedder("geneformer", ckpt)
    assert "gene_name_id_dict.pkl" in str(err.value)  # lists the expected layout


def test_missing_weights_and_dir(fixture_dir, tmp_path):
    ckpt = link_tiny(fixture_dir, tmp_path / "ckpt", skip=("model.safetensors",))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*pytorch_model\.bin"):
        load_embedder("geneformer", ckpt)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_embedder("geneformer", tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="checkpoint"):
        load_embedder("geneformer", None)


def test_wrong_shapes_and_keys(fixture_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = link_tiny(fixture_dir, tmp_path / "ckpt", skip=("config.json",))
    config = json.loads((fixture_dir / "tiny" / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_embedder("geneformer", ckpt)

    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type"):
        load_embedder("geneformer", ckpt)

    ckpt2 = link_tiny(fixture_dir, tmp_path / "ckpt2", skip=("model.safetensors",))
    sd = load_file(str(fixture_dir / "tiny" / "model.safetensors"))
    sd["bert.pooler.dense.bias"] = torch.zeros(32)
    save_file(sd, str(ckpt2 / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_embedder("geneformer", ckpt2)


def test_unsafe_pickle_refused(fixture_dir, tmp_path):
    import pickle

    ckpt = link_tiny(fixture_dir, tmp_path / "ckpt", skip=("token_dictionary.pkl",))
    (ckpt / "token_dictionary.pkl").write_bytes(pickle.dumps({"<pad>": 0, "x": Path("/")}))
    with pytest.raises(CheckpointError, match="refusing"):
        load_embedder("geneformer", ckpt)


def test_lora_gradients(fixture_dir, adata):
    emb = load_embedder("geneformer", fixture_dir / "tiny", device="cpu", pooling="last_mean")
    lora_hf_gradients(emb, adata, 2 * 3 * 2)  # A and B x query/key/value x 2 layers


@pytest.mark.slow
def test_real_pc9_through_runner(tmp_path, fixture_dir):
    """Real raw counts (PC9, erlotinib day 11): ingest 40 cells, embed via the runner, coverage recorded."""
    check_pc9_runner(tmp_path, "geneformer", fixture_dir / "tiny", min_frac_genes=0.3)

"""UCE adapter: golden parity, release layout, batch invariance, safe pickle, LoRA, bad checkpoints."""

from __future__ import annotations

import json
import pickle
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from adapter_checks import assert_oov_cell_is_nan, check_pc9_runner, lora_attention_gradients
from conftest import fixture_adata, model_fixture

from scdrugmap.embedder import load_embedder
from scdrugmap.embedder._attention import RaggedTokens
from scdrugmap.embedder.uce import build_module
from scdrugmap.store.errors import CheckpointError, InputError

# the run arguments of the fixture (NOTES.md): tiny model with 4 heads, filter=True, one RNG stream
ORIGINAL = {"nhead": 4, "min_cells": 10, "sampling": "stream", "seed": 0}


@pytest.fixture(scope="module")
def fx():
    d = model_fixture("uce")
    return d, np.load(d / "expected.npz", allow_pickle=False)


def _load(d, **kw):
    return load_embedder("uce", d / "tiny", device="cpu", **{"nhead": 4, **kw})


def test_golden_tokens(fx):
    d, e = fx
    adata = fixture_adata("uce")
    emb = _load(d, **ORIGINAL)
    expressed = np.asarray((adata.X > 0).sum(axis=0)).ravel() >= 10
    kept = adata.var["symbol"][emb.in_vocabulary(adata.var) & expressed]
    assert set(kept) == set(e["genes_kept"])
    p = emb.tokenize(adata).padded()
    np.testing.assert_array_equal(p["ids"], e["cell_sentences"])
    np.testing.assert_array_equal(~p["pad_mask"], e["attention_mask_float"] == 1)
    assert emb.chrom_offset == int(e["chrom_token_offset"])


def test_golden_embeddings(fx):
    # the original's float padding mask makes its batched output batch-dependent; NOTES: compare
    # against the per-cell (batch size 1) reference, which a boolean mask reproduces in any batch
    d, e = fx
    out = _load(d, **ORIGINAL).embed(fixture_adata("uce"))
    np.testing.assert_allclose(out, e["cell_embeddings_batch1"], atol=1e-5, rtol=0)
    assert np.abs(out - e["cell_embeddings"]).max() > 1e-3  # the original's batch-of-25 output differs
    tokens = RaggedTokens(
        {"ids": list(e["cell_sentences_batch1_padded1536"])}, {"ids": 0}, np.ones(24, np.int64)
    )
    tokens.fields["ids"] = [s[:n] for s, n in zip(tokens.fields["ids"], e["seq_len"], strict=True)]
    emb = _load(d, **ORIGINAL)
    np.testing.assert_allclose(
        emb.pool(emb.forward(tokens), tokens), e["cell_embeddings_batch1"], atol=1e-5, rtol=0
    )


def test_batch_invariance_and_batch_mates(fx):
    d, _ = fx
    adata = fixture_adata("uce")
    ref = _load(d, batch_size=1).embed(adata)
    assert ref.shape == (24, 32)
    assert not np.isnan(ref).any()
    for bs in (7, 32):
        np.testing.assert_allclose(_load(d, batch_size=bs).embed(adata), ref, atol=1e-5, rtol=0)
    rows = [17, 2, 9]  # per-cell seeding: same sentences with other batch-mates and positions
    np.testing.assert_allclose(_load(d, batch_size=2).embed(adata[rows].copy()), ref[rows], atol=1e-5, rtol=0)


def test_sampling_is_seeded_and_recorded(fx):
    d, _ = fx
    adata = fixture_adata("uce")[:3].copy()
    a, b = _load(d, seed=1), _load(d, seed=2)
    first = a.tokenize(adata).fields["ids"]
    assert all(np.array_equal(x, y) for x, y in zip(first, a.tokenize(adata).fields["ids"], strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(first, b.tokenize(adata).fields["ids"], strict=True))
    spec = a.spec()
    assert spec["tokenizer"]["seed"] == 1
    assert spec["tokenizer"]["sampling"] == "per_cell"
    assert "tiny_2layer_model.torch" in spec["files"]
    assert "batch_size" not in json.dumps(spec)


@pytest.mark.parametrize(("name", "depth"), [("state_dict_full.json", 4), ("state_dict_full_33L.json", 33)])
def test_state_dict_matches_release_layout(fx, name, depth):
    d, _ = fx
    ref = json.loads((d / name).read_text())
    shapes = {t["key"]: t["shape"] for t in ref["tensors"]}
    with torch.device("meta"):
        state = {k: torch.empty(s) for k, s in shapes.items()}
        module = build_module(state, n_tokens=shapes["pe_embedding.weight"][0], nhead=20)
    assert len(module.transformer_encoder.layers) == depth
    assert {k: list(v.shape) for k, v in module.state_dict().items()} == shapes


def test_lora_on_attention_projections_gets_gradients(fx):
    d, _ = fx
    emb = _load(d)
    lora_attention_gradients(
        emb, fixture_adata("uce")[:3].copy(), 8
    )  # 2 layers × (out_proj, in_proj_weight) × (A, B)


def test_offsets_pickle_is_read_safely(fx, tmp_path):
    d, _ = fx
    ck = tmp_path / "ck"
    shutil.copytree(d / "tiny", ck)
    offsets = (ck / "species_offsets.pkl").read_bytes()
    (ck / "species_offsets.pkl").unlink()
    (ck / "species_offsets.pkl").write_bytes(pickle.dumps(Counter(human=4)))  # a class, not plain data
    with pytest.raises(CheckpointError, match=r"refusing to unpickle collections\.Counter"):
        load_embedder("uce", ck, nhead=4)
    (ck / "species_offsets.pkl").write_bytes(offsets)
    assert load_embedder("uce", ck, nhead=4).dim == 32


def test_bad_checkpoints(fx, tmp_path):
    d, _ = fx
    ck = tmp_path / "ck"
    shutil.copytree(d / "tiny", ck)
    (ck / "all_tokens.torch").rename(tmp_path / "all_tokens.torch")
    with pytest.raises(CheckpointError, match=r"lacks all_tokens\.torch"):
        load_embedder("uce", ck, nhead=4)
    (tmp_path / "all_tokens.torch").rename(ck / "all_tokens.torch")
    shutil.copy(ck / "tiny_2layer_model.torch", ck / "4layer_model.torch")
    with pytest.raises(InputError, match="model_file"):
        load_embedder("uce", ck, nhead=4)
    state = torch.load(ck / "4layer_model.torch", weights_only=True)
    state["decoder.3.bias"] = torch.zeros(31)
    torch.save(state, ck / "4layer_model.torch")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_embedder("uce", ck, nhead=4, model_file="4layer_model.torch")
    with pytest.raises(InputError, match="nhead=20 does not divide"):
        load_embedder("uce", ck, model_file="tiny_2layer_model.torch")
    with pytest.raises(InputError, match="species"):
        _load(d, species="cat")


def test_cell_without_vocabulary_genes_is_nan(fx, caplog):
    d, _ = fx
    emb = _load(d)
    assert_oov_cell_is_nan(emb, fixture_adata("uce"), caplog)


@pytest.mark.slow
def test_real_pc9_through_runner(fx, tmp_path):
    """Real raw counts (PC9, erlotinib day 11) → ingest → runner with the tiny checkpoint → coverage recorded."""
    d, _ = fx
    check_pc9_runner(tmp_path, "uce", d / "tiny", options={"nhead": 4}, dim=32)

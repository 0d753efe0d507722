"""scBERT adapter: golden parity, batch invariance, state dict, LoRA, bad checkpoint dirs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from adapter_checks import (
    assert_batch_invariant,
    assert_lora_gradients,
    check_pc9_two_samples,
    copy_tiny,
    inject_lora,
    module_shapes,
    pc9_two_sample_store,
    release_shapes,
)
from conftest import fixture_adata, model_fixture

from scdrugmap import embedder
from scdrugmap.embedder._performer import PerformerLM
from scdrugmap.store.errors import CheckpointError, InputError


@pytest.fixture(scope="module")
def fx():
    root = model_fixture("scbert")
    return root, np.load(root / "expected.npz", allow_pickle=False), fixture_adata("scbert")


def _load(root, **kw):
    return embedder.load_embedder("scbert", root / "tiny", device="cpu", **kw)


def test_tokens_match_original(fx):
    root, exp, adata = fx
    emb = _load(root)
    assert np.array_equal(emb.in_vocabulary(adata.var), exp["panel_index_of_var"] >= 0)
    tokens = emb.tokenize(adata)
    np.testing.assert_array_equal(tokens.values.toarray(), exp["normalized_log2"])
    np.testing.assert_array_equal(tokens.token_ids(), exp["input_tokens"])
    np.testing.assert_array_equal(tokens.expressed(), exp["expressed_mask"])


def test_golden_embeddings(fx):
    root, exp, adata = fx
    emb = _load(root, batch_size=3)  # small batches: each cell's sequence is all 16,907 genes (memory)
    out = emb.embed(adata)  # production path, default pooling = masked mean
    assert out.dtype == np.float32
    assert out.shape == (24, 32)
    np.testing.assert_allclose(out, exp["cell_embeddings"], atol=1e-5, rtol=0)
    tokens = emb.tokenize(adata[:3])
    hidden = emb.forward(tokens)
    for pooling, key in (
        ("mean", "cell_embeddings_mean_all_positions"),
        ("last", "cell_embeddings_last_position"),
    ):
        emb.options["pooling"] = pooling
        np.testing.assert_allclose(emb.pool(hidden, tokens), exp[key][:3], atol=1e-5, rtol=0)


def test_batch_invariance(fx):
    root, _, adata = fx
    emb = _load(root)
    sub = adata[:4]  # 4 cells: 3 + 1 and one batch of all (memory: every cell is 16,907 tokens)

    def embed(bs):
        emb.batch_size = bs
        return emb.embed(sub)

    assert_batch_invariant(embed, sizes=(1, 3, 32))


def test_nan_row_for_cell_without_panel_genes(fx, caplog):
    root, _, adata = fx
    sub = adata[:2].copy()
    sub.X = sub.X.toarray()
    sub.X[0] = 0.0
    out = _load(root).embed(sub)
    assert np.isnan(out[0]).all()
    assert np.isfinite(out[1]).all()
    assert "no in-vocabulary gene" in caplog.text


def test_state_dict_matches_release():
    meta = json.loads((model_fixture("scbert") / "state_dict_full.json").read_text())
    cfg = meta["config"]
    with torch.device("meta"):
        model = PerformerLM(
            num_tokens=cfg["num_tokens"],
            num_positions=cfg["max_seq_len"],
            dim=cfg["dim"],
            depth=cfg["depth"],
            heads=cfg["heads"],
        )
    assert module_shapes(model) == release_shapes(meta)


def test_lora_gradients(fx):
    root, _, adata = fx
    emb = _load(root)
    module = inject_lora(emb)
    tokens = torch.from_numpy(emb.tokenize(adata[:2]).token_ids()[:, :2000])  # a prefix keeps the test fast
    module(tokens).pow(2).sum().backward()
    assert_lora_gradients(emb.torch_module(), 2 * 3 * 2)  # A and B × q/k/v × 2 layers


@pytest.fixture
def tiny_copy(tmp_path):
    return copy_tiny("scbert", tmp_path / "scbert")


@pytest.mark.parametrize("missing", ["gene2vec_16906.npy", "panglao_10000.h5ad", "panglao_pretrain_tiny.pth"])
def test_missing_file_named(tiny_copy, missing):
    (tiny_copy / missing).unlink()
    expect = "panglao_pretrain.pth" if missing.endswith(".pth") else missing
    with pytest.raises(CheckpointError, match=expect.replace(".", r"\.")):
        embedder.load_embedder("scbert", tiny_copy, device="cpu")


def test_release_weight_name_preferred(tiny_copy):
    (tiny_copy / "panglao_pretrain_tiny.pth").rename(tiny_copy / "panglao_pretrain.pth")
    shutil.copy(tiny_copy / "panglao_pretrain.pth", tiny_copy / "finetuned.pth")
    assert embedder.load_embedder("scbert", tiny_copy, device="cpu").files[0].name == "panglao_pretrain.pth"


def test_wrong_shapes_and_config(tiny_copy):
    path = tiny_copy / "panglao_pretrain_tiny.pth"
    ckpt = torch.load(path, weights_only=True)
    good = ckpt["model_state_dict"]["performer.net.layers.0.1.fn.fn.w2.bias"].clone()
    ckpt["model_state_dict"]["performer.net.layers.0.1.fn.fn.w2.bias"] = torch.zeros(31)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="shape"):
        embedder.load_embedder("scbert", tiny_copy, device="cpu")
    ckpt["model_state_dict"]["performer.net.layers.0.1.fn.fn.w2.bias"] = good
    torch.save(ckpt, path)
    cfg = json.loads((tiny_copy / "model_config.json").read_text())
    (tiny_copy / "model_config.json").write_text(json.dumps({**cfg, "heads": 4}))
    with pytest.raises(CheckpointError, match="heads=4"):
        embedder.load_embedder("scbert", tiny_copy, device="cpu")
    (tiny_copy / "model_config.json").unlink()  # optional: the architecture comes from the weights
    np.save(tiny_copy / "gene2vec_16906.npy", np.zeros((100, 32), dtype=np.float32))
    with pytest.raises(CheckpointError, match="gene2vec"):
        embedder.load_embedder("scbert", tiny_copy, device="cpu")


def test_bad_options(fx):
    root, _, _ = fx
    with pytest.raises(InputError, match="colour"):
        _load(root, colour="red")
    with pytest.raises(InputError, match="pooling"):
        _load(root, pooling="cls")
    with pytest.raises(CheckpointError, match="does not exist"):
        embedder.load_embedder("scbert", root / "absent")


def test_counts_required(fx):
    root, _, adata = fx
    sub = adata[:1].copy()
    sub.uns["scdrugmap"] = {"x_kind": "lognorm"}
    with pytest.raises(InputError, match="raw counts"):
        _load(root).tokenize(sub)


def test_spec_records_settings(fx):
    root, _, _ = fx
    a, b = _load(root), _load(root, pooling="mean")
    spec = a.spec()
    assert spec["pooling"] == "masked_mean"
    assert "panglao_10000.h5ad" in spec["files"]
    assert "device" not in spec
    assert "batch_size" not in spec
    assert a.revision() != b.revision()


@pytest.fixture(scope="module")
def pc9_store(tmp_path_factory):
    """5 + 5 real PC9 cells (two replicates = two samples) ingested into a fresh store."""
    return pc9_two_sample_store(tmp_path_factory, 5)


def test_real_pc9_through_runner(pc9_store):
    check_pc9_two_samples(
        pc9_store, "scbert", options={"batch_size": 4}
    )  # 16,907 tokens per cell: small batches

"""CellPLM adapter: golden parity, deterministic batching, state dict, LoRA, bad checkpoint dirs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from adapter_checks import (
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
from scdrugmap.embedder.cellplm import CellPLMModel
from scdrugmap.store.errors import CheckpointError, InputError


@pytest.fixture(scope="module")
def fx():
    root = model_fixture("cellplm")
    return root, np.load(root / "expected.npz", allow_pickle=False), fixture_adata("cellplm")


def _load(root, **kw):
    return embedder.load_embedder("cellplm", root / "tiny", device="cpu", **kw)


def test_inputs_match_original(fx):
    root, exp, adata = fx
    emb = _load(root)
    np.testing.assert_array_equal(emb.in_vocabulary(adata.var), exp["var_kept"])
    tokens = emb.tokenize(adata)
    np.testing.assert_array_equal(tokens.counts.toarray(), exp["input_counts"])
    np.testing.assert_array_equal(tokens.gene_index, exp["input_gene_index"])
    # the fixture's batch: all 24 cells in input order (cell_batch_size default 4000 ≥ 24)
    assert [b.tolist() for b in tokens.batches] == exp["batch_cell_index"].tolist()


def test_golden_with_recorded_gumbel_draw(fx):
    root, exp, adata = fx
    emb = _load(root)
    hidden = emb.forward(emb.tokenize(adata), categorical_y=torch.from_numpy(exp["gmvae_categorical_y"]))
    np.testing.assert_allclose(hidden["prelatent"], exp["encoder_output_prelatent"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(hidden["logits"], exp["gmvae_logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(hidden["latent"], exp["cell_embeddings"], atol=1e-5, rtol=0)


def test_golden_deterministic_variants(fx):
    root, exp, adata = fx
    pre = _load(root, pooling="prelatent").embed(adata)
    assert pre.shape == (24, 32)
    assert pre.dtype == np.float32
    np.testing.assert_allclose(pre, exp["encoder_output_prelatent"], atol=1e-5, rtol=0)
    arg = _load(root, latent_y="argmax").embed(adata)
    np.testing.assert_allclose(arg, exp["cell_embeddings_argmax_y"], atol=1e-5, rtol=0)


def test_embedding_is_reproducible(fx):
    root, _, adata = fx
    emb = _load(root)
    first, second = emb.embed(adata), emb.embed(adata)
    assert first.shape == (24, 16)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, _load(root).embed(adata))  # a fresh instance too
    other_seed = _load(root, seed=1).embed(adata)
    assert not np.array_equal(first, other_seed)  # the Gumbel draw is seeded by (seed, cell)
    hidden = emb.forward(emb.tokenize(adata))
    np.testing.assert_array_equal(hidden["y"].sum(dim=1).round(), np.ones(24))  # hard one-hot draws


def test_batching_rule(fx):
    root, _, adata = fx
    data = adata.copy()
    data.obs["sample_id"] = np.where(np.arange(24) % 3 == 0, "a", "b")  # 8 cells "a", 16 "b"
    data.obs["cell_uid"] = np.arange(1000, 1024)
    emb = _load(root, cell_batch_size=6)
    tokens = emb.tokenize(data)
    sizes = [len(b) for b in tokens.batches]
    assert sizes == [4, 4, 6, 5, 5]  # per sample, ceil(n / 6) contiguous near-equal chunks
    assert all(
        (data.obs["sample_id"].to_numpy()[b] == data.obs["sample_id"].iloc[b[0]]).all()
        for b in tokens.batches
    )
    whole = emb.embed(data)
    alone = emb.embed(data[data.obs["sample_id"] == "a"].copy())  # sample "b" does not affect "a"
    np.testing.assert_array_equal(whole[np.arange(24) % 3 == 0], alone)
    assert emb.spec()["cell_batching"]["cell_batch_size"] == 6
    assert emb.revision() != _load(root).revision()


def test_nan_row_for_cell_without_vocabulary_genes(fx, caplog):
    root, _, adata = fx
    data = adata.copy()
    data.X = data.X.toarray()
    data.X[5] = 0.0
    out = _load(root, pooling="prelatent").embed(data)
    assert np.isnan(out[5]).all()
    assert np.isfinite(np.delete(out, 5, axis=0)).all()
    assert "no in-vocabulary gene" in caplog.text


def test_state_dict_matches_release():
    meta = json.loads((model_fixture("cellplm") / "state_dict_full.json").read_text())
    config = dict(meta["config_without_gene_list"], gene_list=[f"G{i}" for i in range(meta["n_genes"])])
    with torch.device("meta"):
        model = CellPLMModel(config)
    ours, release = module_shapes(model), release_shapes(meta)
    assert list(ours) == meta["embedding_pipeline_keys"]
    assert ours == {k: release[k] for k in meta["embedding_pipeline_keys"]}
    assert all(k.startswith("decoder.") for k in set(release) - set(ours))  # ignored, as the original does


def test_lora_gradients(fx):
    root, _, adata = fx
    emb = _load(root)
    assert emb.lora_targets == ("query_projection", "key_projection", "value_projection")
    inject_lora(emb)
    out = emb.embed_batch_tensor(emb.tokenize(adata), 0)
    out["latent"].pow(2).sum().backward()
    assert_lora_gradients(emb.torch_module(), 2 * 3 * 2)  # A and B × q/k/v × 2 layers


@pytest.fixture
def tiny_copy(tmp_path):
    return copy_tiny("cellplm", tmp_path / "cellplm")


def test_missing_files_named(tiny_copy):
    (tiny_copy / "tiny_cellplm.best.ckpt").unlink()
    with pytest.raises(CheckpointError, match=r"tiny_cellplm\.best\.ckpt"):
        embedder.load_embedder("cellplm", tiny_copy, device="cpu")
    (tiny_copy / "tiny_cellplm.config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        embedder.load_embedder("cellplm", tiny_copy, device="cpu")


def test_wrong_shapes_and_unsupported_config(tiny_copy):
    path = tiny_copy / "tiny_cellplm.best.ckpt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_state_dict"]["encoder.layers.1.self_attn.key_projection.weight"] = torch.zeros(32, 16)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="shape"):
        embedder.load_embedder("cellplm", tiny_copy, device="cpu")
    del ckpt["model_state_dict"]["encoder.layers.1.self_attn.key_projection.weight"]
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="missing keys"):
        embedder.load_embedder("cellplm", tiny_copy, device="cpu")
    cfg_path = tiny_copy / "tiny_cellplm.config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "latent_mod": "vae"}))
    with pytest.raises(CheckpointError, match="latent_mod"):
        embedder.load_embedder("cellplm", tiny_copy, device="cpu")


def test_several_configs_need_prefix(tiny_copy, fx):
    shutil.copy(tiny_copy / "tiny_cellplm.config.json", tiny_copy / "other.config.json")
    with pytest.raises(CheckpointError, match="prefix"):
        embedder.load_embedder("cellplm", tiny_copy, device="cpu")
    assert embedder.load_embedder("cellplm", tiny_copy, device="cpu", prefix="tiny_cellplm").dim == 16


def test_bad_options(fx):
    root, _, _ = fx
    with pytest.raises(InputError, match="colour"):
        _load(root, colour="red")
    with pytest.raises(InputError, match="cell_batch_size"):
        _load(root, cell_batch_size=0)
    with pytest.raises(InputError, match="latent_y"):
        _load(root, latent_y="mode")


@pytest.fixture(scope="module")
def pc9_store(tmp_path_factory):
    """20 + 20 real PC9 cells (two replicates = two samples) ingested into a fresh store."""
    return pc9_two_sample_store(tmp_path_factory, 20)


def test_real_pc9_through_runner(pc9_store):
    check_pc9_two_samples(pc9_store, "cellplm")
    samples = pc9_store.query("SELECT COUNT(DISTINCT sample_id) AS n FROM cells WHERE dataset_id = 'pc9'")[
        "n"
    ].iloc[0]
    assert samples == 2  # the two replicates form separate attention batches

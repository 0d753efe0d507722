"""scBERT adapter: golden parity, batch invariance, state dict, LoRA, bad checkpoint dirs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import fixture_adata, model_fixture

import embedder
from embedder._performer import PerformerLM
from store.errors import CheckpointError, InputError


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
    emb = _load(root, batch_size=8)
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
    sub = adata[:8]
    results = []
    for bs in (1, 7, 32):
        emb.batch_size = bs
        results.append(emb.embed(sub))
    np.testing.assert_allclose(results[0], results[1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(results[0], results[2], atol=1e-5, rtol=0)


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
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    release = {t["key"]: t["shape"] for t in meta["tensors"]}
    assert ours == release


def test_lora_gradients(fx):
    peft = pytest.importorskip("peft")
    root, _, adata = fx
    emb = _load(root)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(emb.lora_targets), init_lora_weights=False)
    module = peft.inject_adapter_in_model(cfg, emb.torch_module())
    tokens = torch.from_numpy(emb.tokenize(adata[:2]).token_ids()[:, :2000])  # a prefix keeps the test fast
    module(tokens).pow(2).sum().backward()
    lora = {n: p for n, p in emb.torch_module().named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 3 * 2  # A and B × q/k/v × 2 layers
    for name, p in lora.items():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


@pytest.fixture
def tiny_copy(tmp_path):
    dst = tmp_path / "scbert"
    shutil.copytree(model_fixture("scbert") / "tiny", dst)
    dst.chmod(0o755)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


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
    import anndata as ad
    from conftest import shared_path

    from store import Store
    from store.ingest import ingest_h5ad

    src = shared_path("data", "real", "pc9_erlotinib_d11", "GSE149214_PC9_D11_erlotinib_raw_counts.h5ad")
    full = ad.read_h5ad(src)
    rich = np.flatnonzero(full.obs["n_genes"].to_numpy() >= 800)
    batch = full.obs["batch"].to_numpy()
    pick = np.concatenate([rich[batch[rich] == b][:5] for b in ("Day11_Erlotinib", "Day11_control")])
    tmp = tmp_path_factory.mktemp("pc9")
    full[pick].copy().write_h5ad(tmp / "pc9.h5ad")
    store = Store.open(tmp / "store", create=True)
    ingest_h5ad(store, tmp / "pc9.h5ad", dataset_id="pc9", sample_key="batch")
    return store


def test_real_pc9_through_runner(pc9_store):
    from embedder.runner import embed_datasets
    from store.embeddings import open_embeddings

    res = embed_datasets(
        pc9_store,
        "scbert",
        checkpoint=model_fixture("scbert") / "tiny",
        options={"device": "cpu"},
        progress=False,
    )
    assert res.status == "complete"
    cov = pc9_store.query("SELECT * FROM coverage WHERE revision = ?", [res.revision])
    assert len(cov) == 1
    assert 0 < cov["frac_genes"].iloc[0] <= 1
    assert 0 < cov["frac_counts"].iloc[0] <= 1
    uids = pc9_store.query("SELECT cell_uid FROM cells WHERE dataset_id = 'pc9'")["cell_uid"].to_numpy()
    values = open_embeddings(pc9_store, "scbert", revision=res.revision).sel(cell=uids).values
    assert values.shape == (len(uids), res.dim)
    assert np.isfinite(values).all()

"""CellLM adapter: golden parity, compact-padding exactness, batch invariance, state dict, LoRA, bad dirs."""

from __future__ import annotations

import json

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
from scdrugmap.embedder.celllm import CellLMTokens
from scdrugmap.store.errors import CheckpointError, InputError

POOLED = {
    "cls": "cell_embeddings_cls",
    "masked_mean": "cell_embeddings",
    "masked_mean_with_cls": "cell_embeddings_masked_mean_incl_cls",
}


@pytest.fixture(scope="module")
def fx():
    root = model_fixture("celllm")
    return root, np.load(root / "expected.npz", allow_pickle=False), fixture_adata("celllm")


def _load(root, **kw):
    return embedder.load_embedder("celllm", root / "tiny", device="cpu", **kw)


def test_tokens_match_original(fx):
    root, exp, adata = fx
    emb = _load(root)
    assert np.array_equal(emb.in_vocabulary(adata.var), exp["panel_index_of_var"] >= 0)
    tokens = emb.tokenize(adata)
    np.testing.assert_array_equal(tokens.values.toarray(), exp["model_input_fullseq"])
    ids, pos, mask = tokens.original_layout()
    np.testing.assert_array_equal(ids, exp["input_exp_tokens"])
    np.testing.assert_array_equal(pos, exp["gene_pos"])
    np.testing.assert_array_equal(mask, exp["token_mask"])
    np.testing.assert_array_equal(tokens.lengths, exp["seq_len"])


@pytest.mark.parametrize("pooling", sorted(POOLED))
def test_golden_embeddings(fx, pooling):
    root, exp, adata = fx
    out = _load(root, pooling=pooling).embed(adata)
    assert out.dtype == np.float32
    assert out.shape == (24, 32)
    np.testing.assert_allclose(out, exp[POOLED[pooling]], atol=1e-5, rtol=0)


def test_compact_padding_equals_full_padding(fx):
    """One weighted PAD representative gives the same encodings as 6,000 − length PAD tokens."""
    root, _, adata = fx
    emb = _load(root)
    tokens = emb.tokenize(adata[:2])
    ids, pos, mask = (torch.from_numpy(a) for a in tokens.original_layout())
    with torch.no_grad():
        full = emb.model(ids, pos, value_mask=mask)
        compact = emb.forward(tokens)
    for i, length in enumerate(tokens.lengths):
        np.testing.assert_allclose(compact[i, :length], full[i, :length], atol=1e-5, rtol=0)
        np.testing.assert_allclose(compact[i, -1], full[i, -1], atol=1e-5, rtol=0)  # a PAD position


def test_truncation_to_max_seq_len():
    values = torch.zeros(2, 12)
    values[0, [1, 3, 4, 6, 8, 9, 11]] = torch.tensor([0.5, 1.2, 7.0, 2.0, 3.9, 4.0, 6.0])
    values[1, [2]] = 2.5
    import scipy.sparse as sp

    tokens = CellLMTokens(sp.csr_matrix(values.numpy()), num_tokens=8, max_seq_len=5)
    np.testing.assert_array_equal(tokens.lengths, [5, 2])
    ids, pos, _ = tokens.original_layout()
    np.testing.assert_array_equal(
        ids[0], [6, 0, 1, 5, 2]
    )  # CLS, then first 4 genes in panel order, clipped at 5
    np.testing.assert_array_equal(pos[0], [12, 1, 3, 4, 6])
    np.testing.assert_array_equal(ids[1], [6, 2, 7, 7, 7])
    batch = tokens.compact()
    np.testing.assert_array_equal(batch["key_weight"], [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 3]])
    np.testing.assert_array_equal(batch["value_mask"][1], [True, True, False, False, False, False])


def test_batch_invariance(fx):
    root, _, adata = fx
    emb = _load(root, pooling="masked_mean_with_cls")

    def embed(bs):
        emb.batch_size = bs
        return emb.embed(adata)

    assert_batch_invariant(embed)
    assert emb.padding_report.padded_sorted <= emb.padding_report.padded_unsorted


def test_nan_row_for_cell_without_panel_genes(fx, caplog):
    root, _, adata = fx
    sub = adata[:3].copy()
    sub.X = sub.X.toarray()
    sub.X[1] = 0.0
    out = _load(root).embed(sub)
    assert np.isnan(out[1]).all()
    assert np.isfinite(out[[0, 2]]).all()
    assert "no in-vocabulary gene" in caplog.text


def test_state_dict_matches_release():
    meta = json.loads((model_fixture("celllm") / "state_dict_full.json").read_text())
    cfg = meta["config"]
    with torch.device("meta"):
        model = PerformerLM(
            num_tokens=cfg["num_tokens"],
            num_positions=cfg["gene_num"] + 2,
            dim=cfg["dim"],
            depth=cfg["depth"],
            heads=cfg["heads"],
        )
    assert module_shapes(model) == release_shapes(meta)


def test_lora_gradients(fx):
    root, _, adata = fx
    emb = _load(root)
    inject_lora(emb)
    loss = emb.embed_tensor(emb.tokenize(adata[:2])).pow(2).sum()
    loss.backward()
    assert_lora_gradients(emb.torch_module(), 2 * 3 * 2)  # A and B × q/k/v × 2 layers


@pytest.fixture
def tiny_copy(tmp_path):
    return copy_tiny("celllm", tmp_path / "celllm")


@pytest.mark.parametrize("missing", ["gene_list.txt", "gene2vec_5000_32.npy", "checkpoint_tiny.pth"])
def test_missing_file_named(tiny_copy, missing):
    (tiny_copy / missing).unlink()
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        embedder.load_embedder("celllm", tiny_copy, device="cpu")


def test_default_release_names_without_config(tiny_copy):
    (tiny_copy / "cellLM.json").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint4_fixed\.pth"):
        embedder.load_embedder("celllm", tiny_copy, device="cpu")
    (tiny_copy / "checkpoint_tiny.pth").rename(tiny_copy / "checkpoint4_fixed.pth")
    (tiny_copy / "gene2vec_5000_32.npy").rename(tiny_copy / "gene2vec_19379_512.npy")
    assert embedder.load_embedder("celllm", tiny_copy, device="cpu").dim == 32


def test_wrong_shapes(tiny_copy):
    path = tiny_copy / "checkpoint_tiny.pth"
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_state_dict"]["performer.net.layers.1.0.fn.to_v.weight"] = torch.zeros(64, 32)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="shape"):
        embedder.load_embedder("celllm", tiny_copy, device="cpu")


def test_gene_list_and_gene2vec_checked(tiny_copy):
    lines = (tiny_copy / "gene_list.txt").read_text().splitlines()
    (tiny_copy / "gene_list.txt").write_text("\n".join(lines[:-1]))
    with pytest.raises(CheckpointError, match="4999 genes"):
        embedder.load_embedder("celllm", tiny_copy, device="cpu")
    (tiny_copy / "gene_list.txt").write_text("\n".join(lines))
    np.save(tiny_copy / "gene2vec_5000_32.npy", np.zeros((5000, 16), dtype=np.float32))
    with pytest.raises(CheckpointError, match="gene2vec"):
        embedder.load_embedder("celllm", tiny_copy, device="cpu")


def test_bad_options(fx):
    root, _, _ = fx
    with pytest.raises(InputError, match="colour"):
        _load(root, colour="red")
    with pytest.raises(InputError, match="pooling"):
        _load(root, pooling="max")
    with pytest.raises(CheckpointError):
        embedder.load_embedder("celllm", None)


def test_spec_records_settings(fx):
    root, _, _ = fx
    a, b = _load(root), _load(root, pooling="masked_mean")
    spec = a.spec()
    assert spec["pooling"] == "cls"
    assert "checkpoint_tiny.pth" in spec["files"]
    assert "device" not in spec
    assert "batch_size" not in spec
    assert a.revision() != b.revision()


@pytest.fixture(scope="module")
def pc9_store(tmp_path_factory):
    """20 + 20 real PC9 cells (two replicates = two samples) ingested into a fresh store."""
    return pc9_two_sample_store(tmp_path_factory, 20)


def test_real_pc9_through_runner(pc9_store):
    check_pc9_two_samples(pc9_store, "celllm")

"""scFoundation adapter: golden parity, release layout, batch-size correctness, LoRA, bad checkpoints.

The released gene panel (``OS_scRNA_gene_index.19264.tsv``) ships with the scFoundation code,
not with the weights, and is not in ``../shared``. The tests therefore write a panel file
with the same shape (19,264 rows, header ``gene_name\\tindex``) in which each fixture gene
sits at the panel index the original gave it: a panel index's expression across the 24
cells (recovered from the stored inputs) identifies the gene; genes with identical
expression in every cell are interchangeable for the model's input. Other rows are fillers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from adapter_checks import assert_oov_cell_is_nan, check_pc9_runner, lora_attention_gradients
from conftest import fixture_adata, model_fixture

from scdrugmap.embedder import load_embedder
from scdrugmap.embedder.scfoundation import PANEL, build_module
from scdrugmap.store.errors import CheckpointError, InputError

N_PANEL = 19264


@pytest.fixture(scope="module")
def fx():
    d = model_fixture("scfoundation")
    return d, np.load(d / "expected.npz", allow_pickle=False)


def _panel_names(e, adata) -> list[str]:
    X = adata.X.toarray()
    by_profile: dict[tuple, list[str]] = {}
    for j in np.flatnonzero(e["var_in_gene_panel"]):
        by_profile.setdefault(tuple(X[:, j]), []).append(adata.var["symbol"].iloc[j])
    profiles: dict[int, np.ndarray] = {}
    for c, (pos, val) in enumerate(zip(e["position_gene_ids"], e["input_values"], strict=True)):
        for p, v in zip(pos, val, strict=True):
            if 0 <= p < N_PANEL:
                count = np.expm1(np.float64(v)) * e["total_count_in_panel"][c] / 1e4
                profiles.setdefault(int(p), np.zeros(len(X), np.float32))[c] = np.round(count)
    names = [f"FILLER{i}" for i in range(N_PANEL)]
    for p, prof in profiles.items():
        names[p] = by_profile[tuple(prof)].pop()
    free = (i for i in range(N_PANEL) if i not in profiles)
    for gene in (g for gs in by_profile.values() for g in gs):  # never expressed: any free slot
        names[next(free)] = gene
    return names


@pytest.fixture(scope="module")
def ckdir(fx, tmp_path_factory):
    d, e = fx
    out = tmp_path_factory.mktemp("scfoundation")
    (out / "models").symlink_to(d / "tiny" / "models", target_is_directory=True)
    names = _panel_names(e, fixture_adata("scfoundation"))
    (out / PANEL).write_text("gene_name\tindex\n" + "".join(f"{g}\t{i}\n" for i, g in enumerate(names)))
    return out


def _load(ck, **kw):
    return load_embedder("scfoundation", ck, device="cpu", **kw)


def test_golden_tokens(fx, ckdir):
    _, e = fx
    emb, adata = _load(ckdir), fixture_adata("scfoundation")
    np.testing.assert_array_equal(emb.in_vocabulary(adata.var), e["var_in_gene_panel"])
    tokens = emb.tokenize(adata)
    np.testing.assert_array_equal(tokens.lengths, e["seq_len"])
    p = tokens.padded()
    for c, n in enumerate(e["seq_len"]):
        np.testing.assert_array_equal(p["values"][c, :n], e["input_values"][c, :n])
        np.testing.assert_array_equal(p["positions"][c, :n], e["position_gene_ids"][c, :n])
    rde = _load(ckdir, tgthighres="a5").tokenize(adata).padded()["values"]
    np.testing.assert_array_equal(np.where(p["pad_mask"], 0, rde), e["input_values_rde_a5"])


@pytest.mark.parametrize(
    ("options", "ref"),
    [
        ({}, "cell_embeddings"),
        ({"version": "rde", "tgthighres": "a5"}, "cell_embeddings_rde_a5"),
        ({"pooling": "max"}, "cell_embeddings_pool_max"),
    ],
)
def test_golden_embeddings(fx, ckdir, options, ref):
    _, e = fx
    emb = _load(ckdir, **options)
    out = emb.embed(fixture_adata("scfoundation"))
    assert out.shape == e[ref].shape
    assert emb.dim == e[ref].shape[1]
    np.testing.assert_allclose(out, e[ref], atol=1e-5, rtol=0)


def test_any_batch_size_gives_the_batch_of_one_result(fx, ckdir):
    _, e = fx
    adata = fixture_adata("scfoundation")
    for bs in (1, 7, 32):
        np.testing.assert_allclose(
            _load(ckdir, batch_size=bs).embed(adata), e["cell_embeddings"], atol=1e-5, rtol=0
        )
    # the original's pooling (S/T at positions -1/-2, max/mean over the padded batch) is not
    emb = _load(ckdir)
    tokens = emb.tokenize(adata)
    h = emb.forward(tokens)
    naive = torch.cat([h[:, -1], h[:, -2], h[:, :-2].amax(1), h[:, :-2].mean(1)], dim=1).numpy()
    short = tokens.lengths < tokens.lengths.max()
    assert np.abs(naive[short] - e["cell_embeddings"][short]).max() > 1e-2


def test_state_dict_matches_release_layout(fx):
    d, _ = fx
    ref = json.loads((d / "state_dict_full.json").read_text())
    with torch.device("meta"):
        module = build_module(ref["converted_config"])
    got = {
        f"model.{k}": (list(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in module.state_dict().items()
    }
    assert got == {t["key"]: (t["shape"], t["dtype"]) for t in ref["tensors"]}


def test_lora_on_attention_projections_gets_gradients(ckdir):
    emb = _load(ckdir)
    lora_attention_gradients(
        emb, fixture_adata("scfoundation")[:4].copy(), 8
    )  # 2 encoder layers × (out_proj, in_proj_weight) × (A, B)


def test_bad_checkpoints(fx, ckdir, tmp_path):
    d, _ = fx
    with pytest.raises(CheckpointError, match=r"nowhere\.tsv"):
        _load(d / "tiny", gene_panel=str(tmp_path / "nowhere.tsv"))  # a missing panel is named
    with pytest.raises(CheckpointError, match=r"lacks models/models\.ckpt"):
        load_embedder("scfoundation", tmp_path)
    short = tmp_path / "short.tsv"
    short.write_text("gene_name\tindex\nA\t0\n")
    with pytest.raises(CheckpointError, match="19264 genes"):
        _load(ckdir, gene_panel=str(short))
    ckpt = torch.load(d / "tiny" / "models" / "models.ckpt", weights_only=True)
    ckpt["cell"]["state_dict"]["model.pos_emb.weight"] = torch.zeros(100, 32)
    (tmp_path / "models").mkdir()
    torch.save(ckpt, tmp_path / "models" / "models.ckpt")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        _load(tmp_path, gene_panel=str(ckdir / PANEL))
    with pytest.raises(InputError, match="tgthighres"):
        _load(ckdir, tgthighres="x4")
    with pytest.raises(InputError, match="unknown option"):
        _load(ckdir, seed=1)


def test_cell_without_vocabulary_genes_is_nan(ckdir, caplog):
    emb = _load(ckdir)
    assert_oov_cell_is_nan(emb, fixture_adata("scfoundation"), caplog)


@pytest.mark.slow
def test_real_pc9_through_runner(ckdir, tmp_path):
    """Real raw counts (PC9, erlotinib day 11) → ingest → runner with the tiny checkpoint → coverage recorded."""
    check_pc9_runner(tmp_path, "scfoundation", ckdir, dim=128)

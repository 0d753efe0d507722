"""The shared vocabulary matcher (embedder.vocab) and the file-identifier reader (store.genes)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scdrugmap.embedder.tgpt import normalise_symbol
from scdrugmap.embedder.vocab import GeneMatch, Vocabulary, check_gene_matching
from scdrugmap.store.errors import InputError
from scdrugmap.store.gene_reference import is_ensembl_id, strip_version
from scdrugmap.store.genes import file_identifiers


def _var(names, **columns) -> pd.DataFrame:
    return pd.DataFrame(columns, index=pd.Index(names))


def _match(vocab: Vocabulary, names, mode="best", **columns) -> GeneMatch:
    return vocab.match(_var(names, **columns), gene_matching=mode)


def test_outdated_symbols_find_the_current_ones_and_back():
    current = Vocabulary(["TP53", "H2AZ1", "CCN1"], kind="symbol")
    m = _match(current, ["H2AFZ", "CYR61", "TP53", "NOT_A_GENE"])
    assert m.index.tolist() == [1, 2, 0, -1]
    assert m.route.tolist() == ["alias", "alias", "exact", "none"]
    old = Vocabulary(["H3F3B", "ATP5E"], kind="symbol")  # a vocabulary of older names
    m = _match(old, ["ATP5F1E", "H3-3B"])
    assert m.index.tolist() == [1, 0]
    assert set(m.route) == {"alias"}
    assert _match(old, ["ATP5F1E", "H3-3B"], "original").index.tolist() == [-1, -1]


def test_case_of_hgnc_previous_and_alias_symbols_is_ignored():
    # HGNC lists the alias as 'Hdgfrp2'; files and vocabularies write HDGFRP2
    assert _match(Vocabulary(["HDGFL2"], kind="symbol"), ["HDGFRP2"]).index.tolist() == [0]
    assert _match(Vocabulary(["HDGFRP2"], kind="symbol"), ["HDGFL2"]).index.tolist() == [0]


def test_never_two_genes_on_one_token_nor_one_gene_on_two():
    vocab = Vocabulary(["H2AZ1", "H2AFZ"], kind="symbol")  # one gene, two entries
    m = _match(vocab, ["H2AFZ", "X", "H2AZ1"])
    assert m.index.tolist() == [1, -1, 0]  # each takes its own spelling
    m = _match(Vocabulary(["H2AZ1"], kind="symbol"), ["H2AFZ", "H2AZ1"])
    assert m.index.tolist() == [-1, 0]  # the exact spelling wins; the alias finds the entry taken
    assert np.unique(m.index[m.found]).size == m.found.sum()


def test_ensembl_vocabulary_versions_symbols_and_original_mode():
    vocab = Vocabulary(["ENSG00000141510", "ENSG00000164032"], kind="ensembl")  # TP53, H2AZ1
    m = _match(vocab, ["ENSG00000164032.9", "ENSG00000141510.17"])
    assert m.index.tolist() == [1, 0]
    assert set(m.route) == {"exact"}
    assert _match(vocab, ["ENSG00000164032.9"], "original").index.tolist() == [-1]
    m = _match(vocab, ["H2AFZ", "TP53"])  # a symbol-only file: the Ensembl cross-map
    assert m.index.tolist() == [1, 0]
    assert set(m.route) == {"crossmap"}


def test_symbol_vocabulary_reads_an_ensembl_only_file_through_the_crossmap():
    m = _match(Vocabulary(["TP53"], kind="symbol"), ["ENSG00000141510.17"])
    assert (m.index.tolist(), m.route.tolist()) == ([0], ["crossmap"])


def test_models_own_normalisation_applies_to_file_and_candidates():
    vocab = Vocabulary(["HLA_B", "NKX2_8"], kind="symbol", normalise=normalise_symbol)
    m = _match(vocab, ["HLA-B", "NKX2.8"])
    assert (m.index.tolist(), set(m.route)) == ([0, 1], {"exact"})
    upper = Vocabulary(["C1ORF112"], kind="symbol", normalise=str.upper)  # UCE: case-insensitive
    assert _match(upper, ["C1orf112"], "original").index.tolist() == [0]


def test_summary_counts_genes_and_share_of_counts_per_route():
    m = _match(Vocabulary(["TP53", "H2AZ1"], kind="symbol"), ["TP53", "H2AFZ", "NOPE"])
    s = m.summary(np.array([[1.0, 2.0, 7.0], [1.0, 0.0, 9.0]]))
    assert (s["n_genes"], s["genes_exact"], s["genes_alias"], s["genes_none"]) == (3, 1, 1, 1)
    assert s["counts_exact"] == pytest.approx(0.1)
    assert s["counts_alias"] == pytest.approx(0.1)
    assert s["counts"] == pytest.approx(0.2)
    assert s["genes"] == pytest.approx(2 / 3)


def test_ensembl_ids_are_recognised_and_ensa_is_a_symbol():
    assert is_ensembl_id("ENSG00000141510.17")
    assert is_ensembl_id("ENSMUSG00000059552")
    assert not is_ensembl_id("ENSA")
    assert not is_ensembl_id("ENSAP2")
    assert strip_version("ENSG00000141510.17") == "ENSG00000141510"
    assert strip_version("HLA-B.1") == "HLA-B.1"
    ids = file_identifiers(_var(["ENSA", "ENSG00000141510.17", "ENSG00000164032"]))
    assert ids["file_symbol"].tolist() == ["ENSA", "", ""]
    assert ids["file_ensembl_id"].tolist() == ["", "ENSG00000141510.17", "ENSG00000164032"]


def test_file_identifiers_read_var_names_then_id_columns():
    var = _var(["ENSG00000141510", "ENSG00000164032"], gene_symbols=["TP53", "H2AFZ"])
    ids = file_identifiers(var)
    assert ids["file_symbol"].tolist() == ["TP53", "H2AFZ"]
    assert ids["file_ensembl_id"].tolist() == ["ENSG00000141510", "ENSG00000164032"]
    # census-style symbols: a gene without a symbol is named by its Ensembl id, and a symbol model
    # sees that name exactly as written
    census = file_identifiers(_var(["TP53", "ENSG00000288000", "H2AZ1"]))
    assert census["file_symbol"].tolist() == ["TP53", "ENSG00000288000", "H2AZ1"]
    assert census["file_ensembl_id"].tolist() == ["", "ENSG00000288000", ""]
    keyed = file_identifiers(_var(["a", "b"], name=["TP53", "CCN1"]), gene_key="name")
    assert keyed["file_symbol"].tolist() == ["TP53", "CCN1"]


def test_bad_gene_matching_is_refused_with_the_choices():
    with pytest.raises(InputError, match=r"gene_matching='strict'.*best, original"):
        check_gene_matching("tgpt", "strict")


def test_copies_ingested_before_file_ids_were_kept_are_read_from_their_feature_column():
    # a version-2 store's copy: 'symbol' holds HGNC's renaming, 'feature' the file's own name
    old = _var(
        ["H2AFZ", "TP53"], feature=["H2AFZ", "TP53"], symbol=["H2AZ1", "TP53"], gene_source="var_names"
    )
    assert file_identifiers(old)["file_symbol"].tolist() == ["H2AFZ", "TP53"]
    vocab = Vocabulary(["H2AFZ", "TP53"], kind="symbol")  # a model that spells it the old way
    assert _match(vocab, ["H2AFZ", "TP53"], "original", **old.to_dict("list")).index.tolist() == [0, 1]


def test_a_file_with_no_mappable_gene_is_refused_unless_allowed(tmp_path):
    import anndata as ad
    from click.testing import CliRunner

    from scdrugmap.cli import main

    rng = np.random.default_rng(0)
    X = rng.poisson(2.0, size=(40, 30)).astype(np.float32)
    adata = ad.AnnData(X=X, var=pd.DataFrame(index=[f"probe_{i}" for i in range(30)]))
    adata.write_h5ad(tmp_path / "probes.h5ad")
    args = ["--store", str(tmp_path / "s"), "ingest", str(tmp_path / "probes.h5ad"), "--dataset-id", "p",
            "--min-genes", "0", "--max-pct-mito", "100"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0
    assert "none of its 30 genes ('probe_0'" in res.output
    assert "--gene-key" in res.output
    assert not (tmp_path / "s").exists()  # nothing half-written: not even the new store
    res = CliRunner().invoke(main, [*args, "--allow-unmapped"])
    assert res.exit_code == 0, res.output
    assert "0/30 genes mapped" in res.output

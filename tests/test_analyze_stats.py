"""Unit tests of the biology views' statistics: BH, ORA, GMT, org.Hs.eg.db sets, stars, separation."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats

from scdrugmap.classify.analyze.confidence import confidence_stars
from scdrugmap.classify.analyze.de import bh, de_overlap
from scdrugmap.classify.analyze.enrich import GeneSet, over_representation, read_gmt, write_gmt
from scdrugmap.classify.analyze.genesets import OrgDbSpec, orgdb_genesets
from scdrugmap.classify.analyze.separation import separation_scores
from scdrugmap.cli import main
from scdrugmap.store.errors import InputError


def test_bh_matches_definition() -> None:
    p = np.array([0.01, 0.04, 0.03, 0.2, np.nan])
    got = bh(p)
    ranked = np.sort(p[:4])
    manual = np.minimum.accumulate((ranked * 4 / np.arange(1, 5))[::-1])[::-1]
    assert np.allclose(np.sort(got[:4]), manual)
    assert np.isnan(got[4])


def test_over_representation_ranks_planted_set_first() -> None:
    rng = np.random.default_rng(0)
    universe = [f"G{i}" for i in range(2000)]
    planted = set(universe[:30])
    sets = [GeneSet("PLANTED", "planted", frozenset(planted))]
    sets += [
        GeneSet(f"R{i}", "random", frozenset(rng.choice(universe, 30, replace=False))) for i in range(200)
    ]
    query = list(planted)[:20] + list(rng.choice(universe[30:], 20, replace=False))
    res = over_representation(query, universe, sets)
    assert res["term"].iloc[0] == "PLANTED"
    assert res["n_hits"].iloc[0] == 20
    assert res["p"].iloc[0] == pytest.approx(stats.hypergeom.sf(19, 2000, 30, 40))
    assert res["padj"].iloc[0] < 1e-10
    assert (res["padj"].iloc[1:] > 0.01).all()
    assert list(res["rank"]) == list(range(1, len(res) + 1))


def test_over_representation_restricts_sets_to_universe_and_size() -> None:
    sets = [
        GeneSet("A", "a", frozenset({"X1", "X2", "OUT"})),
        GeneSet("B", "b", frozenset({f"X{i}" for i in range(9)})),
    ]
    res = over_representation(["x1", "X2"], [f"X{i}" for i in range(10)], sets, min_size=3)
    assert list(res["term"]) == ["B"]  # A has 2 genes inside the universe
    assert res["set_size"].iloc[0] == 9
    assert over_representation([], ["X1"], sets).empty


def test_gmt_round_trip_and_errors(tmp_path: Path) -> None:
    sets = [
        GeneSet("S1", "first set", frozenset({"A", "B"})),
        GeneSet("S2", "tab\tin text", frozenset({"C"})),
    ]
    path = tmp_path / "x.gmt"
    assert write_gmt(sets, path) == 2
    back = read_gmt(path)
    assert [(s.name, s.genes) for s in back] == [("S1", frozenset({"A", "B"})), ("S2", frozenset({"C"}))]
    assert back[1].description == "tab in text"
    (tmp_path / "bad.gmt").write_text("only\tname\n")
    with pytest.raises(InputError, match="GMT line"):
        read_gmt(tmp_path / "bad.gmt")
    with pytest.raises(InputError, match="does not exist"):
        read_gmt(tmp_path / "missing.gmt")


def _tiny_orgdb(tmp: Path) -> tuple[Path, Path]:
    """A miniature org.Hs.eg.sqlite + GO.sqlite with the real tables' layout."""
    org, go = tmp / "org.Hs.eg.sqlite", tmp / "GO.sqlite"
    con = sqlite3.connect(org)
    con.executescript(
        """
        CREATE TABLE genes (_id INTEGER PRIMARY KEY, gene_id VARCHAR(10) NOT NULL UNIQUE);
        CREATE TABLE gene_info (_id INTEGER NOT NULL UNIQUE, gene_name VARCHAR(255), symbol VARCHAR(80));
        CREATE TABLE go_bp (_id INTEGER, go_id CHAR(10), evidence CHAR(3));
        CREATE TABLE go_bp_all (_id INTEGER, go_id CHAR(10), evidence CHAR(3));
        CREATE TABLE go_mf_all (_id INTEGER, go_id CHAR(10), evidence CHAR(3));
        CREATE TABLE go_cc_all (_id INTEGER, go_id CHAR(10), evidence CHAR(3));
        CREATE TABLE kegg (_id INTEGER, path_id CHAR(5));
        """
    )
    syms = ["IFI6", "ISG15", "MX1", "OAS1", "ACTB", "GAPDH"]
    con.executemany("INSERT INTO genes VALUES (?, ?)", [(i, str(1000 + i)) for i in range(len(syms))])
    con.executemany("INSERT INTO gene_info VALUES (?, ?, ?)", [(i, s.lower(), s) for i, s in enumerate(syms)])
    virus = [(i, "GO:0051607", ev) for i in range(4) for ev in ("IDA", "IEA")]  # duplicated evidence rows
    con.executemany("INSERT INTO go_bp VALUES (?, ?, ?)", virus)
    con.executemany(
        "INSERT INTO go_bp_all VALUES (?, ?, ?)", virus + [(i, "GO:0008150", "ND") for i in range(6)]
    )
    con.executemany("INSERT INTO go_mf_all VALUES (?, ?, ?)", [(4, "GO:0005198", "IDA")])
    con.executemany("INSERT INTO kegg VALUES (?, ?)", [(0, "04620"), (1, "04620"), (4, "04620")])
    con.commit()
    con.close()
    con = sqlite3.connect(go)
    con.execute(
        "CREATE TABLE go_term (_id INTEGER PRIMARY KEY, go_id CHAR(10), term VARCHAR(255), ontology VARCHAR(9))"
    )
    con.executemany(
        "INSERT INTO go_term VALUES (?, ?, ?, ?)",
        [(1, "GO:0051607", "defense response to virus", "BP"), (2, "GO:0008150", "biological_process", "BP")],
    )
    con.commit()
    con.close()
    return org, go


def test_orgdb_genesets_from_synthetic_sqlite(tmp_path: Path) -> None:
    org, go = _tiny_orgdb(tmp_path)
    sets = {s.name: s for s in orgdb_genesets(org, go_sqlite=go, spec=OrgDbSpec(min_size=1))}
    assert sets["GO:0051607"].genes == frozenset({"IFI6", "ISG15", "MX1", "OAS1"})
    assert sets["GO:0051607"].description == "defense response to virus"
    assert len(sets["GO:0008150"].genes) == 6  # propagated (the *_all tables)
    assert sets["KEGG:hsa04620"].genes == frozenset({"IFI6", "ISG15", "ACTB"})
    assert sets["GO:0005198"].description == "GO MF"  # no name in GO.sqlite
    direct = {
        s.name for s in orgdb_genesets(org, spec=OrgDbSpec(("BP",), propagate=False, kegg=False, min_size=1))
    }
    assert direct == {"GO:0051607"}
    # min/max size filter
    assert "GO:0008150" not in {s.name for s in orgdb_genesets(org, spec=OrgDbSpec(min_size=1, max_size=5))}
    out = tmp_path / "sets.gmt"
    res = CliRunner().invoke(main, ["genesets", "from-orgdb", str(org), "--out", str(out), "--go-db", str(go),
                                    "--min-size", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "wrote 4 gene sets" in res.output
    assert {s.name for s in read_gmt(out)} == set(sets)


def test_orgdb_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="apt-get download"):
        orgdb_genesets(tmp_path / "nope.sqlite")
    bad = tmp_path / "bad.sqlite"
    sqlite3.connect(bad).execute("CREATE TABLE x (a)").connection.close()
    with pytest.raises(InputError, match="not an org"):
        orgdb_genesets(bad)
    res = CliRunner().invoke(main, ["genesets", "from-orgdb", str(bad), "--out", str(tmp_path / "o.gmt")])
    assert res.exit_code == 1
    assert "Error: " in res.output
    assert "not an org" in res.output


@pytest.mark.parametrize(
    ("kw", "stars"),
    [
        ({"sample_origin": "Metastatic"}, 3),
        ({"sample_origin": "PDX", "exposure_days": 3}, 3),
        ({"intrinsic_resistance": True}, 3),
        ({"exposure_days": 200}, 3),
        ({"exposure_days": 180}, 2),
        ({"exposure_days": 30}, 2),
        ({"exposure_days": 29}, 1),
        ({"sample_origin": "primary"}, None),
        ({}, None),
    ],
)
def test_confidence_stars_rule(kw: dict, stars: int | None) -> None:
    assert confidence_stars(**kw)[0] == stars


def test_separation_scores_informative_beats_shuffled() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(["sensitive", "resistant"], 150)
    X = rng.normal(size=(300, 80))
    X[:, :5] += np.where(y == "resistant", 1.5, 0.0)[:, None]
    good = separation_scores(X, y)
    bad = separation_scores(rng.permutation(X), y)
    assert good["silhouette"] > good["silhouette_shuffled"] + 0.02
    assert good["knn_purity"] > good["knn_purity_expected"] + 0.1
    assert good["silhouette"] > bad["silhouette"]
    assert good["knn_purity"] > bad["knn_purity"]
    assert bad["knn_purity"] == pytest.approx(0.5, abs=0.06)
    with pytest.raises(InputError, match="2 cells"):
        separation_scores(X[:3], np.array(["a", "a", "b"]))


def test_de_overlap() -> None:
    t = pd.DataFrame({"gene": list("ABCDE"), "log2fc": [2.0, 1.0, -1.0, 0.1, 0.0], "padj": [0.0, 0.01, 0.02, 0.5, 0.9],
                      "significant": [True, True, True, False, False]})  # fmt: skip
    p = pd.DataFrame({"gene": list("ABCDE"), "log2fc": [1.5, 0.2, -0.8, 0.3, 0.1],
                      "significant": [True, False, True, True, False]})  # fmt: skip
    ov = de_overlap(p, t)
    assert ov["n_shared"] == 2
    assert ov["jaccard"] == pytest.approx(2 / 4)
    assert ov["missed_genes"] == ["B"]
    assert ov["spearman_log2fc"] == pytest.approx(
        stats.spearmanr([1.5, 0.2, -0.8, 0.3, 0.1], [2, 1, -1, 0.1, 0]).statistic
    )

"""User filters are one read-only expression: injection attempts change nothing and exit ≠ 0."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from scdrugmap.cli import main
from scdrugmap.store import Store
from scdrugmap.store.catalog import TABLES
from scdrugmap.store.errors import InputError
from scdrugmap.store.filters import check_expression, matching_keys


def _ok(*args: str) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulated store with cells, a pca embedding and one (fake) prediction row."""
    root = tmp_path_factory.mktemp("filters")
    _ok("simulate", "--out", root / "sim", "--n-cells", "400", "--n-genes", "1000", "--seed", "3")
    store = root / "store"
    _ok("--store", store, "ingest", "--manifest", root / "sim" / "manifest.csv")
    with Store.open(store).transaction() as con:
        con.execute("INSERT INTO predictions VALUES ('r0', 0, 0, 0.5)")
        con.execute("INSERT INTO eval_runs (run_id, model) VALUES ('r0', 'pca')")
    return store


@pytest.fixture
def store(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(built, copy)
    return copy


def _rows(store: Path) -> dict[str, int]:
    return Store.open(store).snapshot()


INJECT_DATASETS = "true); DELETE FROM cells; SELECT * FROM datasets WHERE (true"
INJECT_EMBED = "true; DELETE FROM predictions; SELECT * FROM datasets WHERE true"


def test_datasets_where_injection_changes_nothing(store: Path) -> None:
    before = _rows(store)
    assert before["cells"] > 0
    res = CliRunner().invoke(main, ["--store", str(store), "datasets", "--where", INJECT_DATASETS])
    assert res.exit_code != 0
    assert "one SQL expression" in res.output
    assert _rows(store) == before


def test_embed_where_injection_changes_nothing(store: Path) -> None:
    before = _rows(store)
    assert before["predictions"] == 1
    args = ["--store", str(store), "embed", "--model", "pca", "--no-progress", "--where", INJECT_EMBED]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0
    assert _rows(store) == before
    assert not (store / "embeddings.zarr").exists()


@pytest.mark.parametrize(
    "expr",
    [
        "true) UNION SELECT dataset_id FROM datasets WHERE (true",  # balanced but escapes the parentheses
        "true) OR (true",
        "tissue = 'x' -- comment",
        "1 = 1 /* c */",
        "$$x$$ = 'x'",
        "tissue = 'unterminated",
        "",
        "   ",
    ],
)
def test_filters_that_are_not_one_expression_are_refused(store: Path, expr: str) -> None:
    with pytest.raises(InputError):
        matching_keys(Store.open(store), expr)


def test_filter_cannot_write_or_read_files(store: Path) -> None:
    st = Store.open(store)
    before = st.snapshot()
    for expr in (
        "dataset_id IN (SELECT dataset_id FROM read_csv('/etc/passwd'))",
        "(DELETE FROM cells) IS NULL",
        "getenv('HOME') IS NOT NULL",
    ):
        with pytest.raises(InputError):
            matching_keys(st, expr)
    assert st.snapshot() == before


def test_valid_filters_still_select(store: Path) -> None:
    st = Store.open(store)
    all_ids = st.datasets()["dataset_id"].tolist()
    tissue = st.datasets()["tissue"].iloc[0]
    some = st.datasets(f"tissue = '{tissue}' AND (n_cells > 0 OR study IS NULL)")
    assert 0 < len(some) <= len(all_ids)
    assert set(some["tissue"]) == {tissue}
    # ';' inside a string is data
    assert check_expression("  dataset_id LIKE '%;%'  ") == "dataset_id LIKE '%;%'"
    assert matching_keys(st, "dataset_id LIKE '%;%'") == []
    out = _ok("--store", store, "datasets", "--filter", f"tissue={tissue}")
    assert all_ids[0] in out or tissue in out
    assert matching_keys(st, "model = 'pca'", table="eval_runs") == ["r0"]


def test_sql_command_refuses_several_statements(store: Path) -> None:
    before = _rows(store)
    res = CliRunner().invoke(main, ["--store", str(store), "sql", "SELECT 1; DELETE FROM cells"])
    assert res.exit_code != 0
    assert "exactly one statement" in res.output
    assert _rows(store) == before
    assert set(before) == set(TABLES)


def test_results_where_injection_changes_nothing(store: Path) -> None:
    before = _rows(store)
    inject = "true); DELETE FROM eval_runs; SELECT run_id FROM eval_runs WHERE (true"
    res = CliRunner().invoke(main, ["--store", str(store), "results", "--where", inject])
    assert res.exit_code != 0
    assert "one SQL expression" in res.output
    assert _rows(store) == before
    res = CliRunner().invoke(main, ["--store", str(store), "results", "--where", "model = 'pca'"])
    assert res.exit_code == 0, res.output

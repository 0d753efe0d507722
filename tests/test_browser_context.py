"""The page's Cell context tab in headless Chromium (issue 21 acceptance 2): resistant and sensitive
cells per cell type, and a CCC run's heat map and top pairs. Skips like tests/test_browser.py when
playwright or Chromium is absent."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from test_browser import _free_port, _start, browser  # noqa: F401  (the browser fixture)

from scdrugmap.classify.analyze.celltypes import cell_type_proportions
from scdrugmap.cli import main
from scdrugmap.store import Store


def _ok(args: list[str]) -> str:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.slow
def test_context_tab_shows_proportions_per_cell_type(browser, tmp_path: Path) -> None:  # noqa: F811
    import uvicorn

    from scdrugmap.classify.service import create_app

    _ok(["simulate", "--out", str(tmp_path / "sim"), "--n-cells", "400", "--cell-types", "4"])
    store = tmp_path / "store"
    base = ["--store", str(store)]
    _ok([*base, "ingest", str(tmp_path / "sim" / "SIM03.h5ad"), "--dataset-id", "SIM03", "--label-key", "response",
         "--sample-key", "sample_id"])  # fmt: skip
    _ok([*base, "analyze", "celltypes", "annotate", "--dataset", "SIM03"])
    _ok([*base, "analyze", "ccc", "--dataset", "SIM03", "--n-perms", "50"])
    props = cell_type_proportions(Store.open(store))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(store), host="127.0.0.1", port=port, log_level="warning"))
    thread = _start(srv)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(f"http://127.0.0.1:{port}/")
        page.click("button[data-tab=context]")
        page.wait_for_selector("#ct-table tbody tr")
        rows = page.locator("#ct-table tbody tr")
        assert rows.count() == len(props)
        shown = {r.split("\t")[0]: r.split("\t") for r in rows.all_inner_texts()}
        for p in props.itertuples():  # each type's cells, resistant and sensitive counts and resistant share
            cells = shown[p.cell_type]
            assert cells[1:4] == [str(p.n_cells), str(p.n_resistant), str(p.n_sensitive)]
            assert cells[5] == f"{100 * p.frac_resistant:.1f} %"
        bars = page.locator("#ct-chart svg rect.ct-bar.resistant")
        assert bars.count() == len(props)
        epi = page.locator("#ct-chart svg rect.ct-bar.resistant[data-type=epithelial] title").text_content()
        assert "epithelial: resistant" in epi
        page.wait_for_selector("#ccc-heat svg rect.ccc-cell")
        assert page.locator("#ccc-table tbody tr").count() > 0
        assert "resistant" in page.inner_text("#ccc-info")
        assert not problems, problems
        page.close()
    finally:
        srv.should_exit = True
        thread.join(timeout=10)

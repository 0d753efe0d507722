"""The page's Atlas tab in headless Chromium (issue 21): the model recommendation table and a release
download. Skips like tests/test_browser.py when playwright or Chromium is absent."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from test_browser import _free_port, _start, browser  # noqa: F401  (the browser fixture)
from test_service import demo_store

from scdrugmap.classify.analyze.releases import build_release
from scdrugmap.classify.evaluate import evaluate
from scdrugmap.store import Store


@pytest.mark.slow
def test_atlas_tab_recommends_and_downloads_a_release(
    browser,  # noqa: F811  (the fixture imported from test_browser)
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import uvicorn

    from scdrugmap.classify.service import create_app

    path = tmp_path_factory.mktemp("atlas") / "store"
    shutil.copytree(demo_store(tmp_path_factory), path)
    st = Store.open(path)
    evaluate(st, model="pca", head="logreg", category="tissue", value="Cell line", k=3, seeds=[0, 1, 2])
    rel = build_release(st, "drug_class", "chemotherapy", model="pca")
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(path), host="127.0.0.1", port=port, log_level="warning"))
    thread = _start(srv)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(f"http://127.0.0.1:{port}/")
        page.click("button[data-tab=atlas]")
        page.wait_for_selector("#rec-table tbody tr")
        text = page.inner_text("#rec-table")
        assert "not enough evidence" in text  # one model/head per value: nothing to choose between
        assert "Cell line" in text
        assert "[" in text  # the interval over seeds
        page.select_option("#rec-scenario", "cross")
        page.wait_for_function(
            "[...document.querySelectorAll('#rec-table tbody tr td:nth-child(3)')].every(td => td.textContent === 'cross-data')"
        )
        page.wait_for_selector(f"#rel-table tbody tr:has-text('{rel.release_id}')")
        with page.expect_download() as dl:
            page.click("#rel-table a.release-download")
        data = Path(dl.value.path()).read_bytes()
        assert hashlib.sha256(data).hexdigest() == rel.content_hash
        assert not problems, problems
        page.close()
    finally:
        srv.should_exit = True
        thread.join(timeout=10)

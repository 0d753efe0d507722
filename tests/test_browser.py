"""The web page in a real headless Chromium (Debian's ``chromium`` package, driven by playwright).

Opens the page served by uvicorn on 127.0.0.1, filters the datasets table, opens a dataset,
draws the results charts, uploads an h5ad, waits for the predictions table, downloads the CSV
and saves a screenshot. Skips cleanly when playwright or the chromium binary is absent
(``apt-get install -y chromium``; ``pip install playwright`` — no browser download needed).
Set ``SCDRUGMAP_SCREENSHOT=path.png`` to keep the screenshot (then the test also waits for the
UMAP, whose first computation compiles numba code for up to a minute).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_service import demo_store, upload_file

CHROMIUM = os.environ.get("SCDRUGMAP_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(srv) -> threading.Thread:
    """Run a uvicorn server in a daemon thread; wait (bounded) until it listens."""
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(400):
        if srv.started:
            return thread
        time.sleep(0.05)
    pytest.fail("uvicorn did not start within 20 s")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set SCDRUGMAP_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(browser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    import uvicorn

    from scdrugmap.classify.service import create_app

    store = demo_store(tmp_path_factory)
    upload = upload_file(store, tmp_path_factory.mktemp("browser") / "patient_cells.h5ad", n_cells=200)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(store), host="127.0.0.1", port=port, log_level="warning"))
    thread = _start(srv)
    yield f"http://127.0.0.1:{port}", upload
    srv.should_exit = True
    thread.join(timeout=10)


def test_page_filters_uploads_and_predicts(browser, server, tmp_path: Path) -> None:
    url, upload = server
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(url) else outside.append(r.url))
    page.goto(url)

    rows = page.locator("#ds-table tbody tr")
    rows.first.wait_for()
    assert rows.count() == 8
    page.select_option("#ds-filter-tissue", "Cell line")
    page.wait_for_function("document.querySelectorAll('#ds-table tbody tr').length === 4")
    assert set(page.locator("#ds-table tbody tr td:nth-child(3)").all_inner_texts()) == {"Cell line"}
    page.fill("#ds-search", "SIM-S03")
    page.wait_for_function("document.querySelectorAll('#ds-table tbody tr').length === 1")
    rows.first.click()
    page.wait_for_selector("#ds-detail h2:has-text('SIM03')")
    assert "pca" in page.inner_text("#ds-detail table")
    table_box = page.locator("#ds-table").locator("xpath=..").bounding_box()
    detail_box = page.locator("#ds-detail").bounding_box()
    assert table_box["x"] + table_box["width"] <= detail_box["x"]  # the detail panel covers no table column

    page.click("button[data-tab=results]")
    page.wait_for_selector("#bar-chart svg .fold-point")
    page.wait_for_selector("#radar-chart svg .radar-series")
    page.wait_for_selector("#roc-chart svg path.curve")
    assert page.locator("#res-table tbody tr").count() >= 1
    assert "Cross-data" in page.inner_text("#res-hint")
    page.select_option("#res-protocol", "cross")
    page.wait_for_function(
        "[...document.querySelectorAll('#bar-chart svg .fold-point title')].some(t => t.textContent.includes('held-out study SIM-S0'))"
    )  # cross-data fold points are named by their held-out study

    page.click("button[data-tab=predict]")
    page.wait_for_selector("#pred-head option", state="attached")
    page.set_input_files("#pred-file", str(upload))
    page.click("#pred-submit")
    page.wait_for_selector("#pred-table tbody tr", timeout=120_000)
    assert "(of 200)" in page.inner_text("#pred-summary")
    assert "QC (> 500 genes" in page.inner_text("#pred-qc")
    assert "Calibration" in page.inner_text("#pred-calibration")
    labels = set(page.locator("#pred-table tbody tr td:nth-child(4)").all_inner_texts())
    assert labels <= {"sensitive", "resistant", "abstain", "not_scored"}
    assert page.locator("#pred-table tbody tr").count() == 100
    if os.environ.get("SCDRUGMAP_SCREENSHOT"):  # the README's picture shows the UMAP (test_service checks it)
        page.wait_for_selector("#umap-chart svg circle.cell", timeout=180_000)
        assert page.locator("#umap-chart svg circle.cell").count() == 200
    with page.expect_download() as dl:
        page.click("#pred-download")
    csv = Path(dl.value.path()).read_text()
    assert csv.splitlines()[0] == "obs_name,p_sensitive,p_sensitive_raw,call,status,reason"
    assert len(csv.splitlines()) == 201

    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=False)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000
    if os.environ.get("SCDRUGMAP_SCREENSHOT"):
        shutil.copy(shot, os.environ["SCDRUGMAP_SCREENSHOT"])
    assert not problems, problems
    assert not outside, outside  # nothing loaded from outside the service
    page.close()


def test_page_asks_for_token(browser, tmp_path_factory: pytest.TempPathFactory) -> None:
    """With a token configured, the page shows the token field and then loads the data with it."""
    import uvicorn

    from scdrugmap.classify.service import create_app

    port = _free_port()
    srv = uvicorn.Server(
        uvicorn.Config(
            create_app(demo_store(tmp_path_factory), token="tok"),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = _start(srv)
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#token-form:not([hidden])")
        assert "token" in page.inner_text("#error")
        page.fill("#token", "tok")
        page.click("#token-form button")
        page.wait_for_selector("#ds-table tbody tr")
        assert page.locator("#ds-table tbody tr").count() == 8
        page.close()
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def _big_upload(store: Path, out: Path, n_cells: int = 10_000) -> Path:
    """``n_cells`` new cells: demo input cells drawn with replacement, their counts resampled (Poisson)."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    parts = [ad.read_h5ad(p) for p in sorted((store / "demo_input").glob("SIM0[1-4].h5ad"))]
    whole = ad.concat(parts, join="inner")
    rng = np.random.default_rng(7)
    pick = rng.choice(whole.n_obs, n_cells, replace=True)
    X = sp.csr_matrix(whole.X[pick], dtype=np.float32)
    X.data = rng.poisson(X.data).astype(np.float32)
    X.eliminate_zeros()
    big = ad.AnnData(X=X, var=whole.var.copy())
    big.obs_names = [f"upload_{i:05d}" for i in range(n_cells)]
    big.write_h5ad(out)
    return out


@pytest.fixture(scope="module")
def server_with_imported_head(
    browser, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """A copy of the demo store plus a head on an imported embedding (cannot embed new files)."""
    import uvicorn

    from scdrugmap.classify.evaluate import evaluate
    from scdrugmap.classify.service import create_app
    from scdrugmap.store import Store, export_obsm
    from scdrugmap.store.imports import import_embeddings

    tmp = tmp_path_factory.mktemp("browser-big")
    store = tmp / "store"
    shutil.copytree(demo_store(tmp_path_factory), store)
    st = Store.open(store)
    emb = export_obsm(st, "SIM01", "pca")
    emb.obsm["X_published"] = emb.obsm.pop("X_scdrugmap_pca")
    emb.write_h5ad(tmp / "published.h5ad")
    import_embeddings(
        st, tmp / "published.h5ad", dataset_id="SIM01", obsm_key="X_published", model="published"
    )
    evaluate(st, model="published", head="logreg", category="dataset_id", value="SIM01", grouping="cell", k=3)
    upload = _big_upload(store, tmp / "ten_thousand_cells.h5ad")
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(store), host="127.0.0.1", port=port, log_level="warning"))
    thread = _start(srv)
    yield f"http://127.0.0.1:{port}", upload
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.mark.slow
def test_page_predicts_a_10000_cell_upload(browser, server_with_imported_head) -> None:
    """Issue 17 acceptance 4: table + UMAP for 10,000 cells, the default head, no imported head offered."""
    url, upload = server_with_imported_head
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 500 else None)
    page.goto(url)
    page.click("button[data-tab=predict]")
    page.wait_for_selector("#pred-head option", state="attached")
    offered = page.locator("#pred-head option").all_inner_texts()
    assert offered
    assert not any(o.startswith("published") for o in offered)  # the imported head is not offered
    assert "(default)" in offered[0]
    assert page.input_value("#pred-head") == page.locator("#pred-head option").first.get_attribute("value")
    assert page.locator("#pred-fold-label").is_hidden()  # frozen head: no LoRA fold selector
    unavailable = page.locator("#pred-unavailable-list").text_content()  # inside a closed <details>
    assert "published" in unavailable
    assert "imported embedding" in unavailable
    assert "probability that it is drug-sensitive" in page.inner_text("#pred-hint")
    # a failed request leaves a banner; the next action clears it
    page.evaluate("document.getElementById('error').hidden = false")
    page.set_input_files("#pred-file", str(upload))
    page.click("#pred-submit")
    assert page.locator("#error").is_hidden()
    page.wait_for_selector("#pred-table tbody tr", timeout=300_000)
    assert "(of 10000)" in page.inner_text("#pred-summary")
    assert page.locator("#pred-table tbody tr").count() == 100
    calls = set(page.locator("#pred-table tbody tr td:nth-child(4)").all_inner_texts())
    assert calls <= {"sensitive", "resistant", "abstain", "not_scored"}
    assert calls & {"sensitive", "resistant"}  # the default head predicts
    page.wait_for_selector("#umap-chart svg circle.cell", timeout=300_000)
    assert page.locator("#umap-chart svg circle.cell").count() == 3000
    assert "random subsample of 3000 of 10000 cells" in page.inner_text("#umap-caption")
    assert page.locator("#error").is_hidden()
    assert not problems, problems
    page.close()

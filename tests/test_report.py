"""``scdrugmap report``: the figures (PNG + SVG), scalability tables and an offline index.html."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from test_service import demo_store

from scdrugmap import cli
from scdrugmap.store import Store


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    store = demo_store(tmp_path_factory)
    out = tmp_path_factory.mktemp("report")
    res = CliRunner().invoke(cli.main, ["--store", str(store), "report", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return store, out, res.output


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path.name
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize(
    "stem",
    ["bars_pooled_tissue", "bars_cross_tissue", "radar_pooled_tissue", "radar_cross_tissue",
     "curves_pooled_tissue", "curves_cross_tissue", "umap_pca"],
)  # fmt: skip
def test_figures_are_real_images(report_dir: tuple[Path, Path, str], stem: str) -> None:
    _, out, _ = report_dir
    png, svg = out / f"{stem}.png", out / f"{stem}.svg"
    width, height = _png_size(png)
    assert width > 300
    assert height > 200
    assert png.stat().st_size > 10_000
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml")
    assert "<svg" in text
    assert svg.stat().st_size > 5_000
    assert len(re.findall(r"<path\b", text)) > 10  # drawn content, not an empty canvas


def test_figure_content_follows_the_catalog(report_dir: tuple[Path, Path, str]) -> None:
    from PIL import Image

    _, out, _ = report_dir
    svg = (out / "bars_pooled_tissue.svg").read_text()
    for value in ("Cell line", "Bone marrow aspirate", "pca · logreg", "F1", "AUROC"):
        assert value in svg
    assert "SIM01" in (out / "umap_pca.svg").read_text()
    colors = Image.open(out / "umap_pca.png").convert("RGB").getcolors(maxcolors=1_000_000)
    assert len(colors) > 50  # many distinct colours: points, not a blank page


def test_index_is_offline_and_links_every_figure(report_dir: tuple[Path, Path, str]) -> None:
    _, out, output = report_dir
    index = (out / "index.html").read_text()
    assert "wrote 7 figures" in output
    for stem in ("bars_pooled_tissue", "radar_cross_tissue", "curves_pooled_tissue", "umap_pca"):
        assert f'src="{stem}.svg"' in index
        assert f'href="{stem}.png"' in index
    assert not re.search(r"(src|href)=\"(https?:)?//", index)
    for link in re.findall(r'(?:src|href)="([^"]+)"', index):
        assert (out / link).exists(), link
    assert "Scalability" in index


def test_scalability_tables(report_dir: tuple[Path, Path, str]) -> None:
    store, out, _ = report_dir
    emb = pd.read_csv(out / "scalability_embeddings.csv")
    assert emb.loc[0, "model"] == "pca"
    assert emb.loc[0, "dim"] == 50
    n_cells = Store.open(store).query("SELECT COUNT(*) AS n FROM cells")["n"].iloc[0]  # every cell passed QC
    assert emb.loc[0, "cells_embedded"] == n_cells
    assert emb.loc[0, "cells_per_s"] > 0
    heads = pd.read_csv(out / "scalability_heads.csv")
    assert heads.loc[0, "head"] == "logreg"
    assert heads.loc[0, "runs"] == 6
    assert heads.loc[0, "cells_per_s"] > 0


def test_report_refuses_bad_input(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    store = demo_store(tmp_path_factory)
    runner = CliRunner()
    bad = runner.invoke(
        cli.main, ["--store", str(store), "report", "--out", str(tmp_path), "--metric", "nope"]
    )
    assert bad.exit_code == 1
    assert "unknown metric" in bad.output
    empty = tmp_path / "empty"
    from scdrugmap.store import Store

    Store.open(empty, create=True)
    res = runner.invoke(cli.main, ["--store", str(empty), "report", "--out", str(tmp_path / "r")])
    assert res.exit_code == 1
    assert "nothing to draw" in res.output

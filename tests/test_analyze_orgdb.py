"""GO gene sets from the real Debian org.Hs.eg.db / GO.db packages (the offline route CI uses).

The fixture runs ``apt-get download r-bioc-org.hs.eg.db r-bioc-go.db`` and ``dpkg -x`` into a cache
folder (``$SCDRUGMAP_ORGDB_DIR``, default ``~/.cache/scdrugmap/orgdb``; reused when already there;
``apt-get update`` is run once when the package lists lack them and we are root) and skips with the
reason when apt is unavailable or offline.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from scdrugmap.classify.analyze.enrich import over_representation, read_gmt
from scdrugmap.classify.analyze.genesets import fetch_orgdb_debs
from scdrugmap.cli import main
from scdrugmap.store.errors import InputError

INTERFERON = ["IFI6", "ISG15", "IFIT1", "OAS1", "OAS2", "MX1"]


@pytest.fixture(scope="module")
def orgdb() -> dict[str, Path]:
    dest = Path(os.environ.get("SCDRUGMAP_ORGDB_DIR", Path.home() / ".cache" / "scdrugmap" / "orgdb"))
    try:
        return fetch_orgdb_debs(dest)
    except InputError as first:
        if not (hasattr(os, "geteuid") and os.geteuid() == 0):
            pytest.skip(f"Debian org.Hs.eg.db/GO.db packages unavailable: {first}")
        try:
            subprocess.run(["apt-get", "update"], capture_output=True, timeout=300, check=False)
            return fetch_orgdb_debs(dest)
        except (InputError, OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"Debian org.Hs.eg.db/GO.db packages unavailable (apt offline?): {exc}")


def test_go_gmt_from_debian_orgdb_finds_interferon_response(orgdb: dict[str, Path], tmp_path: Path) -> None:
    gmt = tmp_path / "go_bp_kegg.gmt"
    res = CliRunner().invoke(
        main,
        ["genesets", "from-orgdb", str(orgdb["r-bioc-org.hs.eg.db"]), "--out", str(gmt), "--ontology", "BP"],
    )
    assert res.exit_code == 0, res.output
    sets = read_gmt(gmt)
    by_name = {s.name: s for s in sets}
    assert len(sets) > 5000
    assert by_name["GO:0051607"].description == "defense response to virus"  # names from GO.db, found beside
    assert any(n.startswith("KEGG:hsa") for n in by_name)
    universe = set().union(*(s.genes for s in sets))
    top = over_representation(INTERFERON, universe, sets).head(10)
    print(top[["term", "description", "n_hits", "padj"]].to_string())
    text = " ".join(top["description"]).lower()
    assert "GO:0051607" in set(top["term"]) or "type i interferon" in text
    assert (top["padj"] < 1e-4).all()

"""GO and KEGG gene sets built offline from Bioconductor's ``org.Hs.eg.db`` SQLite database.

Debian ships the database in ``r-bioc-org.hs.eg.db`` and the GO term names in ``r-bioc-go.db``;
no R is needed to read them::

    apt-get update && apt-get download r-bioc-org.hs.eg.db r-bioc-go.db
    dpkg -x r-bioc-org.hs.eg.db_*.deb orgdb && dpkg -x r-bioc-go.db_*.deb orgdb
    # orgdb/usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite
    # orgdb/usr/lib/R/site-library/GO.db/extdata/GO.sqlite

Sets (gene symbols from ``gene_info``):

- ``GO:…`` — one per GO term of the chosen ontologies; by default from the ``go_<ont>_all`` tables
  (annotations propagated to every ancestor term, as Bioconductor's GOALL / clusterProfiler), all
  evidence codes; the description is the term name from GO.sqlite (``GO.db``) when found, else
  the ontology;
- ``KEGG:hsa…`` — from the ``kegg`` table (KEGG pathway ids only: the database has no pathway
  names, and its KEGG mapping dates from 2011, see its ``metadata`` table).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from scdrugmap.classify.analyze.enrich import GeneSet, write_gmt
from scdrugmap.store.errors import InputError
from scdrugmap.store.progress import progress

__all__ = [
    "ORGDB_DEBS",
    "OrgDbSpec",
    "fetch_orgdb_debs",
    "find_go_sqlite",
    "orgdb_genesets",
    "write_orgdb_gmt",
]

Ontology = Literal["BP", "MF", "CC"]
#: Debian packages holding the databases, and their SQLite paths once extracted with ``dpkg -x``
ORGDB_DEBS = {
    "r-bioc-org.hs.eg.db": "usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite",
    "r-bioc-go.db": "usr/lib/R/site-library/GO.db/extdata/GO.sqlite",
}


@dataclass(frozen=True)
class OrgDbSpec:
    """What to build: ontologies, propagation, KEGG, and set sizes kept."""

    ontologies: tuple[Ontology, ...] = ("BP", "MF", "CC")
    propagate: bool = True
    kegg: bool = True
    min_size: int = 5
    max_size: int = 2000


def find_go_sqlite(orgdb: Path) -> Path | None:
    """``GO.sqlite`` next to an extracted ``org.Hs.eg.sqlite`` (same site-library), if present."""
    lib = orgdb.resolve().parents[2] if len(orgdb.resolve().parents) > 2 else orgdb.parent
    cand = lib / "GO.db" / "extdata" / "GO.sqlite"
    return cand if cand.is_file() else None


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _check_orgdb(con: sqlite3.Connection, path: Path) -> None:
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    need = {"genes", "gene_info", "go_bp"}
    if not need <= tables:
        msg = f"{path} is not an org.*.eg.db SQLite database (tables {sorted(need - tables)} missing)"
        raise InputError(msg)


def orgdb_genesets(
    orgdb: str | Path, *, go_sqlite: str | Path | None = None, spec: OrgDbSpec | None = None
) -> list[GeneSet]:
    """Read GO (and KEGG) gene sets from an ``org.Hs.eg.sqlite`` file.

    Parameters
    ----------
    orgdb
        The org.Hs.eg.db SQLite file.
    go_sqlite
        GO.db's ``GO.sqlite`` for term names (default: found next to ``orgdb`` when extracted
        from the Debian packages; names are left out otherwise).
    spec
        Ontologies, propagation, KEGG, sizes.

    Returns
    -------
    list of GeneSet
        Sorted by name; sets outside ``[min_size, max_size]`` genes are dropped.

    Raises
    ------
    InputError
        Missing or wrong database file.
    """
    spec = spec or OrgDbSpec()
    path = Path(orgdb)
    if not path.is_file():
        msg = (
            f"{path} does not exist; get it with `apt-get download r-bioc-org.hs.eg.db && dpkg -x "
            f"r-bioc-org.hs.eg.db_*.deb DIR` → DIR/{ORGDB_DEBS['r-bioc-org.hs.eg.db']}"
        )
        raise InputError(msg)
    bad = sorted(set(spec.ontologies) - {"BP", "MF", "CC"})
    if bad:
        msg = f"unknown GO ontology {bad}; use BP, MF, CC"
        raise InputError(msg)
    names: dict[str, str] = {}
    go_path = Path(go_sqlite) if go_sqlite else find_go_sqlite(path)
    if go_path is not None:
        if not go_path.is_file():
            msg = f"GO.db file {go_path} does not exist"
            raise InputError(msg)
        with _connect(go_path) as gcon:
            names = dict(gcon.execute("SELECT go_id, term FROM go_term").fetchall())
    frames = []
    bar = progress("genesets from-orgdb", len(spec.ontologies) + int(spec.kegg) + 1, unit="steps")
    with bar, _connect(path) as con:
        try:
            _check_orgdb(con, path)
        except sqlite3.DatabaseError as exc:
            msg = f"{path} is not a SQLite database: {exc}"
            raise InputError(msg) from exc
        for ont in spec.ontologies:
            bar.set_stage(f"GO {ont}")
            table = f"go_{ont.lower()}{'_all' if spec.propagate else ''}"
            df = pd.read_sql_query(
                f"SELECT DISTINCT g.go_id AS term, i.symbol FROM {table} g JOIN gene_info i USING (_id)", con
            )
            frames.append(df.assign(kind=ont))
            bar.update()
        if spec.kegg:
            bar.set_stage("KEGG")
            df = pd.read_sql_query(
                "SELECT DISTINCT 'KEGG:hsa' || k.path_id AS term, i.symbol FROM kegg k JOIN gene_info i USING (_id)",
                con,
            )
            frames.append(df.assign(kind="KEGG"))
            bar.update()
        bar.set_stage("grouping genes by term")
        allrows = pd.concat(frames, ignore_index=True)
        allrows["symbol"] = allrows["symbol"].str.upper()
        grouped = allrows.groupby(["term", "kind"], sort=True)["symbol"].agg(frozenset)
        bar.update()
    out = []
    for (term, kind), genes in grouped.items():
        if not spec.min_size <= len(genes) <= spec.max_size:
            continue
        if kind == "KEGG":
            desc = f"KEGG pathway {term[5:]}"
        else:
            desc = names.get(term, f"GO {kind}")
        out.append(GeneSet(str(term), desc, genes))
    return out


def write_orgdb_gmt(
    orgdb: str | Path, out: str | Path, *, go_sqlite: str | Path | None = None, spec: OrgDbSpec | None = None
) -> int:
    """Build the GMT file ``out`` from ``orgdb`` (see :func:`orgdb_genesets`); returns the number of sets."""
    return write_gmt(orgdb_genesets(orgdb, go_sqlite=go_sqlite, spec=spec), out)


def fetch_orgdb_debs(dest: str | Path, packages: Sequence[str] = tuple(ORGDB_DEBS)) -> dict[str, Path]:
    """Download the Debian packages with ``apt-get download`` and extract them with ``dpkg -x``.

    Parameters
    ----------
    dest
        Folder; the packages are extracted under ``dest/root``. Files already there are reused.
    packages
        Debian package names (default both of :data:`ORGDB_DEBS`).

    Returns
    -------
    dict
        ``{package: SQLite path}``.

    Raises
    ------
    InputError
        When apt-get/dpkg are missing or a download fails (offline, no package lists).
    """
    import shutil
    import subprocess

    dest = Path(dest)
    root = dest / "root"
    out = {p: root / ORGDB_DEBS[p] for p in packages}
    todo = [p for p, f in out.items() if not f.is_file()]
    if not todo:
        return out
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        msg = "apt-get and dpkg are needed to fetch the org.Hs.eg.db / GO.db Debian packages"
        raise InputError(msg)
    dest.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["apt-get", "download", *todo], cwd=dest, capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        msg = f"apt-get download {' '.join(todo)} failed: {res.stderr.strip().splitlines()[-1:]} (run apt-get update?)"
        raise InputError(msg)
    for p in todo:
        debs = sorted(dest.glob(f"{p}_*.deb"))
        if not debs:
            msg = f"apt-get download left no {p}_*.deb in {dest}"
            raise InputError(msg)
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(root)], check=True, capture_output=True)
        debs[-1].unlink()
    return out

"""The demo: simulate → ingest → embed ``pca`` → evaluate pooled and cross-data → summary.

Runs into a fresh store (a previous demo store at the same path is replaced; any other
existing store is refused, never overwritten).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import StoreError

__all__ = ["run_demo"]


def _fresh_store(path: Path) -> Store:
    if path.exists() and any(path.iterdir()):
        is_demo = False
        if (path / "catalog.duckdb").exists():
            meta = Store(path).query("SELECT value FROM meta WHERE key = 'demo'")
            is_demo = not meta.empty and meta["value"].iloc[0] == "true"
        if not is_demo:
            msg = f"{str(path)!r} exists and is not a demo store; the demo needs a fresh store: pass --store NEW_DIR"
            raise StoreError(msg)
        shutil.rmtree(path)
    st = Store.open(path, create=True)
    with st.connect() as con:
        con.execute("INSERT OR REPLACE INTO meta VALUES ('demo', 'true')")
    return st


def run_demo(
    store_path: str | Path,
    *,
    n_cells: int = 3000,
    seed: int = 0,
    heads: Sequence[str] = ("logreg", "mlp_paper", "mlp"),
    category: str = "tissue",
    echo: Callable[[str], None] = print,
    sample_effect: float = 0.08,
    cell_types: int = 0,
) -> pd.DataFrame:
    """Run the whole flow on a simulated collection.

    Parameters
    ----------
    store_path
        Store directory to create (a previous demo store there is replaced).
    n_cells, seed
        Size and seed of the simulated collection.
    heads
        Heads to evaluate on the ``pca`` embedding.
    category
        Category for pooled (10-fold, grouped by sample) and cross-data (leave-one-study-out).
    echo
        Progress printer.
    sample_effect
        Sd of the simulated per-sample effect (:func:`store.simulate.simulate_collection`; 0.5 makes
        cell-level splits visibly leak).
    cell_types
        Above 0: plant that many cell types in the simulation and annotate every dataset with the
        bundled markers after ingest (:func:`classify.analyze.celltypes.annotate_dataset`).

    Returns
    -------
    pandas.DataFrame
        :func:`classify.evaluate.summarise` of the runs made.

    Raises
    ------
    StoreError
        When ``store_path`` holds a store that is not a demo store.
    """
    from scdrugmap.classify.evaluate import evaluate, summarise
    from scdrugmap.embedder.runner import embed_datasets
    from scdrugmap.store.manifest import ingest_manifest
    from scdrugmap.store.simulate import simulate_collection

    t0 = time.perf_counter()
    st = _fresh_store(Path(store_path))
    manifest = simulate_collection(
        st.path / "demo_input", n_cells=n_cells, seed=seed, sample_effect=sample_effect, cell_types=cell_types
    )
    echo(f"[{time.perf_counter() - t0:5.1f}s] simulated collection: {manifest}")
    reports = ingest_manifest(st, manifest)
    echo(
        f"[{time.perf_counter() - t0:5.1f}s] ingested {len(reports)} datasets, {sum(r.n_cells for r in reports)} cells after QC"
    )
    if cell_types:
        from scdrugmap.classify.analyze.celltypes import annotate_dataset

        for r in reports:
            annotate_dataset(st, r.dataset_id)
        echo(f"[{time.perf_counter() - t0:5.1f}s] annotated cell types (markers) of {len(reports)} datasets")
    res = embed_datasets(st, "pca", progress=False)
    echo(f"[{time.perf_counter() - t0:5.1f}s] embedded pca (revision {res.revision}, {res.n_done} cells)")
    run_ids = []
    for protocol in ("pooled", "cross"):
        for head in heads:
            outs = evaluate(st, model="pca", head=head, protocol=protocol, category=category, seed=seed)
            run_ids += [o.run_id for o in outs]
            echo(
                f"[{time.perf_counter() - t0:5.1f}s] evaluated {head} {protocol} on {len(outs)} {category} values"
            )
    echo(f'store: {st.path} — try: scdrugmap --store {st.path} sql "SELECT * FROM metrics LIMIT 5"')
    return summarise(st, run_ids)

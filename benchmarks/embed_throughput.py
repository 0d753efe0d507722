"""Embedding throughput (cells/s) of one model on simulated raw counts over its vocabulary genes.

Simulates ``--n-cells`` cells × ``--n-genes`` genes of negative-binomial counts (per-cell size
factor lognormal(0, 0.5), per-gene mean lognormal(-1, 1.5)); genes come from the model's
vocabulary (``embedder.vocabulary()`` where an adapter has it) or from ``--genes-from`` (an
h5ad whose var holds ``symbol``/``ensembl_id``, or ``gene_symbols``). Times ``tokenize`` alone
and the whole ``embed`` (tokenize + length-sorted batched forward + pooling) after a warm-up.

Usage::

    python benchmarks/embed_throughput.py --model geneformer \\
        --checkpoint ../shared/fixtures/models/geneformer/tiny --n-cells 1000 --batch-size 32 --device cpu
    python benchmarks/embed_throughput.py --model llm --n-cells 500   # tiny random LLM checkpoint
    python benchmarks/embed_throughput.py --model tgpt --checkpoint DIR --option pooling=real_token_mean
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _option(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def gene_universe(emb: Any, genes_from: Path | None) -> pd.DataFrame:
    """Candidate genes (columns ``symbol``, ``ensembl_id``) the simulated data draws from."""
    if genes_from is not None:
        import anndata as ad

        var = ad.read_h5ad(genes_from, backed="r").var
        symbol = (
            var["symbol"]
            if "symbol" in var
            else var.get("gene_symbols", pd.Series(var.index, index=var.index))
        )
        ens = var["ensembl_id"] if "ensembl_id" in var else pd.Series("", index=var.index)
        return pd.DataFrame(
            {"symbol": symbol.astype(str).to_numpy(), "ensembl_id": ens.astype(str).to_numpy()}
        )
    vocab = getattr(emb, "vocabulary", None)
    if vocab is None:
        msg = f"{emb.name} has no vocabulary(); pass --genes-from an h5ad with var symbol/ensembl_id"
        raise SystemExit(msg)
    return vocab()


def simulate(genes: pd.DataFrame, n_cells: int, n_genes: int, seed: int = 0):
    """Raw-count AnnData following the embedder contract (CSR float32, obs n_counts, x_kind counts)."""
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    pick = rng.choice(len(genes), size=min(n_genes, len(genes)), replace=False)
    var = genes.iloc[pick].reset_index(drop=True)
    var.index = [f"g{i}" for i in range(len(var))]
    mu = rng.lognormal(-1.0, 1.5, len(var)) * rng.lognormal(0.0, 0.5, (n_cells, 1))
    X = sp.csr_matrix(rng.negative_binomial(0.6, 0.6 / (0.6 + mu)).astype(np.float32))
    obs = pd.DataFrame(
        {
            "n_counts": np.asarray(X.sum(axis=1)).ravel(),
            "cell_uid": np.arange(n_cells, dtype=np.int64),
            "dataset_id": "bench",
            "sample_id": "s0",
        },
        index=[f"c{i}" for i in range(n_cells)],
    )
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.uns["scdrugmap"] = {"x_kind": "counts"}
    return adata


def main() -> None:
    from scdrugmap.embedder import load_embedder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--checkpoint", type=Path, help="checkpoint dir (llm: default = a tiny random one)")
    ap.add_argument("--n-cells", type=int, default=1000)
    ap.add_argument("--n-genes", type=int, default=2000, help="genes in the simulated matrix")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default=None)
    ap.add_argument("--genes-from", type=Path, default=None)
    ap.add_argument("--option", action="append", type=_option, default=[], help="extra load option key=value")
    ap.add_argument("--seed", type=int, default=0, help="simulation seed")
    args = ap.parse_args()

    checkpoint = args.checkpoint
    if checkpoint is None and args.model == "llm":
        from scdrugmap.embedder.llm import write_tiny_checkpoint

        universe = pd.DataFrame({"symbol": [f"GENE{i}" for i in range(args.n_genes)], "ensembl_id": ""})
        checkpoint = write_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny-llm", list(universe["symbol"]))
    options = {"batch_size": args.batch_size, **dict(args.option)}
    if args.device:
        options["device"] = args.device
    t = time.perf_counter()
    emb = load_embedder(args.model, checkpoint, **options)
    t_load = time.perf_counter() - t
    if args.model == "llm" and args.checkpoint is None:
        genes = universe
    else:
        genes = gene_universe(emb, args.genes_from)
    adata = simulate(genes, args.n_cells, args.n_genes, seed=args.seed)
    emb.embed(adata[: min(8, adata.n_obs)].copy())  # warm-up

    tokenize = getattr(emb, "tokenize", None)
    t_tok = float("nan")
    if tokenize is not None:
        t = time.perf_counter()
        try:
            tokenize(adata)
            t_tok = time.perf_counter() - t
        except NotImplementedError:
            pass
    t = time.perf_counter()
    out = emb.embed(adata)
    dt = time.perf_counter() - t
    device = getattr(emb, "device", args.device or "default")
    report = getattr(emb, "padding_report", None)
    saved = f"{100 * report.saved_fraction:.0f} %" if report is not None else "n/a"
    print(
        f"model={args.model} device={device} cells={adata.n_obs} genes={adata.n_vars} dim={out.shape[1]} "
        f"batch_size={args.batch_size} load={t_load:.1f}s tokenize={t_tok:.2f}s embed={dt:.2f}s "
        f"padding_saved={saved} nan_rows={int(np.isnan(out).any(axis=1).sum())}"
    )
    print(f"{args.model}: {adata.n_obs / dt:.1f} cells/s")


if __name__ == "__main__":
    main()

"""CellPLM adapter: each cell is one token; flow attention runs across the cells of a batch.

Follows ``OmicsML/CellPLM@b59ee7688b1bd2a745856a610248b46f15019a22``: ``pipeline/__init__.py``
(``load_pretrain``: ``<name>.config.json`` + ``<name>.best.ckpt['model_state_dict']``),
``pipeline/cell_embedding.py`` (``CellEmbeddingPipeline``), ``model/cellformer.py``
(``OmicsFormer``), ``embedder/omics.py``, ``layer/flowformer.py`` and ``latent/autoencoders.py``
(GMVAE). Forward: ``log1p(counts) @ gene_emb`` → Linear, ReLU, norm → pre-norm Flowformer
layers whose tokens are the *cells of the batch* → LayerNorm → GMVAE: ``y`` = hard
Gumbel-softmax sample of ``q(y|x)``, embedding = mean of ``q(z|x, y)``.

Because cells attend to each other, an embedding depends on its batch-mates. The batches
are a fixed rule, recorded in :meth:`CellPLMEmbedder.spec`: cells are grouped by
``obs['sample_id']`` (the original groups by ``obs['batch']``), kept in input order, and each
group is cut into ``ceil(n / cell_batch_size)`` contiguous chunks of near-equal size (the
original cuts chunks of exactly ``batch_size`` and a remainder, which can leave a lone cell).
The default ``cell_batch_size`` is the config's ``max_batch_size`` (4,000 for the release: the
largest batch seen in pre-training). Cells without any expressed in-vocabulary gene are left
out of the batches and get NaN rows.

The Gumbel noise is seeded per cell: ``numpy`` ``SeedSequence([seed, cell_uid])`` (row number
when ``obs['cell_uid']`` is absent), so a run is reproducible; ``latent_y="argmax"`` uses the
most likely cluster instead (not the original). ``pooling="prelatent"`` returns the
deterministic encoder output (``enc_hid`` wide) instead of the GMVAE mean.

The model and the reading of its checkpoint directory are in :mod:`embedder._cellplm_model`
(``CellPLMModel`` is re-exported here).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scdrugmap.embedder._cellplm_model import (
    EXPECTED,
    IGNORED_PREFIXES,
    CellPLMModel,
    FlowAttention,
    FlowformerLayer,
    hard_gumbel,
    load_checkpoint,
)
from scdrugmap.embedder._checkpoint import require_dir
from scdrugmap.embedder._performer import require_counts
from scdrugmap.embedder._torch import PaddingReport, autocast_context, pick_device
from scdrugmap.embedder.base import Embedder, hash_files, register
from scdrugmap.embedder.vocab import Vocabulary, check_gene_matching
from scdrugmap.store.errors import InputError

__all__ = [
    "EXPECTED",
    "IGNORED_PREFIXES",
    "CellPLMEmbedder",
    "CellPLMModel",
    "CellPLMTokens",
    "FlowAttention",
    "FlowformerLayer",
    "hard_gumbel",
]

log = logging.getLogger(__name__)
POOLINGS = ("latent", "prelatent")


@dataclass
class CellPLMTokens:
    """Counts of the in-vocabulary genes and the attention batches.

    Attributes
    ----------
    counts
        float32 CSR ``(n, g)`` raw counts of the kept genes (dataset column order).
    gene_index
        int64 ``(g,)`` index of each kept gene in the model's ``gene_list``.
    batches
        Row indices of each attention batch (usable cells only).
    uids
        int64 ``(n,)`` per-cell Gumbel seeds (``obs['cell_uid']`` or the row number).
    """

    counts: sp.csr_matrix
    gene_index: np.ndarray
    batches: list[np.ndarray]
    uids: np.ndarray

    def __len__(self) -> int:
        return self.counts.shape[0]


@register
class CellPLMEmbedder(Embedder):
    """CellPLM (OmicsFormer, ``20230926_85M``) with a deterministic cell-batching rule.

    Load with :meth:`load`; the checkpoint directory holds ``<name>.config.json`` and
    ``<name>.best.ckpt``. Raw counts in; genes are matched on the file's Ensembl ids as the original
    reads ``var_names``, then renamed genes are recovered (``gene_matching``, :mod:`embedder.vocab`).
    """

    name: ClassVar[str] = "cellplm"
    input_kind: ClassVar[Literal["counts", "any"]] = "counts"
    lora_targets: ClassVar[tuple[str, ...]] = ("query_projection", "key_projection", "value_projection")
    #: a cell's embedding depends on the other cells passed to the same ``embed`` call
    attends_across_cells: ClassVar[bool] = True

    def __init__(self, *, model: CellPLMModel, config: dict, files: list[Path], options: dict):
        self.model, self.config, self.files, self.options = model, config, files, options
        self.device = options["device"]
        self.batch_size = options["batch_size"]
        self.vocab = Vocabulary(list(config["gene_list"]), kind="ensembl")
        self.gene_matching = str(options.get("gene_matching", "best"))
        self.padding_report = PaddingReport()  # one token per cell: nothing is ever padded

    @classmethod
    def load(
        cls,
        checkpoint: str | Path | None = None,
        *,
        device: str | None = None,
        batch_size: int = 32,
        precision: Literal["fp32", "bf16", "fp16"] = "fp32",
        pooling: Literal["latent", "prelatent"] = "latent",
        seed: int = 0,
        cell_batch_size: int | None = None,
        latent_y: Literal["gumbel", "argmax"] = "gumbel",
        prefix: str | None = None,
        gene_matching: Literal["best", "original"] = "best",
        **unknown: Any,
    ) -> CellPLMEmbedder:
        """Read a CellPLM checkpoint directory.

        ``batch_size`` is accepted for uniformity but unused: a forward pass is one attention
        batch of ``cell_batch_size`` cells. ``prefix`` picks ``<prefix>.config.json`` when the
        directory holds several.

        Raises
        ------
        CheckpointError
            Missing/ambiguous files, unsupported config, mismatching weights.
        InputError
            Unknown or bad options.
        """
        bad = sorted(unknown)
        if pooling not in POOLINGS:
            bad.append(f"pooling={pooling!r} (choose {', '.join(POOLINGS)})")
        if latent_y not in ("gumbel", "argmax"):
            bad.append(f"latent_y={latent_y!r} (choose gumbel, argmax)")
        if precision not in ("fp32", "bf16", "fp16"):
            bad.append(f"precision={precision!r}")
        if cell_batch_size is not None and (not isinstance(cell_batch_size, int) or cell_batch_size < 1):
            bad.append(f"cell_batch_size={cell_batch_size!r} (a positive integer)")
        if bad:
            msg = f"bad or unknown cellplm option(s): {', '.join(bad)}"
            raise InputError(msg)
        check_gene_matching(cls.name, gene_matching)
        root = require_dir(checkpoint, model=cls.name, expected=EXPECTED)
        model, config, files = load_checkpoint(root, prefix)
        dev = pick_device(device)
        model.to(dev).eval()
        options = {
            "device": dev,
            "batch_size": batch_size,
            "precision": precision,
            "pooling": pooling,
            "seed": int(seed),
            "cell_batch_size": int(cell_batch_size or config.get("max_batch_size", 4000)),
            "latent_y": latent_y,
            "gene_matching": gene_matching,
        }
        return cls(model=model, config=config, files=files, options=options)

    @property
    def dim(self) -> int:
        key = "post_latent_dim" if self.options["pooling"] == "latent" else "enc_hid"
        return int(self.config[key])

    def spec(self) -> dict[str, Any]:
        arch = {
            k: self.config.get(k)
            for k in ("enc_hid", "enc_layers", "post_latent_dim", "num_clusters", "norm")
        }
        return {
            "files": hash_files(self.files),
            "config": arch
            | {"enc_head": int(self.config.get("enc_head", 8)), "n_genes": len(self.config["gene_list"])},
            "tokenizer": {"gene_key": "ensembl_id", "input": "log1p(raw counts) @ gene embedding"},
            "gene_matching": self.gene_matching,
            "cell_batching": {
                "group_by": "obs['sample_id'] (whole input when absent), groups in order of first appearance",
                "order": "input order within a group; cells without expressed in-vocabulary genes excluded",
                "split": "ceil(n / cell_batch_size) contiguous chunks of near-equal size",
                "cell_batch_size": self.options["cell_batch_size"],
            },
            "latent_y": self.options["latent_y"],
            "gumbel_noise": "float32 uniform from numpy SeedSequence([seed, cell_uid or row])",
            "pooling": self.options["pooling"],
            "precision": self.options["precision"],
            "seed": self.options["seed"],
        }

    def vocabulary(self) -> pd.DataFrame:
        """The genes the model knows: columns ``symbol`` and ``ensembl_id`` (one row per gene)."""
        return pd.DataFrame({"symbol": "", "ensembl_id": list(self.config["gene_list"])})

    def torch_module(self) -> torch.nn.Module:
        """The :class:`CellPLMModel` (LoRA targets: the flow-attention q/k/v projections)."""
        return self.model

    def tokenize(self, adata) -> CellPLMTokens:
        """Select in-vocabulary genes and form the attention batches (see the module docstring)."""
        require_counts(adata, self.name)
        index = self.match_genes(adata.var).index  # the file's Ensembl ids, then renamed genes
        keep = np.flatnonzero(index >= 0)
        counts = sp.csr_matrix(adata.X, dtype=np.float32)[:, keep]
        counts.eliminate_zeros()
        gene_index = index[keep]
        usable = np.diff(counts.indptr) > 0
        if not usable.all():
            log.warning(
                "cellplm: %d cell(s) express no in-vocabulary gene; their rows are NaN", int((~usable).sum())
            )
        groups = (
            adata.obs["sample_id"].astype(str).to_numpy()
            if "sample_id" in adata.obs
            else np.zeros(len(usable))
        )
        size = self.options["cell_batch_size"]
        batches = []
        for g in dict.fromkeys(groups):
            rows = np.flatnonzero((groups == g) & usable)
            if len(rows):
                batches.extend(np.array_split(rows, math.ceil(len(rows) / size)))
        uids = adata.obs["cell_uid"].to_numpy(np.int64) if "cell_uid" in adata.obs else np.arange(len(usable))
        return CellPLMTokens(counts, gene_index.astype(np.int64), batches, uids)

    def _batch_counts(self, tokens: CellPLMTokens, rows: np.ndarray) -> torch.Tensor:
        sub = tokens.counts[rows].tocoo()
        indices = torch.from_numpy(np.vstack([sub.row, sub.col]).astype(np.int64))
        return torch.sparse_coo_tensor(
            indices, torch.from_numpy(sub.data), size=sub.shape, check_invariants=True
        ).to(self.device)

    def _noise(self, uids: np.ndarray) -> torch.Tensor:
        k, seed = int(self.config["num_clusters"]), self.options["seed"]
        rows = [np.random.default_rng([seed, int(u) % 2**63]).random(k, dtype=np.float32) for u in uids]
        return torch.from_numpy(np.stack(rows)).to(self.device)

    def embed_batch_tensor(
        self, tokens: CellPLMTokens, batch: int, categorical_y: torch.Tensor | None = None
    ) -> dict:
        """Run one attention batch with gradients enabled (for LoRA fine-tuning).

        Returns
        -------
        dict
            ``prelatent (m, enc_hid)``, ``logits (m, K)``, ``y (m, K)``, ``latent (m, post_latent_dim)``
            for the cells ``tokens.batches[batch]``; ``categorical_y`` overrides the sampled ``y``.
        """
        rows = tokens.batches[batch]
        gene_index = torch.from_numpy(tokens.gene_index).to(self.device)
        h = self.model.encode(self._batch_counts(tokens, rows), gene_index)
        logits = self.model.cluster_logits(h)
        if categorical_y is not None:
            y = categorical_y.to(h.device, h.dtype)
        elif self.options["latent_y"] == "argmax":
            y = torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(h.dtype)
        else:
            y = hard_gumbel(logits.float(), self._noise(tokens.uids[rows])).to(h.dtype)
        return {"prelatent": h, "logits": logits, "y": y, "latent": self.model.latent_mean(h, y)}

    def embed_tensor(self, tokens: CellPLMTokens) -> torch.Tensor:
        """Differentiable pooled embeddings ``(n_cells, dim)`` in input order (all attention batches).

        Cells without any usable gene are NaN rows (as in :meth:`forward`).
        """
        parts, rows_all = [], []
        for b, rows in enumerate(tokens.batches):
            parts.append(self.embed_batch_tensor(tokens, b)[self.options["pooling"]].float())
            rows_all.append(rows)
        dim = parts[0].shape[1] if parts else int(self.dim)
        out = torch.full((len(tokens), dim), float("nan"), device=self.device)
        if parts:
            idx = torch.from_numpy(np.concatenate(rows_all)).to(self.device)
            out = out.index_put((idx,), torch.cat(parts))
        return out

    def forward(
        self, tokens: CellPLMTokens, *, categorical_y: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """All attention batches (no gradients) → dict of CPU float32 tensors, rows in input order.

        ``categorical_y`` ``(n, K)`` replaces the Gumbel draw (test hook for the original's draw).
        Unusable cells are NaN.

        Raises
        ------
        InputError
            On CUDA out-of-memory: the batch composition is part of the spec, so it is not
            shrunk silently; lower ``cell_batch_size``.
        """
        n, k = len(tokens), int(self.config["num_clusters"])
        widths = {"prelatent": int(self.config["enc_hid"]), "logits": k, "y": k}
        widths["latent"] = int(self.config["post_latent_dim"])
        out = {key: torch.full((n, w), float("nan")) for key, w in widths.items()}
        for b, rows in enumerate(tokens.batches):
            y = None if categorical_y is None else categorical_y[torch.from_numpy(rows)]
            try:
                with torch.no_grad(), autocast_context(self.device, self.options["precision"]):
                    res = self.embed_batch_tensor(tokens, b, y)
            except torch.OutOfMemoryError as exc:
                msg = f"cellplm: out of GPU memory on a batch of {len(rows)} cells; load with a smaller cell_batch_size"
                raise InputError(msg) from exc
            idx = torch.from_numpy(rows)
            for key in out:
                out[key][idx] = res[key].float().cpu()
        return out

    def pool(self, hidden: dict[str, torch.Tensor], tokens: CellPLMTokens) -> np.ndarray:
        """The GMVAE mean (``pooling="latent"``) or the pre-latent state, float32 ``(n, dim)``."""
        return hidden[self.options["pooling"]].numpy().astype(np.float32, copy=False)

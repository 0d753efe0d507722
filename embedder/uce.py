"""UCE adapter (Universal Cell Embeddings; the released ``model_files/`` layout).

Follows ``snap-stanford/UCE@8ead6e07af0c80f75653598138bb704e865b45c8``: ``evaluate.py``
(``AnndataProcessor``, ``get_ESM2_embeddings``, ``run_eval``), ``eval_data.py``
(``sample_cell_sentences``), ``data_proc/data_utils.py`` (``get_species_to_pe``,
``get_spec_chrom_csv``, ``adata_path_to_prot_chrom_starts``, ``process_raw_anndata``) and
``model.py`` (``TransformerModel``).

Checkpoint directory (``model_files/``)::

    4layer_model.torch (or 33l_8ep_1024t_1280.torch, or another single *.torch model)
    all_tokens.torch                  token table: pad, chrom-left, chrom-right, CLS, genes, …
    species_chrom.csv                 species, gene_symbol, chromosome, start
    species_offsets.pkl               {species: first token row of its genes}
    protein_embeddings/<Species>.gene_symbol_to_embedding_ESM2.pt

Per cell: genes with a protein embedding and a chromosome position (``var["symbol"]``, case
insensitive); counts truncated to integers; 1,024 genes drawn with replacement with
probability ∝ log1p(count); grouped by chromosome (chromosome order shuffled), sorted by
genomic start inside each; sentence = ``[CLS] ([chrom] genes… [chrom-right])*``. Model:
token table → L2-normalise → Linear/GELU/LayerNorm × √d_model → + sinusoidal positions →
post-norm transformer → decoder MLP; cell embedding = decoder output at CLS, L2-normalised.

Deviations: UCE passes its padding mask as a float tensor (``1 - mask``) that PyTorch
*adds* to the logits, so padded keys are attended and a cell's embedding depends on its
batch-mates; a boolean mask here gives the original's batch-size-1 result in any batch.
UCE samples from the unseeded global numpy RNG, one stream over the dataset:
``sampling="per_cell"`` (default) seeds each cell from ``(seed, its genes and counts)``,
``"stream"`` reproduces the original (``np.random.seed(seed)`` before the first cell).
``min_cells`` (the original's dataset-level ``filter_genes(min_cells=10)``) defaults to 0 so
tokens do not depend on other cells; no cell is dropped (the original drops < 25 genes).
Genes without a chromosome position are out of vocabulary (the original crashes on them).

The model (``UCEModel``, ``build_module``) is in :mod:`embedder._uce_model` and re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from scdrugmap.embedder._attention import (
    MHAEmbedder,
    RaggedTokens,
    cell_seed,
    check_int,
    counts_csr,
    parse_options,
)
from scdrugmap.embedder._checkpoint import (
    load_state_dict,
    load_strict,
    require_dir,
    require_files,
    safe_unpickle,
)
from scdrugmap.embedder._uce_model import UCEModel, build_module
from scdrugmap.embedder.base import register
from scdrugmap.embedder.vocab import Vocabulary
from scdrugmap.store.errors import CheckpointError, InputError

__all__ = ["UCEEmbedder", "UCEModel", "build_module"]

SPECIES_FILES = {
    "human": "Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt",
    "mouse": "Mus_musculus.GRCm39.gene_symbol_to_embedding_ESM2.pt",
    "frog": "Xenopus_tropicalis.Xenopus_tropicalis_v9.1.gene_symbol_to_embedding_ESM2.pt",
    "zebrafish": "Danio_rerio.GRCz11.gene_symbol_to_embedding_ESM2.pt",
    "mouse_lemur": "Microcebus_murinus.Mmur_3.0.gene_symbol_to_embedding_ESM2.pt",
    "pig": "Sus_scrofa.Sscrofa11.1.gene_symbol_to_embedding_ESM2.pt",
    "macaca_fascicularis": "Macaca_fascicularis.Macaca_fascicularis_6.0.gene_symbol_to_embedding_ESM2.pt",
    "macaca_mulatta": "Macaca_mulatta.Mmul_10.gene_symbol_to_embedding_ESM2.pt",
}
TOKENS, CHROM_CSV, OFFSETS, PE_DIR = (
    "all_tokens.torch",
    "species_chrom.csv",
    "species_offsets.pkl",
    "protein_embeddings",
)
EXPECTED = (
    "4layer_model.torch (or one other *.torch model)",
    TOKENS,
    CHROM_CSV,
    OFFSETS,
    f"{PE_DIR}/<species file>",
)
PAD, CHROM_RIGHT, CLS = 0, 2, 3  # eval_single_anndata defaults (chrom-left = 1 is unused by sentences)
RELEASE_TOKENS, RELEASE_CHROMS = 143574, 1895  # get_ESM2_embeddings appends seeded chromosome rows
NHEAD = 20  # run_eval hard-codes nhead = 20


def _all_zero(t: torch.Tensor) -> bool:
    return not bool(torch.empty(0, dtype=t.dtype).set_(t.untyped_storage()).any())


def _token_table(path: Path, state: dict[str, Any], token_dim: int) -> tuple[torch.Tensor, bool, str]:
    """``get_ESM2_embeddings`` then ``run_eval``'s precedence: the checkpoint's table wins when shapes agree."""
    table = load_state_dict(path)
    if not isinstance(table, torch.Tensor) or table.ndim != 2 or table.shape[1] != token_dim:
        msg = f"{path} must hold one (n_tokens, {token_dim}) tensor matching the model's token_dim"
        raise CheckpointError(msg)
    appended = table.shape[0] == RELEASE_TOKENS
    if appended:
        gen = torch.Generator().manual_seed(23)
        table = torch.vstack([table, torch.normal(0.0, 1.0, size=(RELEASE_CHROMS, token_dim), generator=gen)])
    ck = state.get("pe_embedding.weight")
    if ck is None:
        msg = "the UCE model file lacks pe_embedding.weight (run_eval saves it with the model)"
        raise CheckpointError(msg)
    if tuple(ck.shape) == tuple(table.shape):
        return ck, appended, "model file pe_embedding.weight"
    if _all_zero(ck):  # an empty placeholder table: the token file supplies it
        return table, appended, TOKENS
    msg = f"pe_embedding.weight {tuple(ck.shape)} in the model file does not match {TOKENS} {tuple(table.shape)}"
    raise CheckpointError(msg)


def _gene_table(directory: Path, species: str) -> tuple[dict[str, tuple[int, int, int]], np.dtype, int]:
    """Per upper-case symbol: (token id, chromosome code, start); codes' dtype; number of codes."""
    offsets = safe_unpickle(directory / OFFSETS)
    if not isinstance(offsets, dict) or species not in offsets:
        msg = f"{directory / OFFSETS} has no token offset for species {species!r}"
        raise CheckpointError(msg)
    pe = load_state_dict(directory / PE_DIR / SPECIES_FILES[species])
    if not isinstance(pe, Mapping):
        msg = f"{directory / PE_DIR / SPECIES_FILES[species]} must map gene symbols to protein embeddings"
        raise CheckpointError(msg)
    order: dict[str, int] = {}
    for k in pe:  # get_species_to_pe upper-cases keys; a symbol's row = its first position
        order.setdefault(str(k).upper(), len(order))
    try:
        df = pd.read_csv(directory / CHROM_CSV, dtype={"chromosome": str, "species": str, "gene_symbol": str})
        codes = pd.Categorical(df["species"] + "_" + df["chromosome"]).codes
        rows = df["species"].to_numpy() == species
        symbols, starts = df["gene_symbol"].to_numpy()[rows], df["start"].to_numpy(np.int64)[rows]
    except (OSError, ValueError, KeyError) as exc:
        msg = f"cannot read {directory / CHROM_CSV} (columns species, gene_symbol, chromosome, start): {exc}"
        raise CheckpointError(msg) from exc
    table: dict[str, tuple[int, int, int]] = {}
    for sym, code, start in zip(symbols, codes[rows], starts, strict=True):
        key = str(sym).upper()
        if key in order and key not in table:
            table[key] = (order[key] + int(offsets[species]), int(code), int(start))
    return table, codes.dtype, int(codes.max()) + 1 if len(codes) else 0


@register
class UCEEmbedder(MHAEmbedder):
    """UCE cell embeddings.

    Options (``load``): ``device``, ``batch_size`` (32), ``precision``, ``pooling``
    (``"cls"`` only: the normalised CLS output), ``seed`` (0), ``species`` ("human"),
    ``model_file`` (needed when the directory holds several ``*.torch`` models), ``nhead``
    (20 as ``run_eval``), ``sample_size`` (1024), ``min_cells`` (0; 10 = the original's gene
    filter), ``sampling`` (``"per_cell"`` or ``"stream"``), ``chrom_token_offset`` (derived).

    LoRA: :attr:`lora_targets` ``("out_proj",)`` plus :attr:`lora_target_parameters` ``("in_proj_weight",)``.
    """

    name = "uce"

    def __init__(self, module: UCEModel, files, options, genes: dict, code_dtype, offset: int, source: str):
        super().__init__(module, files, options)
        self.genes, self.code_dtype, self.chrom_offset, self.table_source = genes, code_dtype, offset, source
        self.seed, self.species = int(options["seed"]), str(options["species"])
        self.sample_size, self.min_cells = int(options["sample_size"]), int(options["min_cells"])
        self.sampling, self.nhead = str(options["sampling"]), int(options["nhead"])
        self.max_len = int(module.pos_encoder.pe.shape[0])
        self.vocab = Vocabulary(list(genes), kind="symbol", normalise=str.upper)
        self._rows = np.asarray(list(genes.values()), dtype=np.int64).reshape(-1, 3)
        self._dim = int(module.decoder[3].weight.shape[0])

    @classmethod
    def load(cls, checkpoint: str | Path | None = None, **options: Any) -> UCEEmbedder:
        """Read the model, token table, chromosome table, offsets and the species' protein embeddings.

        Raises
        ------
        CheckpointError
            Missing files (named), unreadable or mismatching weights/tables.
        InputError
            Unknown or bad options, or several model files without ``model_file``.
        """
        defaults = {"pooling": "cls", "seed": 0, "species": "human", "model_file": None, "nhead": NHEAD}
        defaults |= {"sample_size": 1024, "min_cells": 0, "sampling": "per_cell", "chrom_token_offset": None}
        choices = {"pooling": ("cls",), "sampling": ("per_cell", "stream"), "species": tuple(SPECIES_FILES)}
        opts = parse_options(cls.name, options, defaults, choices)
        for key, low in (
            ("seed", 0),
            ("nhead", 1),
            ("sample_size", 1),
            ("min_cells", 0),
            ("chrom_token_offset", 0),
        ):
            if key != "chrom_token_offset" or opts[key] is not None:
                check_int(cls.name, key, opts[key], minimum=low)
        directory = require_dir(checkpoint, model=cls.name, expected=EXPECTED)
        pe_file = f"{PE_DIR}/{SPECIES_FILES[opts['species']]}"
        require_files(directory, [TOKENS, CHROM_CSV, OFFSETS, pe_file], model=cls.name, expected=EXPECTED)
        if opts["model_file"]:
            require_files(directory, [opts["model_file"]], model=cls.name, expected=EXPECTED)
            model_path = directory / opts["model_file"]
        else:
            found = sorted(p for p in directory.glob("*.torch") if p.name != TOKENS)
            if len(found) != 1:
                names = ", ".join(p.name for p in found) or "none"
                msg = f"{str(directory)!r} holds {len(found)} UCE model files ({names}); expected one (pass model_file=NAME); expected: {', '.join(EXPECTED)}"
                raise (InputError if found else CheckpointError)(msg)
            model_path = found[0]
        state = load_state_dict(model_path)
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            msg = f"{model_path} does not hold a flat state dict (name → tensor) like 4layer_model.torch"
            raise CheckpointError(msg)
        state = dict(state)
        if "encoder.0.weight" not in state:
            msg = f"{model_path} is not a UCE model state dict (no encoder.0.weight)"
            raise CheckpointError(msg)
        token_dim = int(state["encoder.0.weight"].shape[1])
        table, appended, source = _token_table(directory / TOKENS, state, token_dim)
        state["pe_embedding.weight"] = table
        module = build_module(state, int(table.shape[0]), int(opts["nhead"]))
        load_strict(module, state, source=model_path)
        genes, code_dtype, n_codes = _gene_table(directory, opts["species"])
        offset = opts["chrom_token_offset"]
        if offset is None:
            offset = RELEASE_TOKENS if appended else int(table.shape[0]) - n_codes
        if not 0 <= offset <= table.shape[0] - n_codes or any(t >= offset for t, _, _ in genes.values()):
            msg = f"chromosome tokens at {offset}…{offset + n_codes - 1} do not fit the {table.shape[0]}-row token table after the gene rows"
            raise CheckpointError(msg)
        files = [model_path, *(directory / n for n in (TOKENS, CHROM_CSV, OFFSETS, pe_file))]
        return cls(module, files, opts, genes, code_dtype, int(offset), source)

    @property
    def dim(self) -> int:
        """``output_dim`` of the model (1280 for the release)."""
        return self._dim

    def _lookup(self, var: Any) -> np.ndarray:
        """``(n_genes, 3)`` token id, chromosome code and start per gene (-1 rows when unmatched).

        Genes with a protein embedding and a chromosome position, matched on the file's symbol
        case-insensitively (as ``get_species_to_pe``), then renamed genes (:mod:`embedder.vocab`).
        """
        index = self.match_genes(var).index
        return np.where((index >= 0)[:, None], self._rows[np.maximum(index, 0)], -1)

    def _vocab_symbols(self) -> list[str]:
        return list(self.genes)

    def _sentence(self, counts: np.ndarray, rs: np.random.RandomState, tok, chroms, starts) -> np.ndarray:
        """``sample_cell_sentences`` for one cell (same numpy calls, same order of RNG draws)."""
        w = torch.log1p(torch.from_numpy(counts))
        w = (w / torch.sum(w)).numpy()
        p = w / np.cumsum(w)[-1]  # = w / sum(w): float32, left to right
        choice = rs.choice(np.arange(len(p)), size=self.sample_size, p=p, replace=True)
        choice = choice[np.argsort(chroms[choice])]
        new_chrom, chosen_starts = chroms[choice], starts[choice]
        uq = np.unique(new_chrom)
        rs.shuffle(uq)
        parts = [np.array([CLS])]
        for c in uq:
            loc = np.where(new_chrom == c)[0]
            genes = tok[choice[loc[np.argsort(chosen_starts[loc])]]]
            parts += [np.array([int(c) + self.chrom_offset]), genes, np.array([CHROM_RIGHT])]
        return np.concatenate(parts).astype(np.int64)

    def tokenize(self, adata: AnnData) -> RaggedTokens:
        """Cell sentences (field ``ids``), see the module docstring.

        Raises
        ------
        InputError
            Negative values in ``adata.X``, no ``symbol`` column, or sentences longer than
            the position table (``sample_size`` too large).
        """
        info = self._lookup(adata.var)
        keep = info[:, 0] >= 0
        X = counts_csr(adata, self.name)[:, keep]
        info = info[keep]
        if self.min_cells > 0:
            cols = np.asarray((X > 0).sum(axis=0)).ravel() >= self.min_cells
            X, info = X[:, cols], info[cols]
        X.sort_indices()
        tok, chroms, starts = info[:, 0], info[:, 1].astype(self.code_dtype), info[:, 2]
        stream = np.random.RandomState(self.seed) if self.sampling == "stream" else None
        ids, n_genes = [], np.zeros(X.shape[0], dtype=np.int64)
        for i in range(X.shape[0]):
            cols, vals = X.indices[X.indptr[i] : X.indptr[i + 1]], X.data[X.indptr[i] : X.indptr[i + 1]]
            counts = np.zeros(X.shape[1], dtype=np.int64)
            counts[cols] = vals.astype(np.int64)  # the original's int64 memmap truncates
            nz = np.flatnonzero(counts)
            n_genes[i] = len(nz)
            if not len(nz):
                ids.append(np.array([CLS], dtype=np.int64))
                continue
            rs = (
                stream
                if stream is not None
                else np.random.RandomState(np.random.MT19937(cell_seed(self.seed, tok[nz], counts[nz])))
            )
            sentence = self._sentence(counts, rs, tok, chroms, starts)
            if len(sentence) > self.max_len:
                msg = f"UCE sentence of {len(sentence)} tokens exceeds the {self.max_len} positions; lower sample_size"
                raise InputError(msg)
            ids.append(sentence)
        return RaggedTokens({"ids": ids}, {"ids": PAD}, n_genes)

    def hidden_states(self, tokens: RaggedTokens) -> torch.Tensor:
        """Differentiable transformer output ``(n_cells, max_length, d_model)``."""
        p = tokens.padded()
        return self._module(self._tensor(p["ids"]), self._tensor(p["pad_mask"]))

    def pool_torch(self, hidden: torch.Tensor, tokens: RaggedTokens) -> torch.Tensor:
        """Decoder output at CLS (position 0), L2-normalised (``UCEModel.cell_embedding``)."""
        return self._module.cell_embedding(hidden).float()

    def _tokenizer_spec(self) -> dict[str, Any]:
        per_cell = "per cell: RandomState(MT19937(SeedSequence(seed, BLAKE2b(gene tokens, counts))))"
        keys = ("species", "sample_size", "min_cells", "sampling", "seed", "nhead")
        return {k: getattr(self, k) for k in keys} | {
            "gene_key": "symbol (upper-cased)",
            "rng": "one RandomState(seed) stream" if self.sampling == "stream" else per_cell,
            "chrom_token_offset": self.chrom_offset,
            "token_table": self.table_source,
            "counts": "truncated to int64",
        }

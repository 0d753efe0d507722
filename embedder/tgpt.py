"""tGPT adapter: genes ranked by expression → GPT-2 → mean of the last hidden state over gene tokens.

Follows ``deeplearningplus/tGPT`` @ 9714a988cded17284afbf977ce394700a05b19b2: ``README.md``
("Extract features": ``LineDataset`` regex, ``tokenizer(..., max_length=64, truncation=True,
padding=True)``, ``GPT2LMHeadModel(...).transformer``, mean of ``last_hidden_state[1:eos_idx]``)
and ``train.py`` (``GPT2Config``, ``max_length = 64``, ``gpt2tokenizer/``).

Checkpoint directory (the released Hugging Face layout of
``lixiangchun/transcriptome-gpt-1024-8-16-64``)::

    config.json                      GPT2LMHeadModel config
    pytorch_model.bin | model.safetensors
    tokenizer.json                   WordLevel over gene symbols, template "</b> $A </s>"
    tokenizer_config.json
    special_tokens_map.json
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import pandas as pd
from anndata import AnnData

from scdrugmap.embedder._checkpoint import require_dir, require_files
from scdrugmap.embedder._hf import (
    HFEmbedder,
    TokenizedCells,
    build_model,
    iter_expressed,
    load_tokenizer,
    load_weights,
    parse_options,
    positive_int,
    read_config,
    weight_files,
)
from scdrugmap.embedder.base import register
from scdrugmap.embedder.vocab import GENE_MATCHING, Vocabulary, check_gene_matching
from scdrugmap.store.errors import CheckpointError, InputError

__all__ = ["Pooling", "TGPTEmbedder", "normalise_symbol"]

log = logging.getLogger(__name__)

#: ``gene_mean``: mean over the gene tokens, excluding ``</b>`` and ``</s>`` (README);
#: ``real_token_mean``: mean over every real token incl. ``</b>``/``</s>`` (scDrugMap's pooling,
#: there without an attention mask).
Pooling = Literal["gene_mean", "real_token_mean"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EXPECTED = ("config.json", "pytorch_model.bin or model.safetensors", *TOKENIZER_FILES)
#: causal-mask buffers persisted by transformers 4.x saves (the 2022 upload)
LEGACY_KEYS = (r"transformer\.h\.\d+\.attn\.bias", r"transformer\.h\.\d+\.attn\.masked_bias")
_SYMBOL_RE = re.compile(r"\-|\.")


def normalise_symbol(symbol: str) -> str:
    """Gene symbol as tGPT's vocabulary spells it (``-`` and ``.`` → ``_``, README ``LineDataset``)."""
    return _SYMBOL_RE.sub("_", symbol)


@register
class TGPTEmbedder(HFEmbedder):
    """tGPT cell embeddings (``GPT2LMHeadModel`` from ``transformers``).

    Tokenisation: the cell's expressed genes (value > 0) whose normalised symbol is in the
    vocabulary, ordered by expression descending (ties: var order, ``kind="stable"``), then
    ``</b>`` + the first ``max_length - 2`` genes + ``</s>`` (what the README's tokenizer call
    produces for the ranked line). Out-of-vocabulary genes are dropped (the README would feed
    them as ``<unk>``).

    Embedding: ``model.transformer`` on right-padded batches with an attention mask; mean of
    ``last_hidden_state`` over gene tokens (``pooling="gene_mean"``) or all real tokens
    (``"real_token_mean"``).

    Load options: ``device``, ``batch_size`` (32), ``precision`` (``"fp32"``), ``pooling``
    (``"gene_mean"``), ``max_length`` (64 tokens incl. ``</b>``/``</s>``, as README/train.py).
    """

    name: ClassVar[str] = "tgpt"
    input_kind: ClassVar[Literal["counts", "any"]] = "any"
    lora_targets: ClassVar[tuple[str, ...]] = ("c_attn",)
    pooling_choices: ClassVar[tuple[str, ...]] = get_args(Pooling)

    def __init__(
        self, module: Any, files: Sequence[Path], options: Mapping[str, Any], device: Any, *, tokenizer: Any
    ) -> None:
        super().__init__(module, files, options, device)
        self.max_length = int(options["max_length"])
        self.tokenizer = tokenizer
        special = {
            tokenizer.pad_token_id,
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.unk_token_id,
        }
        self._vocab = {k: v for k, v in tokenizer.get_vocab().items() if v not in special}
        words = sorted(self._vocab, key=self._vocab.__getitem__)
        self.vocab = Vocabulary(words, kind="symbol", normalise=normalise_symbol)
        self._word_ids = np.array([self._vocab[w] for w in words], dtype=np.int64)
        self.gene_matching = check_gene_matching(self.name, options["gene_matching"])
        self.pad_id = int(tokenizer.pad_token_id)
        self.bos_id = int(tokenizer.bos_token_id)
        self.eos_id = int(tokenizer.eos_token_id)

    @classmethod
    def load(cls, checkpoint: str | Path | None = None, **options: Any) -> TGPTEmbedder:
        """Load a tGPT Hugging Face directory (see the module docstring for its layout).

        Raises
        ------
        CheckpointError
            Missing files, a non-GPT-2 config, a tokenizer without ``</b>``/``</s>``/``<pad>``
            or larger than the model's vocabulary, or weights that do not match.
        InputError
            Unknown or invalid options.
        """
        from transformers import GPT2Config, GPT2LMHeadModel

        opts = parse_options(
            cls.name,
            options,
            {"pooling": "gene_mean", "max_length": 64, "gene_matching": "best"},
            {"pooling": cls.pooling_choices, "gene_matching": GENE_MATCHING},
        )
        opts["max_length"] = positive_int(cls.name, "max_length", opts["max_length"], minimum=3)
        directory = require_dir(checkpoint, model=cls.name, expected=EXPECTED)
        require_files(directory, ("config.json", *TOKENIZER_FILES), model=cls.name, expected=EXPECTED)
        weights = weight_files(directory, model=cls.name, expected=EXPECTED)
        config = read_config(directory, GPT2Config.from_json_file, model=cls.name, model_types=("gpt2",))
        tokenizer = load_tokenizer(directory, model=cls.name)
        ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
        if None in ids or len(tokenizer.get_vocab()) > config.vocab_size:
            msg = (
                f"tokenizer in {directory} does not fit tGPT: it needs pad/bos/eos tokens (got {ids}) and at "
                f"most vocab_size={config.vocab_size} entries (got {len(tokenizer.get_vocab())})"
            )
            raise CheckpointError(msg)
        if opts["max_length"] > config.n_positions:
            msg = (
                f"option max_length={opts['max_length']} exceeds the model's n_positions={config.n_positions}"
            )
            raise InputError(msg)
        device = cls.resolve_device(opts["device"])
        module = build_model(GPT2LMHeadModel, config, device)
        load_weights(module, weights, legacy=LEGACY_KEYS)
        files = [directory / "config.json", *weights, *(directory / n for n in TOKENIZER_FILES)]
        return cls(module, files, opts, device, tokenizer=tokenizer)

    # -- vocabulary ---------------------------------------------------------------------
    def _token_column(self, var: Any) -> np.ndarray:
        """Token id per gene of ``var`` (-1 when not in the vocabulary; :mod:`embedder.vocab`)."""
        index = self.match_genes(var).index
        return np.where(index >= 0, self._word_ids[np.maximum(index, 0)], -1)

    def vocabulary(self) -> pd.DataFrame:
        """The model's genes: column ``symbol`` (vocabulary spelling, ``_`` for ``-``/``.``)."""
        words = sorted(self._vocab, key=self._vocab.__getitem__)
        return pd.DataFrame({"symbol": words, "ensembl_id": [""] * len(words)})

    # -- tokenisation -------------------------------------------------------------------
    def tokenize(self, adata: AnnData) -> TokenizedCells:
        """``</b>`` + top ``max_length - 2`` expressed in-vocabulary genes + ``</s>`` per cell.

        Returns
        -------
        TokenizedCells
            Token ids per cell; ``n_genes`` counts the genes kept after truncation.
        """
        if adata.uns.get("scdrugmap", {}).get("x_kind") == "scaled":
            log.warning("tgpt ranks genes by X, which is z-scored here; ranks follow the scaled values")
        token_col = self._token_column(adata.var)
        keep = token_col >= 0
        n_keep = self.max_length - 2
        head, tail = np.array([self.bos_id]), np.array([self.eos_id])
        ids: list[np.ndarray] = []
        n_genes = np.zeros(adata.n_obs, dtype=np.int64)
        for i, idx, val in iter_expressed(adata.X, keep):
            genes = token_col[idx[np.argsort(-val, kind="stable")]][:n_keep]
            ids.append(np.concatenate([head, genes, tail]))
            n_genes[i] = len(genes)
        return TokenizedCells(ids, n_genes, self.pad_id)

    def _pool_mask(self, tokens: TokenizedCells, attention_mask: np.ndarray) -> np.ndarray:
        if self.pooling == "real_token_mean":
            return attention_mask
        mask = attention_mask.copy()
        mask[:, 0] = 0
        mask[np.arange(len(mask)), tokens.lengths - 1] = 0
        return mask

    def _tokenizer_spec(self) -> dict[str, Any]:
        return {
            "scheme": "expression_rank",
            "gene_key": "symbol",
            "symbol_substitution": "[-.] -> _",
            "tie_break": "var_order",
            "max_length": self.max_length,
            "special_tokens": ["</b>", "</s>"],
        }

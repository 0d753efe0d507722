"""LLM adapter: a "cell sentence" of the top-K expressed gene symbols → causal LM → masked mean.

scDrugMap (``QSong-github/scDrugMap``, ``code/Llama/get_embeds.py`` @ 41a03c8908e1f164df7b0ec42b5190c2ad1c0940) embeds cells
with LLaMA-3 by averaging ``hidden_states[-1]`` over the tokens of a text built from the
cell's genes. Here the text is the cell's expressed gene symbols ordered by expression
(descending, ties by var order), the first ``top_k`` of them joined by single spaces, and
tokenised by the checkpoint's own tokenizer (special tokens as it adds them, truncated to
``max_length`` tokens). The embedding is the mean of the last hidden state over real tokens.

Checkpoint directory (any Hugging Face causal LM, e.g. ``meta-llama/Meta-Llama-3-8B``)::

    config.json
    model.safetensors | model.safetensors.index.json + shards | pytorch_model.bin[.index.json]
    tokenizer.json | tokenizer.model
    tokenizer_config.json (+ special_tokens_map.json)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import numpy as np
from anndata import AnnData

from scdrugmap.embedder._checkpoint import find_one, require_dir, require_files
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
    var_column,
    weight_files,
)
from scdrugmap.embedder.base import register
from scdrugmap.store.errors import CheckpointError, InputError

__all__ = ["LLMEmbedder", "Pooling", "write_tiny_checkpoint"]

log = logging.getLogger(__name__)

#: ``mean``: mean of the last hidden state over real tokens (scDrugMap); ``last_token``: the last
#: real token's state (the usual causal-LM sentence embedding).
Pooling = Literal["mean", "last_token"]

EXPECTED = (
    "config.json",
    "model.safetensors[.index.json] or pytorch_model.bin[.index.json]",
    "tokenizer.json or tokenizer.model",
    "tokenizer_config.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
#: rotary ``inv_freq`` buffers that transformers < 4.31 saved with LLaMA weights (ignored on load since)
LEGACY_KEYS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
OPTIONAL_FILES = ("special_tokens_map.json",)


def _read_auto_config(path: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True)


@register
class LLMEmbedder(HFEmbedder):
    """Causal language-model cell embeddings (``LlamaForCausalLM`` or any ``*ForCausalLM``).

    Load options: ``device``, ``batch_size`` (32), ``precision`` (``"fp32"``; ``"bf16"`` is the
    sensible choice for 8B models on GPU), ``pooling`` (``"mean"``), ``top_k`` (1024 genes),
    ``max_length`` (tokens; default the model's ``max_position_embeddings``).
    """

    name: ClassVar[str] = "llm"
    input_kind: ClassVar[Literal["counts", "any"]] = "any"
    lora_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj")
    pooling_choices: ClassVar[tuple[str, ...]] = get_args(Pooling)

    def __init__(
        self, module: Any, files: Sequence[Path], options: Mapping[str, Any], device: Any, *, tokenizer: Any
    ) -> None:
        super().__init__(module, files, options, device)
        self.tokenizer = tokenizer
        self.top_k = int(options["top_k"])
        self.max_length = int(options["max_length"])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0  # padded positions are masked out

    @classmethod
    def load(cls, checkpoint: str | Path | None = None, **options: Any) -> LLMEmbedder:
        """Load a Hugging Face causal-LM directory (see the module docstring for its layout).

        Raises
        ------
        CheckpointError
            Missing files, a config that is not a causal LM, an unloadable tokenizer, or weights
            that do not match the config.
        InputError
            Unknown or invalid options.
        """
        import transformers

        opts = parse_options(
            cls.name,
            options,
            {"pooling": "mean", "top_k": 1024, "max_length": None},
            {"pooling": cls.pooling_choices},
        )
        opts["top_k"] = positive_int(cls.name, "top_k", opts["top_k"])
        directory = require_dir(checkpoint, model=cls.name, expected=EXPECTED)
        require_files(directory, ("config.json", "tokenizer_config.json"), model=cls.name, expected=EXPECTED)
        tok_file = find_one(directory, TOKENIZER_FILES, model=cls.name, expected=EXPECTED)
        weights = weight_files(directory, model=cls.name, expected=EXPECTED)
        config = read_config(directory, _read_auto_config, model=cls.name, model_types=())
        try:
            model_cls = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        except KeyError:
            msg = f"{directory / 'config.json'} (model_type {config.model_type!r}) is not a causal language model"
            raise CheckpointError(msg) from None
        tokenizer = load_tokenizer(directory, model=cls.name)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        max_length = opts["max_length"] if opts["max_length"] is not None else limit
        opts["max_length"] = positive_int(cls.name, "max_length", max_length)
        if limit and opts["max_length"] > limit:
            msg = f"option max_length={opts['max_length']} exceeds the model's {limit} positions"
            raise InputError(msg)
        device = cls.resolve_device(opts["device"])
        module = build_model(model_cls, config, device)
        load_weights(module, weights, legacy=LEGACY_KEYS)
        extra = [directory / n for n in OPTIONAL_FILES if (directory / n).is_file()]
        files = [directory / "config.json", *weights, tok_file, directory / "tokenizer_config.json", *extra]
        return cls(module, files, opts, device, tokenizer=tokenizer)

    def in_vocabulary(self, var: Any) -> np.ndarray:
        """bool ``(n_genes,)``: every gene with a symbol (the tokenizer spells any text)."""
        return var_column(var, "symbol") != ""

    def sentences(self, adata: AnnData) -> tuple[list[str], np.ndarray]:
        """Cell sentences: top ``top_k`` expressed symbols by expression, space-joined.

        Returns
        -------
        tuple
            ``(texts, n_genes)``: one str per cell and int64 ``(n_cells,)`` genes in each.
        """
        if adata.uns.get("scdrugmap", {}).get("x_kind") == "scaled":
            log.warning("llm ranks genes by X, which is z-scored here; ranks follow the scaled values")
        symbols = var_column(adata.var, "symbol")
        texts: list[str] = []
        n_genes = np.zeros(adata.n_obs, dtype=np.int64)
        for i, idx, val in iter_expressed(adata.X, symbols != ""):
            top = idx[np.argsort(-val, kind="stable")][: self.top_k]
            texts.append(" ".join(symbols[top]))
            n_genes[i] = len(top)
        return texts, n_genes

    def tokenize(self, adata: AnnData) -> TokenizedCells:
        """Tokenise each cell sentence with the checkpoint's tokenizer (≤ ``max_length`` tokens)."""
        texts, n_genes = self.sentences(adata)
        enc = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=self.max_length)
        ids = [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]]
        return TokenizedCells(ids, n_genes, self.pad_id)

    def _pool_mask(self, tokens: TokenizedCells, attention_mask: np.ndarray) -> np.ndarray:
        if self.pooling == "mean":
            return attention_mask
        mask = np.zeros_like(attention_mask)
        mask[np.arange(len(mask)), np.maximum(tokens.lengths - 1, 0)] = 1
        return mask

    def _tokenizer_spec(self) -> dict[str, Any]:
        return {
            "scheme": "cell_sentence",
            "gene_key": "symbol",
            "order": "expression_desc_stable",
            "top_k": self.top_k,
            "separator": " ",
            "max_length": self.max_length,
            "add_special_tokens": True,
        }


def write_tiny_checkpoint(
    directory: str | Path,
    symbols: Sequence[str],
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a small random ``LlamaForCausalLM`` + word-level tokenizer over ``symbols`` (offline).

    For tests, benchmarks and smoke runs where no released LLM weights are available; the
    layout is the one :meth:`LLMEmbedder.load` reads (``save_pretrained`` of model and
    tokenizer: ``config.json``, ``model.safetensors``, ``tokenizer.json``,
    ``tokenizer_config.json``).

    Parameters
    ----------
    directory
        Output directory (created).
    symbols
        Vocabulary words (gene symbols); ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` come first.
    hidden_size, num_layers
        Model size (4 attention heads, 2 key/value heads).
    seed
        ``torch.manual_seed`` before initialisation.

    Returns
    -------
    pathlib.Path
        ``directory``.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*specials, *symbols]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory

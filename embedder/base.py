"""The interface every embedder implements, and the registry of embedders by name.

An embedder turns an AnnData batch of cells into a float32 array ``(n_cells, dim)``.
Foundation-model adapters follow three steps, ``tokenize`` → ``forward`` → ``pool``;
baselines (``pca``, ``hvg``) may implement :meth:`Embedder.embed` directly.

The AnnData contract (what the runner passes to :meth:`Embedder.embed`):

- ``X``: the dataset's expression as ingested and QC-filtered, ``(n_cells, n_genes)``,
  float32, CSR or dense. Raw counts when ``adata.uns["scdrugmap"]["x_kind"] == "counts"``;
  otherwise log-normalised (``"lognorm"``) or scaled/z-scored (``"scaled"``).
- ``var``: index = the dataset's own gene identifiers; columns ``file_symbol`` and
  ``file_ensembl_id`` (the file's own identifiers, verbatim), ``symbol`` (HGNC approved symbol;
  the file's name when HGNC cannot place the gene) and ``ensembl_id`` (Ensembl gene id without
  version). Adapters match genes through :class:`embedder.vocab.Vocabulary`, which reads the
  file's identifiers (or, for any other AnnData, var_names and the usual id columns).
- ``obs``: ``n_counts`` (total counts per cell over all genes of the file, counts input
  only), ``cell_uid`` (int64), ``dataset_id``, ``sample_id``.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from anndata import AnnData

from scdrugmap.embedder.vocab import GeneMatch, Vocabulary
from scdrugmap.store.errors import InputError

__all__ = [
    "Embedder",
    "available_models",
    "get_embedder_class",
    "hash_files",
    "load_embedder",
    "register",
    "spec_hash",
]

_REGISTRY: dict[str, type[Embedder]] = {}


def spec_hash(obj: Any, *, length: int = 16) -> str:
    """Hash a JSON-serialisable object deterministically.

    Parameters
    ----------
    obj
        Any JSON-serialisable object (dict keys are sorted before hashing).
    length
        Number of hex characters to keep.

    Returns
    -------
    str
        Hex digest prefix of the SHA-256 of the canonical JSON.
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def hash_files(paths: Sequence[Path | str], *, chunk_size: int = 1 << 20) -> dict[str, str]:
    """SHA-256 of each file, keyed by file name.

    Parameters
    ----------
    paths
        Files to hash (a checkpoint's weights, vocabularies, configs).
    chunk_size
        Bytes read at a time.

    Returns
    -------
    dict
        ``{file name: hex digest}``.
    """
    out: dict[str, str] = {}
    for p in sorted(Path(x) for x in paths):
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            while block := fh.read(chunk_size):
                h.update(block)
        out[p.name] = h.hexdigest()
    return out


class Embedder(ABC):
    """A cell embedder: AnnData batch → float32 ``(n_cells, dim)``.

    Subclasses set :attr:`name` and are registered with :func:`register`. Instances are
    created with :meth:`load`. Adapters of foundation models implement
    :meth:`tokenize`, :meth:`forward` and :meth:`pool`; :meth:`embed` chains them.

    Attributes
    ----------
    name
        Registry name (``"pca"``, ``"geneformer"``, ...).
    input_kind
        ``"counts"`` when the model needs raw counts, ``"any"`` otherwise.
    requires_fit
        True when the embedder is fitted on the selected datasets (PCA); its revision
        then depends on the selection's content hashes.
    lora_targets
        Default LoRA target module names (used by fine-tuning).
    """

    name: ClassVar[str] = ""
    input_kind: ClassVar[Literal["counts", "any"]] = "any"
    requires_fit: ClassVar[bool] = False
    lora_targets: ClassVar[tuple[str, ...]] = ()
    lora_target_parameters: ClassVar[tuple[str, ...]] = ()
    #: set on a fine-tuned instance (hash of its LoRA adapter): gives it its own revision
    adapter_hash: str | None = None
    #: the model's gene vocabulary (set by adapters that read genes by name)
    vocab: Vocabulary | None = None
    #: ``"best"`` (exact, then renamed genes recovered) or ``"original"`` (the original's matching)
    gene_matching: str = "best"

    @classmethod
    @abstractmethod
    def load(cls, checkpoint: str | Path | None = None, **options: Any) -> Embedder:
        """Create an embedder, reading ``checkpoint`` (a directory) when the model has one.

        Raises
        ------
        CheckpointError
            When the checkpoint directory is missing, incomplete or does not match.
        InputError
            When an option has a bad value.
        """

    @property
    @abstractmethod
    def dim(self) -> int:
        """Output dimension of the cell embedding."""

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable settings that determine the output (hashed into the revision).

        Must include checkpoint file hashes for models with a checkpoint and every
        tokenisation/pooling option.
        """

    def versions(self) -> dict[str, str]:
        """Versions of the packages whose code produces the embedding."""
        from importlib.metadata import PackageNotFoundError, version

        out = {}
        for pkg in ("numpy", "anndata", "scanpy", "scikit-learn", "torch", "transformers"):
            try:
                out[pkg] = version(pkg)
            except PackageNotFoundError:  # pragma: no cover - all are dependencies
                out[pkg] = "absent"
        return out

    def revision(self, selection: Sequence[str] = ()) -> str:
        """Revision id = hash of (name, spec, package versions[, selection]).

        Parameters
        ----------
        selection
            Content hashes of the selected datasets; only used when :attr:`requires_fit`.

        Returns
        -------
        str
            16 hex characters.
        """
        payload: dict[str, Any] = {"name": self.name, "spec": self.spec(), "versions": self.versions()}
        if self.adapter_hash:
            payload["adapter"] = self.adapter_hash
        if self.requires_fit:
            payload["selection"] = sorted(selection)
        return spec_hash(payload)

    def fit(self, adatas: Sequence[AnnData]) -> None:  # noqa: B027 - optional hook
        """Fit on the selected datasets (only for :attr:`requires_fit` embedders)."""

    def get_state(self) -> dict[str, np.ndarray]:
        """Fitted state as plain arrays (saved as ``fits/<revision>.npz``, no pickles)."""
        return {}

    def set_state(self, state: dict[str, np.ndarray]) -> None:  # noqa: B027 - optional hook
        """Restore a state written by :meth:`get_state`."""

    def match_genes(self, var: Any) -> GeneMatch | None:
        """Each gene's vocabulary entry and how it matched (:mod:`embedder.vocab`).

        Parameters
        ----------
        var
            ``adata.var`` of a dataset (see the module docstring).

        Returns
        -------
        GeneMatch or None
            None for embedders without a gene vocabulary.
        """
        if self.vocab is None:
            return None
        return self.vocab.match(var, gene_matching=self.gene_matching)  # type: ignore[arg-type]

    def in_vocabulary(self, var: Any) -> np.ndarray:
        """Which of a dataset's genes the model knows.

        Parameters
        ----------
        var
            ``adata.var`` of a dataset (see the module docstring).

        Returns
        -------
        numpy.ndarray
            bool ``(n_genes,)``. The default for models without a vocabulary is all True.
        """
        match = self.match_genes(var)
        return match.found if match is not None else np.ones(len(var), dtype=bool)

    def coverage(self, adata: AnnData) -> dict[str, Any]:
        """Fraction of genes and of total expression the model's vocabulary covers, by route.

        Parameters
        ----------
        adata
            A dataset following the module's AnnData contract.

        Returns
        -------
        dict
            ``{"genes": fraction of var in vocabulary, "counts": fraction of the summed
            |X| that falls on in-vocabulary genes}``, both in [0, 1]; for models with a gene
            vocabulary also ``gene_matching``, ``n_genes`` and, per route of
            :data:`embedder.vocab.ROUTES`, ``genes_<route>`` and ``counts_<route>``.
        """
        match = self.match_genes(adata.var)
        if match is not None:
            return {"gene_matching": self.gene_matching, **match.summary(adata.X)}
        mask = np.asarray(self.in_vocabulary(adata.var), dtype=bool)
        frac_genes = float(mask.mean()) if mask.size else 0.0
        from scdrugmap.embedder.reading import abs_column_sums

        col = abs_column_sums(adata.X)
        total = float(col.sum())
        frac_counts = float(col[mask].sum() / total) if total > 0 else 0.0
        return {"genes": frac_genes, "counts": frac_counts}

    def tokenize(self, adata: AnnData) -> Any:
        """Turn cells into model inputs (token ids, values, masks)."""
        msg = f"embedder {self.name!r} does not implement tokenize()"
        raise NotImplementedError(msg)

    def forward(self, tokens: Any) -> Any:
        """Run the model on tokenised cells; returns hidden states."""
        msg = f"embedder {self.name!r} does not implement forward()"
        raise NotImplementedError(msg)

    def pool(self, hidden: Any, tokens: Any) -> np.ndarray:
        """Reduce hidden states to one float32 vector per cell, ``(n_cells, dim)``."""
        msg = f"embedder {self.name!r} does not implement pool()"
        raise NotImplementedError(msg)

    def torch_module(self) -> Any:
        """The underlying ``torch.nn.Module`` (LoRA is injected into it).

        Raises
        ------
        InputError
            For embedders without a neural network (pca, hvg).
        """
        msg = f"model {self.name!r} has no neural network to fine-tune"
        raise InputError(msg)

    def embed_tensor(self, tokens: Any) -> Any:
        """Differentiable cell embeddings ``torch.Tensor (n_cells, dim)`` for fine-tuning.

        The default chains ``hidden_states`` and ``pool_torch`` when the adapter has them.
        """
        if hasattr(self, "hidden_states") and hasattr(self, "pool_torch"):
            return self.pool_torch(self.hidden_states(tokens), tokens)
        msg = f"model {self.name!r} does not support fine-tuning (no differentiable embedding)"
        raise InputError(msg)

    def embed(self, adata: AnnData) -> np.ndarray:
        """Embed a batch of cells.

        Parameters
        ----------
        adata
            Cells following the module's AnnData contract.

        Returns
        -------
        numpy.ndarray
            float32 ``(adata.n_obs, self.dim)``.
        """
        tokens = self.tokenize(adata)
        hidden = self.forward(tokens)
        out = np.asarray(self.pool(hidden, tokens), dtype=np.float32)
        return out


def register(cls: type[Embedder]) -> type[Embedder]:
    """Class decorator adding an embedder to the registry under ``cls.name``."""
    if not cls.name:
        msg = f"{cls.__qualname__} has no name; set the class attribute `name`"
        raise TypeError(msg)
    _REGISTRY[cls.name] = cls
    return cls


#: the built-in adapters (one module each); importing a module registers its embedder(s)
ADAPTER_MODULES: tuple[str, ...] = (
    "baselines",
    "celllm",
    "cellplm",
    "geneformer",
    "llm",
    "scbert",
    "scfoundation",
    "scgpt",
    "tgpt",
    "uce",
)


def _import_builtin() -> None:
    """Import every built-in adapter module (plugin discovery by name, on first registry lookup)."""
    from importlib import import_module

    for module in ADAPTER_MODULES:
        import_module(f"scdrugmap.embedder.{module}")


def available_models() -> list[str]:
    """Names of all registered embedders, sorted."""
    _import_builtin()
    return sorted(_REGISTRY)


def get_embedder_class(name: str) -> type[Embedder]:
    """Look up an embedder class by name.

    Raises
    ------
    InputError
        When no embedder has that name.
    """
    _import_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        msg = f"unknown model {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}"
        raise InputError(msg) from None


def load_embedder(name: str, checkpoint: str | Path | None = None, **options: Any) -> Embedder:
    """Create a registered embedder by name (see :meth:`Embedder.load`)."""
    cls = get_embedder_class(name)
    return cls.load(checkpoint, **options)

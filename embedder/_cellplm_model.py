"""CellPLM's model (OmicsFormer's embedding path) and how it is read from a released checkpoint.

Follows ``OmicsML/CellPLM@b59ee7688b1bd2a745856a610248b46f15019a22``: ``pipeline/__init__.py``
(``load_pretrain``: ``<name>.config.json`` + ``<name>.best.ckpt['model_state_dict']``),
``model/cellformer.py`` (``OmicsFormer``), ``embedder/omics.py``, ``layer/flowformer.py`` and
``latent/autoencoders.py`` (GMVAE). Forward: ``log1p(counts) @ gene_emb`` → Linear, ReLU, norm →
pre-norm Flowformer layers whose tokens are the *cells of the batch* → LayerNorm → GMVAE.
The adapter (tokens, cell batching, Gumbel noise, pooling) is :mod:`embedder.cellplm`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from scdrugmap.embedder._checkpoint import check_state_shapes, load_state_dict, load_strict, require_files
from scdrugmap.store.errors import CheckpointError

__all__ = [
    "EXPECTED",
    "IGNORED_PREFIXES",
    "CellPLMModel",
    "FlowAttention",
    "FlowformerLayer",
    "find_checkpoint_files",
    "hard_gumbel",
    "load_checkpoint",
    "read_config",
]

EXPECTED = (
    "<name>.config.json (OmicsFormer kwargs incl. gene_list)",
    "<name>.best.ckpt ({'model_state_dict'})",
)
IGNORED_PREFIXES = ("decoder.",)  # the pre-training decoder; CellEmbeddingPipeline drops it too


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == "groupnorm":
        return nn.GroupNorm(4, dim)
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    msg = f"CellPLM norm {kind!r} is not supported (the release uses 'groupnorm')"
    raise CheckpointError(msg)


class _Holder(nn.Module):
    """A module holding children/parameters under release key names."""

    def __init__(self, **children: nn.Module | nn.Parameter):
        super().__init__()
        for key, value in children.items():
            setattr(self, key, value)


class FlowAttention(nn.Module):
    """Flow attention (Flowformer) over the ``L`` tokens of one sequence ``(1, L, dim)``."""

    def __init__(self, dim: int, heads: int, eps: float = 1e-6):
        super().__init__()
        self.heads, self.eps = heads, eps
        self.query_projection = nn.Linear(dim, dim)
        self.key_projection = nn.Linear(dim, dim)
        self.value_projection = nn.Linear(dim, dim)
        self.out_projection = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (
            p(x).view(b, n, self.heads, -1).transpose(1, 2)
            for p in (self.query_projection, self.key_projection, self.value_projection)
        )
        q, k, eps = torch.sigmoid(q), torch.sigmoid(k), self.eps
        sink_in = 1.0 / torch.einsum("bhld,bhd->bhl", q + eps, k.sum(dim=2) + eps)
        source_out = 1.0 / torch.einsum("bhld,bhd->bhl", k + eps, q.sum(dim=2) + eps)
        cons_sink = torch.einsum("bhld,bhd->bhl", q + eps, (k * source_out[..., None]).sum(dim=2) + eps)
        cons_source = torch.einsum("bhld,bhd->bhl", k + eps, (q * sink_in[..., None]).sum(dim=2) + eps)
        cons_source = cons_source.clamp(min=-1.0, max=1.0)
        allocation = torch.sigmoid(cons_sink)  # × L/S = 1 for self-attention
        competition = torch.softmax(cons_source, dim=-1) * float(n)
        kv = torch.einsum("bhld,bhlm->bhdm", k, v * competition[..., None])
        out = torch.einsum("bhld,bhdm->bhlm", q * sink_in[..., None], kv) * allocation[..., None]
        return self.out_projection(out.transpose(1, 2).reshape(b, n, -1))


class FlowformerLayer(nn.Module):
    """Pre-LayerNorm block: ``x + attn(norm1(x))``, ``x + ff(norm2(x))`` (FF width ``2·dim``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self_attn = FlowAttention(dim, heads)
        self._ff_block = nn.Sequential(
            nn.Linear(dim, dim * 2), nn.GELU(), nn.Dropout(0.0), nn.Linear(dim * 2, dim), nn.Dropout(0.0)
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x):
        x = x + self.self_attn(self.norm1(x).unsqueeze(0))[0]
        return x + self._ff_block(self.norm2(x))


class CellPLMModel(nn.Module):
    """OmicsFormer's embedding path (embedder, Flowformer encoder, pre-latent norm, GMVAE inference).

    State-dict keys equal the release's ``OmicsFormer(head_type='embedder')`` keys; ``norm0``, the
    positional-encoding table (PE is 0 in the release), ``y_mu``/``y_var`` and ``var`` are kept
    for strict loading but do not affect the embedding.
    """

    def __init__(self, config: dict):
        super().__init__()
        hid, n_genes = int(config["enc_hid"]), len(config["gene_list"])
        post, k = int(config["post_latent_dim"]), int(config["num_clusters"])
        norm = config.get("norm", "layernorm")
        embedder = _Holder(
            norm0=_norm(norm, hid),
            extra_linear=nn.Sequential(nn.Linear(hid, hid), nn.ReLU(), nn.Dropout(0.0), _norm(norm, hid)),
        )
        if config.get("pe_type", "sin") is not None:
            table = nn.Embedding(10000, hid)
            table.weight.requires_grad_(False)
            embedder.pe_enc = _Holder(missing_pe=nn.Parameter(torch.zeros(hid)), pe_enc=table)
        embedder.feat_enc = _Holder(emb=nn.Parameter(torch.zeros(n_genes, hid)))
        self.embedder = embedder
        heads = int(config.get("enc_head", 8))
        self.encoder = _Holder(
            layers=nn.ModuleList(FlowformerLayer(hid, heads) for _ in range(int(config["enc_layers"])))
        )
        gaussian = _Holder(mu=nn.Linear(512, post), var=nn.Linear(512, post))
        inference = _Holder(
            inference_qyx=nn.ModuleList([_Holder(logits=nn.Linear(hid, k))]),
            inference_qzyx=nn.ModuleList([nn.Linear(hid + k, 512), nn.ReLU(), gaussian]),
            y_mu=nn.Linear(k, post),
            y_var=nn.Linear(k, post),
        )
        self.latent = _Holder(layers=nn.ModuleList([nn.Identity(), _Holder(inference=inference)]))
        self.pre_latent_norm = _Holder(norm=nn.LayerNorm(hid))

    def encode(self, counts: torch.Tensor, gene_index: torch.Tensor) -> torch.Tensor:
        """Pre-latent cell states ``(n, enc_hid)`` of ONE attention batch.

        ``counts``: raw counts ``(n, g)`` (sparse CSR or dense); ``gene_index``: int64 ``(g,)``.
        """
        emb = self.embedder.feat_enc.emb[gene_index]
        with torch.autocast(emb.device.type, enabled=False):  # sparse products stay in float32
            x = torch.log1p(counts.float())
            h = torch.sparse.mm(x, emb.float()) if x.layout != torch.strided else x @ emb.float()
        h = self.embedder.extra_linear(h)
        for layer in self.encoder.layers:
            h = layer(h)
        return self.pre_latent_norm.norm(h)

    def cluster_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``q(y|x)`` logits ``(n, num_clusters)``."""
        return self.latent.layers[1].inference.inference_qyx[0].logits(h)

    def latent_mean(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean of ``q(z|x, y)``, ``(n, post_latent_dim)``."""
        qzyx = self.latent.layers[1].inference.inference_qzyx
        return qzyx[2].mu(qzyx[1](qzyx[0](torch.cat([h, y], dim=1))))


def hard_gumbel(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The original's hard Gumbel-softmax (temperature 1) with given uniform noise ``U``.

    ``y = softmax(logits − log(−log(U + 1e-20) + 1e-20))``; returns ``(one_hot(argmax y) − y) + y``.
    """
    y = torch.softmax(logits - torch.log(-torch.log(uniform + 1e-20) + 1e-20), dim=-1)
    hard = torch.zeros_like(y).scatter_(1, y.argmax(dim=-1, keepdim=True), 1.0)
    return (hard - y).detach() + y


def load_checkpoint(root: Path, prefix: str | None) -> tuple[CellPLMModel, dict, list[Path]]:
    """Read ``<prefix>.config.json``, build :class:`CellPLMModel` and load ``<prefix>.best.ckpt`` strictly.

    The pre-training decoder's keys (:data:`IGNORED_PREFIXES`) are dropped first, as
    ``CellEmbeddingPipeline`` does. The model stays on the CPU, in training mode.

    Returns
    -------
    tuple
        ``(model, config, [config path, checkpoint path])``.

    Raises
    ------
    CheckpointError
        Missing or ambiguous files, an unsupported config, mismatching weights.
    """
    config_path, ckpt_path = find_checkpoint_files(root, prefix)
    config = read_config(config_path)
    state = load_state_dict(ckpt_path)
    state = state.get("model_state_dict", state) if isinstance(state, dict) else state
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    check_state_shapes(lambda: CellPLMModel(config), state, source=config_path, what="CellPLM model")
    model = CellPLMModel(config)
    load_strict(model, state, source=ckpt_path)
    return model, config, [config_path, ckpt_path]


def find_checkpoint_files(root: Path, prefix: str | None) -> tuple[Path, Path]:
    """``(<prefix>.config.json, <prefix>.best.ckpt)`` in ``root``; ``prefix=None`` needs exactly one config.

    Raises
    ------
    CheckpointError
        No config, several configs without ``prefix``, or a missing file (named).
    """
    if prefix is None:
        found = sorted(root.glob("*.config.json"))
        if len(found) != 1:
            what = (
                "no *.config.json"
                if not found
                else f"several configs ({', '.join(p.name for p in found)}); pass prefix="
            )
            msg = f"checkpoint {str(root)!r} for 'cellplm' has {what}; expected: {', '.join(EXPECTED)}"
            raise CheckpointError(msg)
        prefix = found[0].name.removesuffix(".config.json")
    names = [f"{prefix}.config.json", f"{prefix}.best.ckpt"]
    require_files(root, names, model="cellplm", expected=EXPECTED)
    return root / names[0], root / names[1]


def read_config(path: Path) -> dict:
    """Read an OmicsFormer config and check it describes the supported embedding path.

    Raises
    ------
    CheckpointError
        Unreadable JSON, missing architecture keys, or an unsupported variant (not flowformer + gmvae,
        concatenated positions, DSBN, input covariates).
    """
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        msg = f"cannot read CellPLM config {path}: {exc}"
        raise CheckpointError(msg) from exc
    need = ("gene_list", "enc_hid", "enc_layers", "post_latent_dim", "num_clusters")
    missing = [k for k in need if k not in config]
    wrong = {
        k: config.get(k, default)
        for k, want, default in (
            ("enc_mod", "flowformer", None),
            ("latent_mod", "gmvae", "vae"),
            ("cat_pe", False, True),
            ("dsbn", False, False),
            ("input_covariate", False, False),
        )
        if config.get(k, default) != want
    }
    if missing or wrong:
        msg = (
            f"{path} is not a supported CellPLM config (needs enc_mod=flowformer, latent_mod=gmvae, cat_pe=false, "
            f"dsbn=false, input_covariate=false): missing {missing}, unsupported {wrong}"
        )
        raise CheckpointError(msg)
    return config

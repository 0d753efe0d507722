"""Checkpoint configs are checked against the weights' shapes before any tensor is allocated."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from scdrugmap.embedder import load_embedder
from scdrugmap.store.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Geneformer-layout checkpoint (32-wide BertForMaskedLM) built here."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, hidden_act="relu",
    )  # fmt: skip
    BertForMaskedLM(config).save_pretrained(out, safe_serialization=True)
    genes = [f"ENSG{i:011d}" for i in range(6)]
    dicts = {
        "token_dictionary.pkl": {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}},
        "gene_median_dictionary.pkl": dict.fromkeys(genes, 1.0),
        "gene_name_id_dict.pkl": {f"G{i}": g for i, g in enumerate(genes)},
    }
    for name, data in dicts.items():
        (out / name).write_bytes(pickle.dumps(data))
    return out


def _copy(src: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in src.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_tiny_checkpoint_loads(tiny: Path) -> None:
    assert load_embedder("geneformer", tiny, device="cpu").dim == 32


BOMB = """
import resource, sys
limit = 3 * 1024**3
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from scdrugmap.embedder import load_embedder
from scdrugmap.store.errors import CheckpointError
try:
    load_embedder("geneformer", sys.argv[1], device="cpu")
except CheckpointError as exc:
    print("CheckpointError:", exc)
    sys.exit(3)
except MemoryError:
    print("MemoryError")
    sys.exit(4)
print("loaded")
"""


def test_memory_bomb_config_is_refused_before_allocation(tiny: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny, tmp_path / "bomb")
    config = json.loads((ckpt / "config.json").read_text())
    config.update(
        hidden_size=1_048_576, num_hidden_layers=64, num_attention_heads=4, intermediate_size=4_194_304
    )
    (ckpt / "config.json").write_text(json.dumps(config))
    # 106 GB of float32 parameters: under a 3 GB address-space limit only a check before allocation passes
    res = subprocess.run(
        [sys.executable, "-c", BOMB, str(ckpt)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 3, res.stdout + res.stderr
    assert "does not match its weights" in res.stdout
    assert "shape mismatches" in res.stdout
    assert "GB in float32" in res.stdout


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_empty_weights_file_is_a_clear_error(tiny: Path, tmp_path: Path, name: str) -> None:
    ckpt = _copy(tiny, tmp_path / "empty")
    (ckpt / "model.safetensors").unlink()
    (ckpt / name).write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_embedder("geneformer", ckpt, device="cpu")


def test_truncated_weights_file_is_a_clear_error(tiny: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny, tmp_path / "cut")
    raw = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_embedder("geneformer", ckpt, device="cpu")


SCGPT_BOMB = BOMB.replace(
    'load_embedder("geneformer", sys.argv[1], device="cpu")',
    'load_embedder("scgpt", sys.argv[1], device="cpu")',
)


def test_scgpt_args_declaring_a_huge_model_are_refused_before_allocation(tmp_path: Path) -> None:
    from conftest import model_fixture

    ckpt = _copy(model_fixture("scgpt") / "tiny", tmp_path / "bomb")
    args = json.loads((ckpt / "args.json").read_text())
    args.update(embsize=1_048_576, d_hid=1_048_576, nlayers=64)
    (ckpt / "args.json").write_text(json.dumps(args))
    res = subprocess.run(
        [sys.executable, "-c", SCGPT_BOMB, str(ckpt)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 3, res.stdout + res.stderr
    assert "args.json declares a scGPT model" in res.stdout
    assert "does not match its weights" in res.stdout

"""``scdrugmap finetune`` (thin click shell over :func:`scdrugmap.classify.finetune.finetune`).

Kept apart from :mod:`scdrugmap.classify.finetune` so ``scdrugmap finetune --help`` imports neither
torch nor peft.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

__all__ = ["finetune_command"]


@click.command("finetune")
@click.option("--model", required=True, help="Embedder with a network (geneformer, tgpt, scgpt, …).")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Checkpoint directory.")
@click.option("--protocol", type=click.Choice(["pooled", "cross"]), default="pooled", show_default=True)
@click.option("--category", default="tissue", show_default=True)
@click.option("--value", required=True, help="Category value.")
@click.option("--group", "grouping", type=click.Choice(["sample", "cell"]))
@click.option("--k", default=10, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--rank", default=8, show_default=True)
@click.option("--ranks", help="Rank ablation, e.g. 4,8,16 (one run per rank).")
@click.option("--alpha", default=8.0, show_default=True)
@click.option("--dropout", default=0.05, show_default=True)
@click.option("--target-modules", help="Comma-separated module names (default: the model's).")
@click.option("--epochs", default=3, show_default=True)
@click.option("--lr", default=1e-4, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--grad-accum", default=1, show_default=True)
@click.option("--max-train-cells", type=int, help="Subsample training cells per fold.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--shots", default=0, show_default=True)
@click.option("--option", "options", multiple=True, help="Embedder option KEY=VALUE.")
@click.option("--rerun", is_flag=True)
@click.pass_context
def finetune_command(ctx: click.Context, ranks: str | None, rank: int, alpha: float, dropout: float,
                     target_modules: str | None, epochs: int, lr: float, batch_size: int, grad_accum: int,
                     max_train_cells: int | None, precision: str, gradient_checkpointing: bool,
                     options: tuple[str, ...], **kw: Any) -> None:  # fmt: skip
    """LoRA-fine-tune a foundation model with the MLP head on the persisted folds."""
    from dataclasses import replace

    from scdrugmap.classify.evaluate import summarise
    from scdrugmap.classify.finetune import finetune
    from scdrugmap.classify.lora import LoraSpec
    from scdrugmap.classify.summary import print_summary
    from scdrugmap.store.catalog import Store
    from scdrugmap.store.shell import coerce, parse_kv

    base = LoraSpec(rank=rank, alpha=alpha, dropout=dropout,
                    targets=tuple(t.strip() for t in (target_modules or "").split(",") if t.strip()),
                    epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                    max_train_cells=max_train_cells, precision=precision,  # type: ignore[arg-type]
                    gradient_checkpointing=gradient_checkpointing)  # fmt: skip
    try:
        rank_list = [int(r) for r in ranks.split(",")] if ranks else [rank]
    except ValueError:
        raise click.BadParameter(
            f"{ranks!r} is not a comma-separated list of integers", param_hint="--ranks"
        ) from None
    st = Store.open(ctx.obj["store"])
    opts = {k: coerce(v) for k, v in parse_kv(options, "--option").items()}
    run_ids = []
    for r in rank_list:
        spec = replace(base, rank=r)
        run_ids.append(finetune(st, lora=spec, options=opts, **kw))
        click.echo(f"{run_ids[-1]} rank {r}")
    print_summary(summarise(st, run_ids))

"""``scdrugmap evaluate`` with several models/heads/protocols/categories or ``--grid FILE`` (thin shell).

A grid file is TOML; every key is optional except ``models`` (when ``--model`` is not given), lists
replace the command line's, and ``[options]`` holds further evaluate options shared by all runs::

    models = ["pca", "geneformer"]
    heads = ["logreg", "mlp"]
    protocols = ["pooled", "cross"]
    categories = ["tissue", "cancer_type", "drug_class", "regimen"]
    values = []            # empty: every value with labelled cells
    seeds = [0]

    [options]
    k = 10
    positive_class = "sensitive"
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import click

from scdrugmap.classify.grid import GridSpec, run_grid
from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError

__all__ = ["read_grid_file", "run_grid_command"]

#: keys of a grid file's top level, and of its ``[options]`` table
GRID_KEYS = ("models", "heads", "protocols", "categories", "values", "seeds", "options")
GRID_OPTIONS = ("k", "grouping", "positive_class", "head_params", "shots", "min_confidence", "prevalence",
                "revision", "train_where", "test_where")  # fmt: skip


def read_grid_file(path: Path) -> dict[str, Any]:
    """Parse and check a grid file.

    Returns
    -------
    dict
        Its top-level keys (lists) and ``options``.

    Raises
    ------
    InputError
        Not TOML, an unknown key, or a value of the wrong type.
    """
    try:
        data = tomllib.loads(Path(path).read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        msg = f"grid file {str(path)!r} is not valid TOML ({exc}); see README 'Evaluation grid'"
        raise InputError(msg) from exc
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        msg = f"grid file {str(path)!r}: unknown key(s) {unknown}; allowed: {', '.join(GRID_KEYS)}"
        raise InputError(msg)
    for key in GRID_KEYS[:-1]:
        if key in data and not (
            isinstance(data[key], list) and all(isinstance(v, str | int) for v in data[key])
        ):
            msg = f'grid file {str(path)!r}: {key} must be a list, e.g. {key} = ["a", "b"]'
            raise InputError(msg)
    options = data.get("options", {})
    if not isinstance(options, dict) or set(options) - set(GRID_OPTIONS):
        msg = f"grid file {str(path)!r}: [options] may hold {', '.join(GRID_OPTIONS)}"
        raise InputError(msg)
    return data


def run_grid_command(
    store: Store,
    grid_file: Path | None,
    lists: dict[str, list[str]],
    kw: dict[str, Any],
    *,
    head_params: dict[str, Any],
    positive: str,
    executor: str,
    workers: int,
    threads: int,
    address: str | None,
    by_confidence: bool,
) -> None:
    """Build the grid from the file and/or the command line, run it, print one line per run and
    the summary."""
    from scdrugmap.classify.evaluate import summarise
    from scdrugmap.classify.summary import print_summary
    from scdrugmap.store.shell import print_table

    data = read_grid_file(grid_file) if grid_file is not None else {}
    options = {"k": kw["k"], "grouping": kw.get("grouping"), "positive_class": positive, "head_params": head_params,
               "shots": kw["shots"], "min_confidence": kw["min_confidence"], "prevalence": kw["prevalence"],
               "revision": kw.get("revision"), "train_where": kw["train_where"], "test_where": kw["test_where"]}  # fmt: skip
    options.update(data.get("options", {}))
    seeds = [int(s) for s in data.get("seeds", kw.get("seeds") or [kw["seed"]])]
    values = [str(v) for v in data.get("values", [kw["value"]] if kw.get("value") else [])]
    grid = GridSpec(
        models=tuple(str(m) for m in data.get("models", lists["model"])),
        heads=tuple(str(h) for h in data.get("heads", lists["head"])),
        protocols=tuple(str(p) for p in data.get("protocols", lists["protocol"])),
        categories=tuple(str(c) for c in data.get("categories", lists["category"])),
        values=tuple(values),
        seeds=tuple(seeds),
        options=tuple(sorted(options.items(), key=lambda kv: kv[0])),
    )
    if not grid.models:
        raise click.UsageError("give --model (comma-separated) or a --grid file with models = [...]")
    if len(grid.models) > 1 and options.get("revision"):
        raise click.UsageError("--revision names one model's embedding; drop it for a grid of several models")
    outcomes = run_grid(store, grid, executor=executor, workers=workers, threads=threads, address=address,
                        rerun=bool(kw.get("rerun")), progress=click.echo)  # fmt: skip
    for o in outcomes:
        if o.reused:
            click.echo(f"{o.run_id} {o.spec.model}/{o.spec.head.name} {o.spec.protocol} "
                       f"{o.spec.category}={o.spec.value!r}: {o.n_cells} cells (from catalog)")  # fmt: skip
    ids = [o.run_id for o in outcomes]
    print_summary(summarise(store, ids))
    if by_confidence:
        from scdrugmap.classify.analyze.confidence import by_confidence as strata

        click.echo(
            "\nPer label-confidence stratum (stars 0 = none; out-of-fold predictions pooled over folds):"
        )
        print_table(strata(store, ids).round(4))

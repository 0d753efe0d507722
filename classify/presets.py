"""Evaluation presets: a named set of ``evaluate`` options, applied before :mod:`classify.evaluate` runs.

``scdrugmap2026`` reproduces scDrugMap's protocol (Nat Commun 2026): pooled-data stratified 10-fold
cross-validation at the cell level (``--group cell``), the paper's head (``mlp_paper``: d → 512 → 512 → 2,
AdamW 1e-4, 10 epochs, batch 256), F1 with sensitive as the positive class, and the paper's category
averaging: the metric averaged over the folds of each category value, then the unweighted mean over the
category's values. The project's defaults (patient/sample-grouped folds, the ``mlp`` trained to
convergence) stay the defaults; ``--side-by-side`` runs them too and prints both numbers.

The ``evaluate`` command here wraps :func:`classify.commands.evaluate` (same options plus ``--preset``
and ``--side-by-side``): a preset option the user also set to another value is refused, and the preset's
name and settings are merged into each run's stored spec (``eval_runs.spec -> 'preset'``).
"""

from __future__ import annotations

import json
from typing import Any

import click
import pandas as pd

from scdrugmap.classify.commands import evaluate as _evaluate
from scdrugmap.store.shell import CONTEXT, open_store, print_table

__all__ = ["PRESETS", "apply_preset", "evaluate", "paper_average"]

#: preset → evaluate options it fixes, plus how results are summarised
PRESETS: dict[str, dict[str, Any]] = {
    "scdrugmap2026": {
        "options": {
            "protocol": "pooled",
            "grouping": "cell",
            "k": 10,
            "head": "mlp_paper",
            "positive": "sensitive",
            "shots": 0,
            "prevalence": 0.0,
            "min_confidence": 0,
        },
        "metric": "f1",
        "averaging": "mean over the folds of each category value, then the unweighted mean over the values",
        "reference": "scDrugMap, Nat Commun 2026: pooled-data evaluation, 10-fold cell-level CV, MLP head",
    },
}
_FLAGS = {"grouping": "--group", "positive": "--positive", "k": "--k", "head": "--head", "protocol": "--protocol",
          "shots": "--shots", "prevalence": "--prevalence", "min_confidence": "--min-confidence"}  # fmt: skip


def apply_preset(ctx: click.Context, name: str, kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` with the preset's options; an option the user set to a different value → UsageError."""
    out = dict(kw)
    for key, value in PRESETS[name]["options"].items():
        source = ctx.get_parameter_source(key)
        given = source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")
        if given and kw.get(key) != value:
            msg = (
                f"--preset {name} sets {_FLAGS[key]} {value}; drop {_FLAGS[key]} {kw.get(key)} or the preset"
            )
            raise click.UsageError(msg)
        out[key] = value
    return out


def _run_ids(st, kw: dict[str, Any]) -> list[str]:
    """Frozen runs of these options on the model's latest revision (the ones ``evaluate`` just made or reused).

    Without ``grouping`` (the default rule: patient, else sample, else cell) each value's run with the
    highest-ranked grouping is taken: the default gives exactly that one.
    """
    from scdrugmap.store.embeddings import resolve_revision

    revision = resolve_revision(st, kw["model"], kw.get("revision"))
    keys = ("model", "revision", "head", "protocol", "category", "k", "seed", "positive_class")
    vals = [
        kw["model"],
        revision,
        kw["head"],
        kw["protocol"],
        kw["category"],
        kw["k"],
        kw["seed"],
        kw["positive"],
    ]
    where = " AND ".join(f"{c} = ?" for c in keys) + " AND strategy = 'frozen'"
    for col, val in (("value", kw.get("value")), ("grouping", kw.get("grouping"))):
        if val:
            where += f" AND {col} = ?"
            vals.append(val)
    df = st.query(f"SELECT run_id, value, grouping FROM eval_runs WHERE {where}", vals)
    df["rank"] = df["grouping"].map({"patient": 0, "sample": 1, "cell": 2}).fillna(3)
    return df.sort_values(["value", "rank"]).drop_duplicates("value")["run_id"].tolist()


def paper_average(st, run_ids: list[str], metric: str = "f1") -> pd.DataFrame:
    """Per category value: the fold mean of ``metric``; last row ``(mean over values)`` = unweighted mean."""
    if not run_ids:
        return pd.DataFrame(columns=["value", metric, "folds"])
    marks = ",".join("?" * len(run_ids))
    df = st.query(
        f"SELECT r.value, AVG(m.value) AS {metric}, COUNT(m.value) AS folds FROM eval_runs r JOIN metrics m "
        f"USING (run_id) WHERE r.run_id IN ({marks}) AND m.metric = ? GROUP BY r.value ORDER BY r.value",
        [*run_ids, metric],
    )
    total = pd.DataFrame(
        [{"value": "(mean over values)", metric: df[metric].mean(), "folds": df["folds"].sum()}]
    )
    return pd.concat([df, total], ignore_index=True)


def _record(st, run_ids: list[str], name: str) -> None:
    """Merge ``{"preset": {name, settings}}`` into the stored spec of each run."""
    preset = PRESETS[name]
    patch = json.dumps({"preset": {"name": name, **preset["options"], "metric": preset["metric"],
                                   "averaging": preset["averaging"], "reference": preset["reference"]}})  # fmt: skip
    with st.transaction() as con:
        for run_id in run_ids:
            con.execute(
                "UPDATE eval_runs SET spec = json_merge_patch(spec, ?) WHERE run_id = ?", [patch, run_id]
            )


def _callback(ctx: click.Context, preset: str | None, side_by_side: bool, **kw: Any) -> None:
    if preset is None:
        if side_by_side:
            raise click.UsageError("--side-by-side compares a --preset with the defaults; give --preset")
        ctx.invoke(_evaluate, **kw)
        return
    paper = apply_preset(ctx, preset, kw)
    ctx.invoke(_evaluate, **paper)
    st = open_store(ctx)
    ids = _run_ids(st, paper)
    _record(st, ids, preset)
    metric = PRESETS[preset]["metric"]
    table = paper_average(st, ids, metric).rename(columns={metric: f"{metric} ({preset})"})
    if side_by_side:
        click.echo("\nThe project's defaults on the same cells:")
        ctx.invoke(_evaluate, **kw)
        other_ids = _run_ids(st, kw)
        groupings = "/".join(sorted(set(st.query(
            f"SELECT grouping FROM eval_runs WHERE run_id IN ({','.join('?' * len(other_ids))})", other_ids
        )["grouping"]))) if other_ids else "-"  # fmt: skip
        other = paper_average(st, other_ids, metric)
        label = f"{metric} (defaults: {kw['head']}, {groupings} folds)"
        table = table.merge(other[["value", metric]].rename(columns={metric: label}), on="value", how="left")
    click.echo(f"\n{preset}: {PRESETS[preset]['reference']}; {metric} = {PRESETS[preset]['averaging']}")
    print_table(table.round(4))


evaluate = click.Command(
    name="evaluate",
    context_settings=CONTEXT,
    callback=click.pass_context(_callback),
    params=[
        *_evaluate.params,
        click.Option(
            ["--preset"],
            type=click.Choice(sorted(PRESETS)),
            help="A published protocol, e.g. scdrugmap2026: cell-level 10-fold pooled CV, mlp_paper, F1 "
            "(sensitive positive) averaged per category value; its settings are stored in each run's spec.",
        ),
        click.Option(
            ["--side-by-side"],
            is_flag=True,
            help="With --preset: also run the project's defaults (grouped folds, mlp) and print both.",
        ),
    ],
    help=(_evaluate.help or "") + " --preset NAME applies a published protocol (see classify/presets.py).",
)

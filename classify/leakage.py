"""Leakage report: the same cells, model, head and seed under every split grouping.

Cells of one sample (a culture, a biopsy) share its technical and biological state, and samples of
one patient share the patient; when they land on both sides of a split, a head can recognise the
sample instead of learning the response, and every metric is inflated. :func:`leakage` evaluates
one category value under

- ``cell``: the paper's cell-level stratified k-fold (the most leaky);
- ``sample``: k-fold grouped by dataset + sample;
- ``patient``: k-fold grouped by patient (falls back to samples for cells without patient ids);
- ``study``: leave-one-study-out (cross-data; the strictest),

with the same seed, and reports each metric and its **inflation** over the strictest grouping that
could be evaluated (``study`` when the value has ≥ 2 studies, else ``patient`` …). Reports are
stored in the catalog table ``leakage`` (one row per grouping × metric).
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime
from typing import Any, Literal

import click
import pandas as pd

from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError
from scdrugmap.store.progress import track

__all__ = ["GROUPINGS", "leakage", "leakage_command"]

log = logging.getLogger(__name__)

#: from the most leaky to the strictest
GROUPINGS: tuple[str, ...] = ("cell", "sample", "patient", "study")
_METRICS = ("auroc", "auprc", "f1", "balanced_accuracy", "mcc")


def leakage(
    store: Store,
    *,
    model: str,
    value: str,
    head: str = "logreg",
    category: str = "tissue",
    seed: int = 0,
    k: int = 10,
    revision: str | None = None,
    head_params: dict[str, Any] | None = None,
    positive_class: Literal["sensitive", "resistant"] = "sensitive",
) -> pd.DataFrame:
    """Evaluate one category value under each grouping and store the inflation table.

    Parameters
    ----------
    store
        The store.
    model, revision, head, head_params
        Embedding and head, as :func:`classify.evaluate.evaluate`.
    category, value
        The cells evaluated (the same under every grouping).
    seed, k
        Fold seed (all groupings) and folds of the k-fold groupings.
    positive_class
        Class scored as positive.

    Returns
    -------
    pandas.DataFrame
        ``report_id, grouping, run_id, metric, mean, n_folds, reference, inflation, note``; groupings
        that cannot split this value have NULL means and the reason in ``note``.

    Raises
    ------
    InputError
        When no grouping can be evaluated.
    """
    from scdrugmap.classify.evaluate import evaluate
    from scdrugmap.classify.summary import summarise

    runs: dict[str, str] = {}
    notes: dict[str, str] = {}
    for g in track(GROUPINGS, "leakage", unit="groupings", stage=str):
        protocol = "cross" if g == "study" else "pooled"
        grouping = None if g == "study" else g
        try:
            out = evaluate(
                store, model=model, revision=revision, head=head, head_params=head_params, protocol=protocol,
                category=category, value=value, grouping=grouping, k=k, seed=seed, positive_class=positive_class,
            )  # fmt: skip
        except InputError as exc:
            notes[g] = str(exc)
            log.warning("leakage: no %s grouping for %s = %r: %s", g, category, value, exc)
            continue
        runs[g] = out[0].run_id
        if g == "patient" and not _has_patients(store, out[0].spec.fold_set_id):
            notes[g] = "no patient ids: grouped by sample"
    if not runs:
        msg = f"leakage: no grouping could split {category} = {value!r}: {notes}"
        raise InputError(msg)
    reference = [g for g in GROUPINGS if g in runs][-1]
    summary = summarise(store, list(runs.values()))
    summary = summary[summary["metric"].isin(_METRICS)].set_index(["run_id", "metric"])
    rows = []
    for g in GROUPINGS:
        for m in _METRICS:
            run = runs.get(g)
            mean = summary.loc[(run, m), "mean"] if run and (run, m) in summary.index else None
            ref = summary.loc[(runs[reference], m), "mean"] if (runs[reference], m) in summary.index else None
            rows.append({
                "grouping": g, "run_id": run, "metric": m, "mean": mean,
                "n_folds": int(summary.loc[(run, m), "n_folds"]) if run and (run, m) in summary.index else 0,
                "reference": reference,
                "inflation": None if mean is None or ref is None or pd.isna(mean) or pd.isna(ref) else mean - ref,
                "note": notes.get(g, ""),
            })  # fmt: skip
    df = pd.DataFrame(rows)
    revision = store.query("SELECT revision FROM eval_runs WHERE run_id = ?", [runs[reference]])[
        "revision"
    ].iloc[0]
    key = {"model": model, "revision": revision, "head": head, "params": head_params or {}, "category": category,
           "value": str(value), "seed": seed, "k": k, "positive": positive_class}  # fmt: skip
    report_id = (
        "leak-" + hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    )
    df.insert(0, "report_id", report_id)
    stored = df.drop(columns="note").assign(
        model=model, revision=revision, head=head, category=category, value=str(value), seed=seed,
        created_at=datetime.now(UTC).replace(tzinfo=None),
    )  # fmt: skip
    with store.transaction() as con:
        con.execute("DELETE FROM leakage WHERE report_id = ?", [report_id])
        con.register("_leak", stored)
        con.execute("INSERT INTO leakage BY NAME SELECT * FROM _leak")
        con.unregister("_leak")
    return df


def _has_patients(store: Store, fold_set_id: str) -> bool:
    n = store.query(
        "SELECT COUNT(c.patient_id) AS n FROM folds f JOIN cells c USING (cell_uid) WHERE f.fold_set_id = ?",
        [fold_set_id],
    )["n"].iloc[0]
    return bool(n)


def format_leakage(df: pd.DataFrame) -> str:
    """One line per grouping: each metric's mean and its inflation over the reference grouping."""

    def num(v: Any, signed: bool = False) -> str:
        if v is None or pd.isna(v):
            return "—"
        return f"{v:+.3f}" if signed else f"{v:.3f}"

    short = {"balanced_accuracy": "bacc"}
    head = f"{'grouping':9}{'run_id':21}" + "".join(f"{short.get(m, m):>7}{'Δ':>7}" for m in _METRICS)
    lines = [head]
    for g, part in df.groupby("grouping", sort=False):
        p = part.set_index("metric")
        run = p["run_id"].iloc[0] or "-"
        lines.append(f"{g:9}{run:21}" + "".join(
            f"{num(p.loc[m, 'mean']):>7}{num(p.loc[m, 'inflation'], True):>7}" for m in _METRICS))  # fmt: skip
    ref = df["reference"].iloc[0]
    lines.append(f"Δ: inflation over the strictest grouping evaluated ({ref}); means over folds of one seed.")
    lines += [
        f"{g}: {n}"
        for g, n in df.drop_duplicates("grouping")[["grouping", "note"]].itertuples(index=False)
        if n
    ]
    return "\n".join(lines)


@click.command("leakage", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--model", required=True, help="Embedding model name.")
@click.option(
    "--head", default="logreg", show_default=True, help="Head (mlp, mlp_paper, logreg, lightgbm, rf)."
)
@click.option("--category", default="tissue", show_default=True)
@click.option("--value", required=True, help="Category value whose cells are evaluated.")
@click.option("--seed", default=0, show_default=True)
@click.option("--k", default=10, show_default=True, help="Folds of the cell/sample/patient groupings.")
@click.option(
    "--positive", type=click.Choice(["sensitive", "resistant"]), default="sensitive", show_default=True
)
@click.pass_context
def leakage_command(ctx: click.Context, positive: str, **kw: Any) -> None:
    """Evaluate the same cells under cell, sample, patient and study grouping; report the inflation."""
    from scdrugmap.store.shell import open_store

    st = open_store(ctx)
    df = leakage(st, positive_class=positive, **kw)  # type: ignore[arg-type]
    click.echo(f"{df['report_id'].iloc[0]}: {kw['model']}/{kw['head']} on {kw['category']} = {kw['value']!r}")
    click.echo(format_leakage(df))

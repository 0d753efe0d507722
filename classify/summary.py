"""Run summaries that can be read honestly: baselines, degenerate flags, folds counted.

Every metric mean comes with

- the **constant-classifier baseline** at the prevalence ``p`` of the positive class in each scored
  test fold, averaged over the folds where the metric is defined: F1 = 2p/(1+p) and precision =
  AUPRC = p (call every cell positive), recall = 1, accuracy = max(p, 1 − p) (majority class),
  AUROC = balanced accuracy = 0.5, MCC = 0;
- the number of folds it was taken over (``n_folds`` of ``n_folds_total``; the others are NULL,
  with their reasons in ``undefined_reason``);
- a **degenerate** flag per run: every scored fold has all its cells called one class, or the mean
  MCC is about 0 (``|MCC| < MCC_ZERO``) — such runs score F1 = 2p/(1+p) without any signal; folds
  called one class are counted in ``n_one_class_folds`` (of ``n_scored_folds``) either way.

:func:`format_summary` prints one row per run that fits a 120-column terminal with the run id;
:func:`seed_summary` gives the mean and 95 % interval over seeds of repeated runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError

__all__ = ["MCC_ZERO", "format_summary", "print_summary", "seed_summary", "summarise"]

#: |mean MCC| below this marks a run as degenerate (no better than a constant call)
MCC_ZERO = 0.05

_BASELINE_SQL = (
    "CASE m.metric WHEN 'f1' THEN 2 * s.prevalence / (1 + s.prevalence) WHEN 'auprc' THEN s.prevalence "
    "WHEN 'precision' THEN s.prevalence WHEN 'recall' THEN 1.0 "
    "WHEN 'accuracy' THEN GREATEST(s.prevalence, 1 - s.prevalence) WHEN 'auroc' THEN 0.5 "
    "WHEN 'balanced_accuracy' THEN 0.5 WHEN 'mcc' THEN 0.0 END"
)


def summarise(store: Store, run_ids: list[str] | None = None, *, where: str | None = None) -> pd.DataFrame:
    """Mean ± sd per run × metric over the folds where the metric is defined, with baselines.

    Parameters
    ----------
    store
        The store.
    run_ids
        Restrict to these runs (default all).
    where
        Extra SQL filter on ``eval_runs`` columns (e.g. ``"model = 'pca'"``).

    Returns
    -------
    pandas.DataFrame
        One row per run × metric: ``run_id, model, strategy, head, protocol, category, value,
        grouping, seed, positive_class, min_confidence (0 = no filter), metric, mean, sd, n_folds``
        (folds with a defined value), ``n_undefined, n_folds_total, undefined_reason, prevalence``
        (mean positive fraction of those folds' scored cells), ``baseline`` (constant classifier, see
        the module docstring), ``n_one_class_folds, n_scored_folds, degenerate``.

    Raises
    ------
    InputError
        A bad ``where`` filter.
    """
    conds = ["TRUE"]
    params: list[Any] = []
    if run_ids is not None:
        conds.append("list_contains(?, r.run_id)")
        params.append(list(run_ids))
    if where:  # checked and evaluated read-only; only the matching run ids reach this query
        from scdrugmap.store.filters import matching_keys

        conds.append("list_contains(?, r.run_id)")
        params.append(matching_keys(store, where, table="eval_runs"))
    cond = " AND ".join(conds)
    sql = (
        "WITH s AS (SELECT p.run_id, p.fold, COUNT(p.probability) AS n_scored, "
        "AVG(CASE WHEN c.label = COALESCE(r.positive_class, 'sensitive') THEN 1.0 ELSE 0.0 END) AS prevalence, "
        "SUM(CASE WHEN p.probability >= 0.5 THEN 1 ELSE 0 END) AS n_called "
        f"FROM predictions p JOIN cells c USING (cell_uid) JOIN eval_runs r USING (run_id) WHERE {cond} "
        "AND p.probability IS NOT NULL GROUP BY ALL), "
        "one AS (SELECT run_id, SUM(CASE WHEN n_called = 0 OR n_called = n_scored THEN 1 ELSE 0 END) AS n1, "
        "COUNT(*) AS n_scored_folds "
        "FROM s GROUP BY run_id) "
        "SELECT r.run_id, r.model, r.strategy, r.head, r.protocol, r.category, r.value, r.grouping, r.seed, "
        "COALESCE(r.positive_class, 'sensitive') AS positive_class, "
        "COALESCE(r.min_confidence, 0) AS min_confidence, m.metric, "
        "AVG(m.value) AS mean, STDDEV_SAMP(m.value) AS sd, COUNT(m.value) AS n_folds, "
        "COUNT(*) - COUNT(m.value) AS n_undefined, COUNT(*) AS n_folds_total, "
        "STRING_AGG(DISTINCT m.reason, '; ') AS undefined_reason, "
        "AVG(CASE WHEN m.value IS NOT NULL THEN s.prevalence END) AS prevalence, "
        f"AVG(CASE WHEN m.value IS NOT NULL THEN {_BASELINE_SQL} END) AS baseline, "
        "COALESCE(ANY_VALUE(one.n1), 0) AS n_one_class_folds, "
        "COALESCE(ANY_VALUE(one.n_scored_folds), 0) AS n_scored_folds "
        "FROM eval_runs r JOIN metrics m USING (run_id) "
        "LEFT JOIN s ON s.run_id = m.run_id AND s.fold = m.fold LEFT JOIN one ON one.run_id = r.run_id "
        f"WHERE {cond} GROUP BY ALL ORDER BY r.category, r.value, r.protocol, r.model, r.head, r.seed, m.metric"
    )
    try:
        df = store.query(sql, params * 2)
    except Exception as exc:
        msg = f"bad results filter {where!r}: {str(exc).splitlines()[0]}"
        raise InputError(msg) from exc
    mcc = df[df["metric"] == "mcc"].set_index("run_id")["mean"]
    near_zero = mcc.abs() < MCC_ZERO
    all_one = (df["n_one_class_folds"] > 0) & (df["n_one_class_folds"] == df["n_scored_folds"])
    df["degenerate"] = all_one | df["run_id"].map(near_zero).fillna(False).astype(bool)
    return df


def _num(v: Any, width: int = 5) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "NULL".rjust(width)
    return f"{v:.3f}".lstrip("0").rjust(width) if 0 <= v < 1 else f"{v:.{max(0, width - 3)}f}".rjust(width)


def _fit(text: Any, width: int) -> str:
    s = str(text)
    return (s if len(s) <= width else s[: width - 1] + "…").ljust(width)


_COLUMNS = (  # header, width
    ("run_id", 20), ("model/head", 14), ("proto", 5), ("value", 14), ("pos", 3), ("prev", 4), ("f1", 5),
    ("f1_0", 4), ("auroc", 5), ("auprc", 5), ("pr_0", 4), ("bacc", 5), ("mcc", 5), ("folds", 5), ("flag", 5),
)  # fmt: skip
_SHOWN = ("f1", "auroc", "auprc", "balanced_accuracy", "mcc")


def format_summary(df: pd.DataFrame, *, max_notes: int = 20) -> str:
    """One line per run (≤ 120 characters) with baselines and flags, then a legend and notes.

    Parameters
    ----------
    df
        From :func:`summarise`.
    max_notes
        At most this many notes on undefined metrics.

    Returns
    -------
    str
        The table, legend and notes (``(no results)`` when ``df`` is empty).
    """
    if df.empty:
        return "(no results)"
    lines = [" ".join(h.rjust(w) if i >= 5 else h.ljust(w) for i, (h, w) in enumerate(_COLUMNS)).rstrip()]
    notes: list[str] = []
    for run_id, g in df.groupby("run_id", sort=False):
        r = g.iloc[0]
        m = g.set_index("metric")

        def val(metric: str, col: str, m: pd.DataFrame = m) -> Any:
            return m.loc[metric, col] if metric in m.index else None

        folds = val("auroc", "n_folds")
        total = int(r["n_folds_total"])
        short = (g.loc[g["metric"].isin(_SHOWN), "n_folds"] < (folds if folds is not None else total)).any()
        one = int(r["n_one_class_folds"])
        flag = ("DEGEN" if r["degenerate"] else f"1c:{one}" if one else "") + (" *" if short else "")
        prot = {"pooled": "pool", "cross": "cross", "external": "ext"}.get(r["protocol"], r["protocol"])
        cells = [
            _fit(run_id, 20), _fit(f"{r['model']}/{r['head']}", 14), _fit(prot, 5), _fit(r["value"], 14),
            _fit("sen" if r["positive_class"] == "sensitive" else "res", 3),
            _num(val("f1", "prevalence"), 4)[-4:], _num(val("f1", "mean")), _num(val("f1", "baseline"), 4)[-4:],
            _num(val("auroc", "mean")), _num(val("auprc", "mean")), _num(val("auprc", "baseline"), 4)[-4:],
            _num(val("balanced_accuracy", "mean")), _num(val("mcc", "mean")),
            f"{'?' if folds is None else int(folds)}/{total}".rjust(5), flag.ljust(5),
        ]  # fmt: skip
        lines.append(" ".join(cells).rstrip())
        for _, u in g[g["n_undefined"] > 0].iterrows():
            notes.append(
                f"{run_id} {u['metric']}: mean of {int(u['n_folds'])}/{total} folds; NULL in the others "
                f"({u['undefined_reason']})"
            )
        if r["min_confidence"]:
            notes.append(
                f"{run_id}: min_confidence {int(r['min_confidence'])} (only datasets with that many stars)"
            )
    lines += [
        "pos: positive class (sen = sensitive); prev: its mean fraction in the scored test folds. f1_0, pr_0:",
        "constant-classifier baseline at each fold's prevalence (F1 = 2p/(1+p), AUPRC = p; AUROC = bacc = 0.5,",
        "MCC = 0). folds: folds with a defined AUROC / all. DEGEN: every fold called one class only, or",
        f"|MCC| < {MCC_ZERO} (no better than a constant call); 1c:n: n folds called one class only.",
        "* some shown metric is a mean over fewer folds (see notes). Means are over folds; sd and more: --long.",
    ]
    if notes:
        lines.append("Notes:")
        lines += [f"  {n}" for n in notes[:max_notes]]
        if len(notes) > max_notes:
            lines.append(f"  … {len(notes) - max_notes} more (results --long)")
    return "\n".join(lines)


def seed_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95 % t-interval over seeds of the per-seed fold means.

    Runs that differ only by seed (fold assignment and head initialisation) are grouped. Folds within
    one seed share training cells and are not independent replicates, so the interval is taken
    over the per-seed means (one value per seed), never over folds.

    Parameters
    ----------
    df
        From :func:`summarise`, holding runs of several seeds.

    Returns
    -------
    pandas.DataFrame
        ``model, strategy, head, protocol, category, value, grouping, metric, n_seeds, mean, ci_low,
        ci_high, baseline`` (interval NaN with one seed).
    """
    from scipy import stats

    keys = [
        "model",
        "strategy",
        "head",
        "protocol",
        "category",
        "value",
        "grouping",
        "positive_class",
        "metric",
    ]
    rows = []
    for key, g in df.groupby(keys, sort=False, dropna=False):
        v = g["mean"].dropna().to_numpy(dtype=float)
        n = len(v)
        mean = float(v.mean()) if n else np.nan
        half = float(stats.t.ppf(0.975, n - 1) * v.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan
        rows.append({**dict(zip(keys, key, strict=True)), "n_seeds": n, "seeds": sorted(g["seed"].tolist()),
                     "mean": mean, "ci_low": mean - half, "ci_high": mean + half,
                     "baseline": float(g["baseline"].mean())})  # fmt: skip
    return pd.DataFrame(rows)


def print_summary(df) -> None:
    """Print :func:`format_summary`, and over-seed intervals when runs repeat seeds."""
    import click

    click.echo(format_summary(df))
    if (
        not df.empty
        and df.groupby(["model", "head", "protocol", "category", "value", "grouping"])["seed"].nunique().max()
        > 1
    ):
        seeds = seed_summary(df[df["metric"].isin(["f1", "auroc", "auprc", "balanced_accuracy", "mcc"])])
        seeds = seeds[seeds["n_seeds"] > 1]
        click.echo("\nOver seeds (mean and 95 % t-interval of the per-seed fold means; folds within a seed share "
                   "training cells and are not independent replicates):")  # fmt: skip
        for _, r in seeds.iterrows():
            click.echo(
                f"  {r['model']}/{r['head']} {r['protocol']} {r['value']} {r['metric']}: {r['mean']:.3f} "
                f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] over seeds {r['seeds']} (baseline {r['baseline']:.3f})"
            )

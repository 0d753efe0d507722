"""Which model to pick: a recommendation per category value and scenario, with its evidence.

From the stored runs (``eval_runs`` + ``metrics``), each **candidate** — model × strategy × head —
of a **group** (category, value, scenario, grouping, positive class, confidence filter) gets the
mean of ``metric`` and its 95 % t-interval over seeds (:func:`classify.summary.seed_summary`: the
per-seed fold means are the replicates, folds within a seed are not). The scenario is the run's
protocol (``pooled``, ``cross`` = cross-data, ``external``), prefixed ``few-shot`` when the held-out
side contributed labelled shots, and suffixed with the test prevalence when one was imposed.

The best candidate (highest mean) is **recommended** only when the evidence holds:

1. it has at least ``min_seeds`` seeds (``scdrugmap evaluate --seeds 0,1,2``);
2. its interval lies above the constant-classifier baseline (:mod:`classify.summary`: AUROC 0.5,
   AUPRC = p, F1 = 2p/(1+p), …) and it is not flagged degenerate;
3. there is a second candidate, and the best's interval does not overlap the next one's (or its
   mean, when the next has a single seed).

Otherwise the verdict is ``not enough evidence`` and the reason says which rule failed. When all
seeds of a candidate gave the same value (a deterministic head on folds that seeds do not change,
e.g. ``logreg`` leave-one-study-out), the seeds are not replicates: its interval is then taken
over the folds (held-out studies) of one seed instead, and says so. Two intervals that overlap
can still differ; overlap is the conservative reading scDrugMap's Supplementary Data 5 lacks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError

__all__ = [
    "NOT_ENOUGH",
    "SCENARIOS",
    "candidates",
    "format_recommendation",
    "recommend",
    "report_table",
]

NOT_ENOUGH = "not enough evidence"
#: scenario filters accepted by :func:`recommend`
SCENARIOS = ("pooled", "cross", "external", "few-shot")
_GROUP = ["category", "value", "scenario", "grouping", "positive_class", "min_confidence"]


def _scenario(row: pd.Series) -> str:
    name = {"cross": "cross-data"}.get(row["protocol"], row["protocol"])
    if row["shots"]:
        name = f"few-shot {name} ({int(row['shots'])}/class)"
    if row["prevalence_set"]:
        name += f" @ prevalence {row['prevalence_set']:g}"
    return name


def _fold_interval(store: Store, run_id: str, metric: str) -> tuple[float, float, int]:
    """95 % t-interval over the folds of one run (NaN with fewer than 2 defined folds)."""
    from scipy import stats

    v = store.query("SELECT value FROM metrics WHERE run_id = ? AND metric = ? AND value IS NOT NULL",
                    [run_id, metric])["value"].to_numpy(dtype=float)  # fmt: skip
    if v.size < 2:
        return np.nan, np.nan, int(v.size)
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return float(v.mean() - half), float(v.mean() + half), int(v.size)


def candidates(
    store: Store, *, category: str | None = None, scenario: str | None = None, metric: str = "auroc"
) -> pd.DataFrame:
    """Every candidate of every group with its mean, interval and rank.

    Parameters
    ----------
    store
        The store.
    category
        Only this category (tissue, drug, …); default all.
    scenario
        Only ``pooled``, ``cross``, ``external`` or ``few-shot`` runs; default all.
    metric
        A stored metric (``auroc``, ``auprc``, ``f1``, ``balanced_accuracy``, ``mcc``, …); higher is better.

    Returns
    -------
    pandas.DataFrame
        One row per group × candidate, best first within a group: the group columns, ``model, strategy,
        head, mean, ci_low, ci_high, interval_over`` (``seeds`` or ``folds``), ``n_seeds, n_runs, n_folds,
        baseline, degenerate, rank`` (1 = best). Empty when no run matches.

    Raises
    ------
    InputError
        Unknown metric, category or scenario.
    """
    from scdrugmap.classify.folds import CATEGORIES
    from scdrugmap.classify.metrics import METRICS
    from scdrugmap.classify.summary import seed_summary, summarise

    if metric not in METRICS:
        msg = f"unknown metric {metric!r}; use one of {', '.join(METRICS)}"
        raise InputError(msg)
    if category is not None and category not in CATEGORIES:
        msg = f"unknown category {category!r}; use one of {', '.join(CATEGORIES)}"
        raise InputError(msg)
    scenario = {"cross-data": "cross", "few_shot": "few-shot"}.get(scenario or "", scenario)
    if scenario is not None and scenario not in SCENARIOS:
        msg = f"unknown scenario {scenario!r}; use one of {', '.join(SCENARIOS)}"
        raise InputError(msg)
    where = "status = 'complete' AND strategy <> 'predict'"
    if category is not None:
        where += f" AND category = '{category}'"  # checked against CATEGORIES above
    df = summarise(store, where=where)
    df = df[df["metric"] == metric].copy()
    if df.empty:
        return pd.DataFrame()
    runs = store.query(
        "SELECT run_id, created_at, COALESCE(TRY_CAST(json_extract(spec, '$.shots') AS INTEGER), 0) AS shots, "
        "COALESCE(TRY_CAST(json_extract(spec, '$.prevalence') AS DOUBLE), 0) AS prevalence_set FROM eval_runs"
    )
    df = df.merge(runs, on="run_id", how="left")
    df["scenario"] = df.apply(_scenario, axis=1)
    if scenario == "few-shot":
        df = df[df["shots"] > 0]
    elif scenario is not None:
        df = df[(df["protocol"] == scenario) & (df["shots"] == 0)]
    if df.empty:
        return pd.DataFrame()
    # one run per candidate and seed (the latest; a rerun with other head parameters replaces it)
    df = df.sort_values("created_at").drop_duplicates(
        [*_GROUP, "model", "strategy", "head", "seed"], keep="last"
    )
    n_runs = df.groupby([*_GROUP, "model", "strategy", "head"], dropna=False).size().rename("n_runs")
    rows: list[dict[str, Any]] = []
    for key, g in df.groupby([*_GROUP, "model", "strategy", "head"], sort=False, dropna=False):
        s = seed_summary(g).iloc[0]
        per_seed = g["mean"].dropna()
        row = {**dict(zip([*_GROUP, "model", "strategy", "head"], key, strict=True)), "mean": s["mean"],
               "ci_low": s["ci_low"], "ci_high": s["ci_high"], "interval_over": "seeds", "n_seeds": int(s["n_seeds"]),
               "n_runs": int(n_runs.loc[key]), "n_folds": int(g["n_folds"].sum()), "baseline": s["baseline"],
               "degenerate": bool(g["degenerate"].any())}  # fmt: skip
        if (
            len(per_seed) >= 2 and np.ptp(per_seed.to_numpy(dtype=float)) == 0
        ):  # seeds are not replicates here
            lo, hi, n = _fold_interval(store, g["run_id"].iloc[-1], metric)
            row.update(ci_low=lo, ci_high=hi, interval_over=f"{n} folds (seeds identical)")
        rows.append(row)
    out = pd.DataFrame(rows).sort_values([*_GROUP, "mean"], ascending=[True] * len(_GROUP) + [False])
    out["rank"] = out.groupby(_GROUP, dropna=False).cumcount() + 1
    return out.reset_index(drop=True)


def _verdict(best: pd.Series, nxt: pd.Series | None, min_seeds: int) -> str:
    """Empty string when the evidence holds, else the reason it does not."""
    if best["n_seeds"] < min_seeds:
        return f"{best['n_seeds']} seed(s); need ≥ {min_seeds} (evaluate --seeds 0,1,2)"
    if best["degenerate"]:
        return "the best run is degenerate (one class called, or MCC ≈ 0)"
    if not np.isfinite(best["ci_low"]):
        return "no interval (fewer than 2 defined values)"
    if best["ci_low"] <= best["baseline"]:
        return f"interval reaches the baseline {best['baseline']:.3f}"
    if nxt is None:
        return "only one model/head evaluated"
    bar = nxt["ci_high"] if np.isfinite(nxt["ci_high"]) else nxt["mean"]
    if best["ci_low"] <= bar:
        return f"intervals overlap with {nxt['model']}/{nxt['head']}"
    return ""


def recommend(
    store: Store,
    *,
    category: str | None = None,
    scenario: str | None = None,
    metric: str = "auroc",
    min_seeds: int = 3,
) -> pd.DataFrame:
    """One recommendation (or ``not enough evidence``) per category value and scenario.

    Parameters
    ----------
    store
        The store.
    category, scenario, metric
        As in :func:`candidates`.
    min_seeds
        Fewest seeds the best candidate needs.

    Returns
    -------
    pandas.DataFrame
        One row per group: the group columns, ``recommendation`` (``model/head``, with the strategy
        when not frozen, or ``not enough evidence``), ``reason`` (why not; empty when recommended),
        ``best, mean, ci_low, ci_high, interval_over, n_seeds, n_runs, baseline, over_baseline``
        (mean − baseline), ``next, next_mean, next_ci_low, next_ci_high, over_next`` (mean − next mean;
        NaN without a second candidate), ``n_candidates``. Empty when no run matches.

    Raises
    ------
    InputError
        Bad metric, category or scenario, or ``min_seeds`` < 2.
    """
    if min_seeds < 2:
        msg = f"min_seeds={min_seeds}: an interval over seeds needs at least 2"
        raise InputError(msg)
    cand = candidates(store, category=category, scenario=scenario, metric=metric)
    if cand.empty:
        return pd.DataFrame()
    rows = []
    for key, g in cand.groupby(_GROUP, sort=True, dropna=False):
        best = g.iloc[0]
        nxt = g.iloc[1] if len(g) > 1 else None

        def name(r: pd.Series) -> str:
            return f"{r['model']}/{r['head']}" + (
                "" if r["strategy"] in ("frozen", None) else f" ({r['strategy']})"
            )

        reason = _verdict(best, nxt, min_seeds)
        rows.append({**dict(zip(_GROUP, key, strict=True)), "recommendation": NOT_ENOUGH if reason else name(best),
                     "reason": reason, "metric": metric, "best": name(best), "mean": best["mean"],
                     "ci_low": best["ci_low"], "ci_high": best["ci_high"], "interval_over": best["interval_over"],
                     "n_seeds": best["n_seeds"], "n_runs": best["n_runs"], "baseline": best["baseline"],
                     "over_baseline": best["mean"] - best["baseline"],
                     "next": name(nxt) if nxt is not None else "", "next_mean": nxt["mean"] if nxt is not None else np.nan,
                     "next_ci_low": nxt["ci_low"] if nxt is not None else np.nan,
                     "next_ci_high": nxt["ci_high"] if nxt is not None else np.nan,
                     "over_next": best["mean"] - nxt["mean"] if nxt is not None else np.nan,
                     "n_candidates": len(g)})  # fmt: skip
    return pd.DataFrame(rows)


def _ci(mean: float, lo: float, hi: float) -> str:
    if not np.isfinite(mean):
        return "—"
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else f"{mean:.3f} [—]"


def report_table(store: Store, *, metric: str = "auroc") -> pd.DataFrame:
    """The recommendation as the report shows it: one row per category value and scenario.

    Returns
    -------
    pandas.DataFrame
        ``category, value, scenario, recommendation, best, <METRIC> [95% CI], seeds, runs, vs baseline,
        next, vs next, why not`` (empty without complete runs).
    """
    df = recommend(store, metric=metric)
    if df.empty:
        return df
    return pd.DataFrame({
        "category": df["category"], "value": df["value"], "scenario": df["scenario"],
        "recommendation": df["recommendation"], "best": df["best"],
        f"{metric.upper()} [95% CI]": [_ci(m, lo, hi) for m, lo, hi in zip(df["mean"], df["ci_low"], df["ci_high"], strict=True)],
        "seeds": df["n_seeds"], "runs": df["n_runs"], "vs baseline": df["over_baseline"].round(3),
        "next": df["next"], "vs next": df["over_next"].round(3), "why not": df["reason"],
    })  # fmt: skip


def format_recommendation(df: pd.DataFrame) -> str:
    """The CLI table: one line per group, then each "not enough evidence" reason and a legend."""
    if df.empty:
        return "(no complete evaluation runs match; run `scdrugmap evaluate --seeds 0,1,2` first)"
    metric = df["metric"].iloc[0].upper()
    table = pd.DataFrame({
        "category": df["category"], "value": df["value"], "scenario": df["scenario"],
        "recommendation": df["recommendation"], f"best {metric} [95% CI]": [
            _ci(m, lo, hi) for m, lo, hi in zip(df["mean"], df["ci_low"], df["ci_high"], strict=True)],
        "seeds": df["n_seeds"], "runs": df["n_runs"],
        "vs baseline": [f"{v:+.3f}" for v in df["over_baseline"]],
        "next": [f"{n} {_ci(m, lo, hi)}" if n else "—"
                 for n, m, lo, hi in zip(df["next"], df["next_mean"], df["next_ci_low"], df["next_ci_high"], strict=True)],
        "vs next": [f"{v:+.3f}" if np.isfinite(v) else "—" for v in df["over_next"]],
    })  # fmt: skip
    with pd.option_context("display.max_rows", 500, "display.max_columns", 20, "display.width", 250):
        lines = [table.to_string(index=False)]
    notes = [
        f"  {r['value']} · {r['scenario']}: {r['best']} — {r['reason']}"
        for _, r in df.iterrows()
        if r["reason"]
    ]
    odd = sorted({r["interval_over"] for _, r in df.iterrows() if r["interval_over"] != "seeds"})
    if notes:
        lines += [f"{NOT_ENOUGH}:", *notes]
    lines.append(
        "Interval: 95 % t-interval over seeds (per-seed fold means)"
        + (f"; over folds where {', '.join(odd)}" if odd else "")
        + ". Recommended only with enough seeds, an interval above the constant baseline and not overlapping the next's."
    )
    return "\n".join(lines)

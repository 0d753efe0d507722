"""Train/test partitions, computed once and persisted in the catalog.

- ``pooled``: stratified k-fold cross-validation (default k = 10) within one category value
  (e.g. ``tissue = 'Cell line'``), as scDrugMap's pooled-data evaluation. ``grouping="sample"``
  uses :class:`sklearn.model_selection.StratifiedGroupKFold` so every cell of a sample is on
  one side of every split; ``grouping="cell"`` (:class:`~sklearn.model_selection.StratifiedKFold`)
  reproduces the paper's cell-level splits.
- ``cross``: leave-one-study-out within the category value (cross-data evaluation).
- ``external``: one fold — train on the datasets of the category value matching ``train_where``
  (default the primary collection), test on those matching ``test_where`` (default: the others,
  e.g. the validation / external collection). Training-only cells have fold ``-1``.

Pooled grouping: ``patient`` (default when patient ids exist: cells of one donor, across the
datasets that share patients, stay on one side), else ``sample`` (dataset + sample id), else
``cell``. Cells without a patient id fall back to their sample, then to themselves.

A fold set is identified by (protocol, category, value, grouping, k, seed, the set of
cells); every model and head evaluated on that key reads the same persisted partition.
Each cell is in the test side of exactly one fold.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Literal

import numpy as np
import pandas as pd

from scdrugmap.store.catalog import Store
from scdrugmap.store.errors import InputError

__all__ = ["CATEGORIES", "FoldSet", "FoldSpec", "category_values", "get_fold_set", "labelled_cells"]

log = logging.getLogger(__name__)

#: dataset fields that can define a category
CATEGORIES = (
    "tissue",
    "cancer_type",
    "drug",
    "drug_class",
    "regimen",
    "source",
    "collection",
    "technology",
    "study",
    "dataset_id",
)
Protocol = Literal["pooled", "cross", "external"]
Grouping = Literal["patient", "sample", "cell", "study"]
DEFAULT_TRAIN = "collection = 'primary'"


@dataclass(frozen=True)
class FoldSpec:
    """What a fold set is computed from (``k`` is ignored for ``cross``)."""

    protocol: Protocol
    category: str
    value: str
    grouping: Grouping
    k: int = 10
    seed: int = 0
    train_where: str = ""
    test_where: str = ""

    def key(self) -> dict[str, object]:
        """The fields that identify the fold set (external selections only when set)."""
        out = asdict(self)
        for f in ("train_where", "test_where"):
            if not out[f]:
                del out[f]
        return out


@dataclass(frozen=True)
class FoldSet:
    """A persisted partition.

    Attributes
    ----------
    fold_set_id
        Catalog key.
    cells
        DataFrame with ``cell_uid``, ``label``, ``fold`` (test fold), ``group``, ``study``.
    fold_names
        One name per fold (held-out study for ``cross``; ``fold0`` … for ``pooled``).
    """

    fold_set_id: str
    spec: FoldSpec
    cells: pd.DataFrame
    fold_names: list[str]


def _check_category(category: str) -> None:
    if category not in CATEGORIES:
        msg = f"unknown category {category!r}; choose one of: {', '.join(CATEGORIES)}"
        raise InputError(msg)


def category_values(store: Store, category: str) -> list[str]:
    """Values of ``category`` among datasets that have labelled cells, sorted."""
    _check_category(category)
    df = store.query(
        f"SELECT DISTINCT d.{category} AS v FROM datasets d JOIN cells c USING (dataset_id) "
        f"WHERE c.label IS NOT NULL AND d.{category} IS NOT NULL ORDER BY v"
    )
    return [str(v) for v in df["v"]]


def labelled_cells(store: Store, category: str, value: str) -> pd.DataFrame:
    """Labelled cells of the datasets whose ``category`` equals ``value``, ordered by ``cell_uid``.

    Returns
    -------
    pandas.DataFrame
        ``cell_uid``, ``label``, ``dataset_id``, ``sample_id``, ``study``.

    Raises
    ------
    InputError
        Unknown category, or no labelled cell has that value.
    """
    _check_category(category)
    df = store.query(
        f"SELECT c.cell_uid, c.label, c.dataset_id, c.sample_id, c.patient_id, "
        "COALESCE(d.study, d.dataset_id) AS study "
        f"FROM cells c JOIN datasets d USING (dataset_id) WHERE d.{category} = ? AND c.label IS NOT NULL "
        "ORDER BY c.cell_uid",
        [value],
    )
    if df.empty:
        present = category_values(store, category)
        msg = f"no labelled cells with {category} = {value!r}; values with labelled cells: {present}"
        raise InputError(msg)
    return df


def default_grouping(cells: pd.DataFrame) -> Grouping:
    """``"patient"`` when patient ids exist, else ``"sample"`` when sample ids exist, else ``"cell"``."""
    if cells["patient_id"].notna().any():
        return "patient"
    return "sample" if cells["sample_id"].notna().any() else "cell"


def group_keys(cells: pd.DataFrame, grouping: Grouping) -> np.ndarray:
    """The split unit of every cell: its patient, sample (dataset/sample), study or the cell itself.

    ``cell`` grouping still returns sample keys (used to show that cell-level splits cut samples);
    heads that split internally get the cell uids instead (:func:`classify.evaluate`).
    """
    own = "cell/" + cells["cell_uid"].astype(str)
    sample_key = cells["dataset_id"].astype(str) + "/" + cells["sample_id"].astype("string").fillna("")
    sample = np.where(cells["sample_id"].notna(), sample_key, own)
    if grouping == "patient":
        return np.where(cells["patient_id"].notna(), "patient/" + cells["patient_id"].astype(str), sample)
    if grouping == "study":
        return ("study/" + cells["study"].astype(str)).to_numpy()
    return sample


def _sample_level_labels(cells: pd.DataFrame) -> bool:
    with_sample = cells[cells["sample_id"].notna()]
    if with_sample.empty:
        return False
    per = with_sample.groupby(["dataset_id", "sample_id"])["label"].agg(["nunique", "size"])
    return bool((per["nunique"] == 1).all() and (per["size"] > 1).any())


def _compute(spec: FoldSpec, cells: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = (cells["label"] == "sensitive").to_numpy().astype(int)
    if spec.protocol == "external":
        return cells["fold"].to_numpy(dtype=np.int64), [
            f"external: {spec.test_where or 'NOT (' + DEFAULT_TRAIN + ')'}"
        ]
    if spec.protocol == "cross":
        studies = sorted(cells["study"].unique())
        if len(studies) < 2:
            msg = (
                f"cross-data evaluation needs ≥ 2 studies with {spec.category} = {spec.value!r}, found {studies}; "
                "use --protocol pooled or another category"
            )
            raise InputError(msg)
        index = {s: i for i, s in enumerate(studies)}
        return cells["study"].map(index).to_numpy(dtype=np.int64), [str(s) for s in studies]
    counts = np.bincount(y, minlength=2)
    if counts.min() == 0:
        msg = f"{spec.category} = {spec.value!r} has only {'sensitive' if counts[1] else 'resistant'} cells; pooled CV needs both classes"
        raise InputError(msg)
    folds = np.empty(len(cells), dtype=np.int64)
    if spec.grouping in ("sample", "patient"):
        groups = cells["group"].to_numpy()
        n_groups = [len(set(groups[y == c])) for c in (0, 1)]
        if min(n_groups) < spec.k:
            msg = (
                f"{spec.category} = {spec.value!r} has {n_groups[1]} sensitive and {n_groups[0]} resistant "
                f"{spec.grouping}s, fewer than k = {spec.k}; use a smaller --k or a finer --group"
            )
            raise InputError(msg)
        splitter = StratifiedGroupKFold(n_splits=spec.k, shuffle=True, random_state=spec.seed)
        splits = splitter.split(np.zeros(len(y)), y, groups)
    else:
        if counts.min() < spec.k:
            msg = f"{spec.category} = {spec.value!r} has {counts.min()} cells in its smaller class, fewer than k = {spec.k}; use a smaller --k"
            raise InputError(msg)
        splits = StratifiedKFold(n_splits=spec.k, shuffle=True, random_state=spec.seed).split(
            np.zeros(len(y)), y
        )
    for i, (_, test) in enumerate(splits):
        folds[test] = i
    return folds, [f"fold{i}" for i in range(spec.k)]


def get_fold_set(
    store: Store,
    *,
    protocol: Protocol,
    category: str,
    value: str,
    grouping: Grouping | None = None,
    k: int = 10,
    seed: int = 0,
    train_where: str = "",
    test_where: str = "",
) -> FoldSet:
    """Load the persisted fold set for this key, computing and storing it the first time.

    Parameters
    ----------
    store
        The store.
    protocol
        ``"pooled"``, ``"cross"`` or ``"external"``.
    category, value
        Dataset field and value defining the cell population.
    grouping
        ``"patient"`` / ``"sample"`` / ``"cell"``; default patient when patient ids exist, else
        sample when sample ids exist (``cross`` always groups by study).
    k, seed
        Folds and seed of the pooled CV.
    train_where, test_where
        ``external`` only: SQL conditions on ``datasets`` columns selecting the training and the
        test datasets of the value (default ``collection = 'primary'`` and everything else).

    Raises
    ------
    InputError
        Bad category/value, too few samples/studies/cells for the requested split.
    """
    if protocol not in ("pooled", "cross", "external"):
        msg = f"unknown protocol {protocol!r}; use pooled, cross or external"
        raise InputError(msg)
    if k < 2:
        msg = f"k must be ≥ 2, got {k}"
        raise InputError(msg)
    if protocol != "external" and (train_where or test_where):
        msg = "train/test selections apply only to --protocol external"
        raise InputError(msg)
    cells = labelled_cells(store, category, value)
    grouping = grouping or default_grouping(cells)
    if grouping not in ("patient", "sample", "cell", "study"):
        msg = f"unknown grouping {grouping!r}; use patient, sample or cell"
        raise InputError(msg)
    if protocol == "cross":
        k, grouping = 0, "study"
    elif protocol == "external":
        k = 0
        cells = _external_sides(store, cells, train_where, test_where, what=f"{category} = {value!r}")
    elif grouping == "study":
        msg = "study-level splits are --protocol cross (leave one study out)"
        raise InputError(msg)
    elif grouping == "cell" and _sample_level_labels(cells):
        log.warning(
            "cell-level splits on sample-level labels (%s = %r): cells of one sample land on both sides, "
            "which inflates metrics; use --group sample",
            category,
            value,
        )
    cells["group"] = group_keys(cells, grouping)
    spec = FoldSpec(protocol, category, str(value), grouping, int(k), int(seed), train_where, test_where)
    cells_hash = hashlib.sha256(cells["cell_uid"].to_numpy(dtype=np.int64).tobytes()).hexdigest()[:16]
    key = json.dumps({**spec.key(), "cells": cells_hash}, sort_keys=True)
    fold_set_id = "fs-" + hashlib.sha256(key.encode()).hexdigest()[:16]
    stored = store.query("SELECT fold_names FROM fold_sets WHERE fold_set_id = ?", [fold_set_id])
    if not stored.empty:
        folds = store.query(
            "SELECT cell_uid, fold FROM folds WHERE fold_set_id = ? ORDER BY cell_uid", [fold_set_id]
        )
        cells["fold"] = folds["fold"].to_numpy(dtype=np.int64)
        return FoldSet(fold_set_id, spec, cells, json.loads(stored["fold_names"].iloc[0]))
    fold, names = _compute(spec, cells)
    cells["fold"] = fold
    cells = cells.reset_index(drop=True)
    with store.transaction() as con:
        con.execute(
            "INSERT INTO fold_sets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                fold_set_id,
                protocol,
                category,
                str(value),
                grouping,
                int(k),
                int(seed),
                len(cells),
                len(names),
                json.dumps(names),
                cells_hash,
                datetime.now(UTC).replace(tzinfo=None),
            ],
        )
        rows = pd.DataFrame({"fold_set_id": fold_set_id, "cell_uid": cells["cell_uid"], "fold": fold})
        con.register("_folds", rows)
        con.execute("INSERT INTO folds SELECT * FROM _folds")
        con.unregister("_folds")
    return FoldSet(fold_set_id, spec, cells, names)


def _external_sides(
    store: Store, cells: pd.DataFrame, train_where: str, test_where: str, *, what: str
) -> pd.DataFrame:
    """Cells of the training (fold -1) and test (fold 0) datasets; others dropped."""
    train_sql = train_where or DEFAULT_TRAIN
    test_sql = test_where or f"NOT ({train_sql})"
    ids = set(cells["dataset_id"])
    sides = {}
    for side, cond in (("train", train_sql), ("test", test_sql)):
        try:
            got = store.query(f"SELECT dataset_id FROM datasets WHERE COALESCE(({cond}), FALSE)")
        except Exception as exc:
            msg = f"bad --{side}-where {cond!r}: {str(exc).splitlines()[0]}"
            raise InputError(msg) from exc
        sides[side] = set(got["dataset_id"]) & ids
        if not sides[side]:
            msg = f"external protocol: no dataset of {what} matches the {side} selection {cond!r}"
            raise InputError(msg)
    both = sorted(sides["train"] & sides["test"])
    if both:
        msg = f"external protocol: datasets {both} match both the train and the test selection"
        raise InputError(msg)
    keep = cells["dataset_id"].isin(sides["train"] | sides["test"]).to_numpy()
    cells = cells.loc[keep].reset_index(drop=True)
    cells["fold"] = np.where(cells["dataset_id"].isin(sides["test"]), 0, -1)
    return cells

"""Scatter embedding over worker processes or a Ray cluster: chunk-aligned shards, one writer per chunk.

The store's embedding array has one row per ``cell_uid`` and chunks of full width, so a shard is
the pending cells of one Zarr chunk: the worker that embeds it is that chunk's only writer. Workers
read the store's dataset copies and write their chunk; they never open the DuckDB catalog. The
driver (:func:`embedder.runner.embed_datasets`) marks a shard's cells done in the catalog when
the worker returns them, so a rerun after a killed worker or driver redoes only unmarked shards —
the Census pattern for Geneformer embeddings (shards scattered to one-GPU tasks writing one shared
array keyed by cell id).

Backends (:func:`make_executor`):

- ``local`` — a :class:`concurrent.futures.ProcessPoolExecutor` (``spawn``) of ``workers`` processes
  on this machine; each loads the model once and uses ``threads`` intra-op threads.
- ``ray`` — Ray core actors (``ray.util.ActorPool``): one actor per worker holds the loaded model
  (``num_gpus=1`` each when the cluster has GPUs) and embeds the shards it is given; ``address``
  joins a running cluster, none starts a local one with ``workers`` CPUs. Actors rather than Ray
  Data's ``map_batches``: a shard's unit is a Zarr chunk whose rows the worker writes itself, which
  is exactly an actor call, and no dataset needs to be materialised in Ray's object store.

A shard embeds each dataset's cells of the chunk in one call, exactly the batches the single-process
runner forms, so per-cell models give the same array.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from scdrugmap.store.errors import InputError, StoreError

__all__ = ["EXECUTORS", "EmbedJob", "Executor", "Shard", "embed_shard", "make_executor", "plan_shards"]

ExecutorKind = Literal["local", "ray"]
EXECUTORS: tuple[str, ...] = ("local", "ray")


@dataclass(frozen=True)
class EmbedJob:
    """What a worker needs to rebuild the embedder and find the array (picklable).

    Attributes
    ----------
    store_path
        The store directory.
    model, checkpoint, options
        Arguments of :func:`embedder.load_embedder` (``device`` resolved per worker).
    revision
        The embedding revision (its array and, for fitted embedders, ``fits/<revision>.npz``).
    threads
        Intra-op threads of each worker (torch and BLAS).
    """

    store_path: str
    model: str
    checkpoint: str | None
    options: dict[str, Any]
    revision: str
    threads: int = 1


@dataclass(frozen=True)
class Shard:
    """The pending cells of one Zarr chunk, grouped by dataset.

    Attributes
    ----------
    chunk
        Chunk index (rows ``chunk * chunk_rows`` … ``(chunk + 1) * chunk_rows - 1``).
    parts
        ``((dataset_id, cell_uids int64 sorted), …)`` in dataset order.
    """

    chunk: int
    parts: tuple[tuple[str, np.ndarray], ...] = field(compare=False)

    @property
    def n_cells(self) -> int:
        """Cells in the shard."""
        return int(sum(len(u) for _, u in self.parts))


def plan_shards(pending: pd.DataFrame, chunk_rows: int) -> list[Shard]:
    """Split pending cells into chunk-aligned shards.

    Parameters
    ----------
    pending
        Columns ``dataset_id`` and ``cell_uid`` (int64): the cells still to embed.
    chunk_rows
        Rows per chunk of the target array.

    Returns
    -------
    list of Shard
        One per chunk holding pending cells, in chunk order.
    """
    if pending.empty:
        return []
    df = pending.assign(chunk=pending["cell_uid"].to_numpy(np.int64) // int(chunk_rows))
    shards = []
    for chunk, part in df.groupby("chunk", sort=True):
        parts = tuple(
            (str(d), np.sort(g["cell_uid"].to_numpy(np.int64)))
            for d, g in part.groupby("dataset_id", sort=True)
        )
        shards.append(Shard(int(chunk), parts))
    return shards


# -- the worker side --------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _set_threads(threads: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(int(threads))


def _worker_embedder(job: EmbedJob):
    key = repr((job.store_path, job.model, job.checkpoint, sorted(job.options.items()), job.revision))
    if _WORKER.get("key") != key:
        from scdrugmap.embedder import load_embedder
        from scdrugmap.store.catalog import Store

        _set_threads(job.threads)
        emb = load_embedder(job.model, job.checkpoint, **job.options)
        if emb.requires_fit:
            with np.load(Store(job.store_path).fits_dir / f"{job.revision}.npz", allow_pickle=False) as z:
                emb.set_state({k: z[k] for k in z.files})
        _WORKER.clear()
        _WORKER.update(key=key, emb=emb, datasets={})
    return _WORKER["emb"]


def _worker_dataset(job: EmbedJob, dataset_id: str):
    from scdrugmap.embedder.reading import read_dataset
    from scdrugmap.store.catalog import Store

    cache: dict[str, Any] = _WORKER["datasets"]
    if dataset_id not in cache:
        for old, _ in cache.values():
            old.file.close()
        cache.clear()  # one dataset at a time: shards come in chunk (≈ dataset) order
        # backed: a worker holds only the rows of the shard it embeds (embedder.reading)
        adata = read_dataset(Store(job.store_path).dataset_file(dataset_id), dataset_id, backed=True)
        cache[dataset_id] = (adata, pd.Series(np.arange(adata.n_obs), index=adata.obs["cell_uid"].to_numpy()))
    return cache[dataset_id]


def embed_shard(job: EmbedJob, shard: Shard) -> np.ndarray:
    """Embed one shard and write its chunk (this worker is the chunk's only writer).

    Returns
    -------
    numpy.ndarray
        int64 cell_uids written (for the driver to mark done in the catalog).

    Raises
    ------
    StoreError
        A missing dataset copy or array, or an embedder returning the wrong shape.
    """
    from scdrugmap.embedder.reading import rows_in_memory
    from scdrugmap.store.catalog import Store
    from scdrugmap.store.embeddings import open_array, write_rows

    emb = _worker_embedder(job)
    uids, values = [], []
    for dataset_id, part in shard.parts:
        adata, row_of = _worker_dataset(job, dataset_id)
        out = np.asarray(emb.embed(rows_in_memory(adata, row_of.loc[part].to_numpy())), dtype=np.float32)
        if out.shape != (part.size, emb.dim):
            msg = f"{emb.name} returned shape {out.shape}, expected {(part.size, emb.dim)}"
            raise StoreError(msg)
        uids.append(part)
        values.append(out)
    all_uids = np.concatenate(uids)
    arr = open_array(Store(job.store_path), job.model, job.revision, mode="r+")
    write_rows(arr, all_uids, np.concatenate(values))
    return all_uids


# -- executors --------------------------------------------------------------------------------
class Executor:
    """Runs :func:`embed_shard` over shards; yields ``(shard, uids written)`` as they finish."""

    kind: str = ""
    workers: int = 1

    def map(self, job: EmbedJob, shards: Sequence[Shard]) -> Iterator[tuple[Shard, np.ndarray]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers."""

    def describe(self) -> dict[str, Any]:
        """Recorded with the run (the array does not depend on it)."""
        return {"executor": self.kind, "workers": self.workers}


def _init_local_worker(threads: int) -> None:
    _set_threads(threads)


class LocalExecutor(Executor):
    """Worker processes on this machine (``spawn``), each loading the model once."""

    kind = "local"

    def __init__(self, workers: int) -> None:
        self.workers = int(workers)

    def map(self, job: EmbedJob, shards: Sequence[Shard]) -> Iterator[tuple[Shard, np.ndarray]]:
        import multiprocessing as mp
        from concurrent.futures.process import BrokenProcessPool

        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(
            self.workers, mp_context=ctx, initializer=_init_local_worker, initargs=(job.threads,)
        ) as pool:
            todo = iter(shards)
            running = {}
            for shard in todo:  # keep 2 shards per worker in flight
                running[pool.submit(embed_shard, job, shard)] = shard
                if len(running) >= 2 * self.workers:
                    break
            try:
                while running:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in done:
                        shard = running.pop(fut)
                        yield shard, fut.result()
                        nxt = next(todo, None)
                        if nxt is not None:
                            running[pool.submit(embed_shard, job, nxt)] = nxt
            except BrokenProcessPool as exc:
                msg = (
                    "an embedding worker died (killed or out of memory); the shards it finished are recorded — "
                    "rerun the same `scdrugmap embed` command to embed the rest"
                )
                raise StoreError(msg) from exc


class RayExecutor(Executor):
    """Ray core actors holding the model; see the module docstring."""

    kind = "ray"

    def __init__(self, workers: int, *, address: str | None = None) -> None:
        try:
            import ray
        except ImportError as exc:
            msg = "--executor ray needs Ray: pip install 'scdrugmap[ray]' (or pip install ray)"
            raise InputError(msg) from exc
        self.workers = int(workers)
        self.address = address
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=self.workers, **kwargs)
            self._started = True
        self._ray = ray

    def map(self, job: EmbedJob, shards: Sequence[Shard]) -> Iterator[tuple[Shard, np.ndarray]]:
        ray = self._ray
        from ray.util import ActorPool

        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        actor_cls = ray.remote(num_cpus=job.threads, num_gpus=gpus, max_restarts=1, max_task_retries=1)(
            _ShardActor
        )
        actors = [actor_cls.remote(job) for _ in range(self.workers)]
        pool = ActorPool(actors)
        try:
            yield from pool.map_unordered(lambda a, s: a.run.remote(s), list(shards))
        except ray.exceptions.RayError as exc:
            msg = (
                f"a Ray embedding worker failed ({type(exc).__name__}); the shards it finished are recorded — "
                "rerun the same `scdrugmap embed` command to embed the rest"
            )
            raise StoreError(msg) from exc
        finally:
            for a in actors:
                ray.kill(a)

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "address": self.address}


class _ShardActor:
    """A Ray actor: loads the model once, embeds shards."""

    def __init__(self, job: EmbedJob) -> None:
        self.job = job
        _worker_embedder(job)

    def run(self, shard: Shard) -> tuple[Shard, np.ndarray]:
        return shard, embed_shard(self.job, shard)


def make_executor(kind: str, *, workers: int = 1, address: str | None = None) -> Executor:
    """An executor by name.

    Parameters
    ----------
    kind
        ``"local"`` or ``"ray"``.
    workers
        Worker processes (local) or actors (ray), ≥ 1.
    address
        Ray cluster address (``ray`` only); None starts a local Ray with ``workers`` CPUs.

    Raises
    ------
    InputError
        Unknown kind, ``workers`` < 1, an address for ``local``, or Ray not installed.
    """
    if kind not in EXECUTORS:
        msg = f"unknown executor {kind!r}; choose one of: {', '.join(EXECUTORS)}"
        raise InputError(msg)
    if isinstance(workers, bool) or int(workers) < 1:
        msg = f"--workers must be ≥ 1, got {workers!r}"
        raise InputError(msg)
    if kind == "local":
        if address:
            msg = "--address is for --executor ray"
            raise InputError(msg)
        return LocalExecutor(workers)
    return RayExecutor(workers, address=address)

"""Released checkpoints: where they live, and fetching them into the layout each adapter reads.

The registry (``embedder/data/weights.json``; another one via ``registry=`` or
``$SCDRUGMAP_WEIGHTS_REGISTRY``) lists per model the files of its checkpoint directory: ``path`` (in
the adapter's layout), and either ``url`` (downloaded, resumed and verified by
:func:`store.fetch.download`; ``extract: true`` unpacks a tar archive into the directory with tarfile's
``data`` filter) or ``manual`` (where to get it by hand: a Google Drive folder, a time-limited link).
Files go to ``<cache>/weights/<model>/`` (``<cache>`` = ``$SCDRUGMAP_CACHE`` or ``<store>/cache``),
and ``scdrugmap_weights.json`` there records each file's source, size and SHA-256; ``complete`` is true
when every file is in place, and then ``scdrugmap embed --model M`` uses the directory by default.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from scdrugmap.store.errors import InputError
from scdrugmap.store.fetch import download, file_digest

__all__ = [
    "RECORD",
    "WeightsResult",
    "default_checkpoint",
    "fetch_weights",
    "load_registry",
    "weights_dir",
    "weights_status",
]

log = logging.getLogger(__name__)
REGISTRY = Path(__file__).with_name("data") / "weights.json"
RECORD = "scdrugmap_weights.json"


@dataclass
class WeightsResult:
    """What :func:`fetch_weights` did."""

    model: str
    directory: Path
    fetched: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    manual: list[tuple[str, str]] = field(default_factory=list)  # (path, where to get it), still missing

    @property
    def complete(self) -> bool:
        """Every file of the checkpoint is in place."""
        return not self.manual


def load_registry(path: str | Path | None = None) -> dict[str, dict]:
    """``{model: entry}`` of the registry JSON (default ``$SCDRUGMAP_WEIGHTS_REGISTRY`` or the shipped one).

    Raises
    ------
    InputError
        A missing or malformed file, or a file entry with neither ``url`` nor ``manual``.
    """
    path = Path(path or os.environ.get("SCDRUGMAP_WEIGHTS_REGISTRY", "") or REGISTRY)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        msg = f"weights registry {path} is not readable JSON: {exc}"
        raise InputError(msg) from None
    models = {k: v for k, v in data.items() if not k.startswith("_")}
    for model, entry in models.items():
        for f in entry.get("files", []):
            if not f.get("path") or bool(f.get("url")) == bool(f.get("manual")):
                msg = f"weights registry {path.name}: {model} file {f} needs a path and one of url / manual"
                raise InputError(msg)
            if Path(f["path"]).is_absolute() or ".." in Path(f["path"]).parts:
                msg = (
                    f"weights registry {path.name}: {model} path {f['path']!r} must stay inside the directory"
                )
                raise InputError(msg)
    return models


def weights_dir(cache: str | Path, model: str) -> Path:
    """``<cache>/weights/<model>``."""
    return Path(cache) / "weights" / model


def _record(directory: Path) -> dict:
    path = directory / RECORD
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _write_record(directory: Path, record: dict) -> None:
    tmp = directory / f".{RECORD}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, directory / RECORD)


def _extract(archive: Path, directory: Path) -> list[str]:
    """Unpack ``archive`` into ``directory`` (``data`` filter: no absolute paths, links out or devices)."""
    tmp = directory / f".{archive.name}.extract-{os.getpid()}"
    with tarfile.open(archive) as tf:
        tf.extractall(tmp, filter="data")
    names = []
    for top in sorted(tmp.iterdir()):
        target = directory / top.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(top, target)
        names.append(top.name)
    tmp.rmdir()
    return names


def fetch_weights(
    model: str,
    cache: str | Path,
    *,
    registry: str | Path | None = None,
    directory: str | Path | None = None,
    progress: bool = True,
    retries: int = 2,
    timeout: float = 60.0,
    mirror: str | None = None,
    echo=print,
) -> WeightsResult:
    """Download ``model``'s checkpoint files into its directory and record them.

    Files already there and matching their record (size and SHA-256) are kept. Manual files are
    verified and recorded when present; when some are still missing, the record says ``complete: false``
    and :class:`WeightsResult` lists where to get them (the command turns that into an error).

    Raises
    ------
    InputError
        An unknown model, or a download failure (nothing unverified is left under a final name).
    """
    models = load_registry(registry)
    if model not in models:
        msg = f"no released checkpoint of {model!r} is registered; registered: {', '.join(sorted(models))}"
        raise InputError(msg)
    entry = models[model]
    target = Path(directory) if directory else weights_dir(cache, model)
    target.mkdir(parents=True, exist_ok=True)
    record = _record(target)
    files = record.get("files", {})
    res = WeightsResult(model, target)
    for f in entry["files"]:
        path = target / f["path"]
        known = files.get(f["path"], {})
        if f.get("manual"):
            if not path.is_file():
                res.manual.append((f["path"], f["manual"]))
                continue
            digest = file_digest(path)
            if f.get("sha256") and digest != f["sha256"].lower():
                msg = f"{path} has SHA-256 {digest}, the release's is {f['sha256']}; replace it with the released file"
                raise InputError(msg)
            files[f["path"]] = {"source": f["manual"], "size": path.stat().st_size, "sha256": digest}
            res.present.append(f["path"])
            continue
        if (
            f.get("extract")
            and known.get("extracted")
            and all((target / n).exists() for n in known["extracted"])
        ):
            res.present.append(f["path"])
            continue
        size = f.get("size") or (known.get("size") if path.is_file() else None)
        sha = f.get("sha256") or (known.get("sha256") if path.is_file() else None)
        r = download(f["url"], path, size=size, sha256=sha, md5=f.get("md5"), progress=progress,
                     retries=retries, timeout=timeout, mirror=mirror)  # fmt: skip
        item = {"url": r.url, "size": r.size, "sha256": r.sha256}
        (res.present if r.status == "present" else res.fetched).append(f["path"])
        echo(f"{model}: {f['path']} {r.status} ({r.size:,} bytes)")
        if f.get("extract"):
            item["extracted"] = _extract(path, target)
            path.unlink()
        files[f["path"]] = item
    record.update(model=model, release=entry.get("release", ""), home=entry.get("home", ""),
                  license=entry.get("license", ""), files=files, complete=res.complete,
                  updated_at=datetime.now(UTC).isoformat(timespec="seconds"))  # fmt: skip
    _write_record(target, record)
    return res


def weights_status(cache: str | Path, registry: str | Path | None = None) -> list[dict[str, str]]:
    """One line per registered model: release, automatic/manual files, local state and directory."""
    out = []
    for model, entry in sorted(load_registry(registry).items()):
        directory = weights_dir(cache, model)
        rec = _record(directory)
        state = "fetched" if rec.get("complete") else "partial" if rec else "not fetched"
        n_manual = sum(bool(f.get("manual")) for f in entry["files"])
        out.append({"model": model, "files": str(len(entry["files"])), "manual": str(n_manual),
                    "local": state, "home": entry.get("home", "")})  # fmt: skip
    return out


def default_checkpoint(cache: str | Path, model: str) -> Path | None:
    """The fetched directory of ``model`` when its record says complete, else ``None``."""
    directory = weights_dir(cache, model)
    if _record(directory).get("complete"):
        log.info("using the fetched %s checkpoint in %s", model, directory)
        return directory
    return None

"""Resumable, verified HTTP(S) downloads (used by ``collection fetch`` and ``weights fetch``).

One file at a time: bytes go to ``<name>.part`` beside the final name, a partial file is resumed
with an HTTP ``Range`` request (a server that ignores it answers 200 and the download restarts),
and only a file whose size and checksum (SHA-256 or MD5, when known) match is moved into place
with :func:`os.replace`. A checksum or size mismatch removes the partial file and raises: nothing
is ever left under the final name unless it was verified. Progress is a tqdm bar on a terminal and
a few plain lines otherwise. Only ``http``/``https`` URLs are fetched; ``$SCDRUGMAP_MIRROR`` (or
``mirror=``) replaces the scheme and host of every URL, keeping its path, which lets tests and
local mirrors serve the files.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from scdrugmap.store.errors import InputError

__all__ = ["DownloadResult", "cache_root", "download", "file_digest", "mirrored"]

CHUNK = 1 << 20
USER_AGENT = "scdrugmap (https://pypi.org/project/scdrugmap/)"


@dataclass(frozen=True)
class DownloadResult:
    """What :func:`download` did for one file."""

    path: Path
    url: str
    size: int
    sha256: str
    status: str  # "downloaded", "resumed" or "present"


def cache_root(store_path: str | Path) -> Path:
    """``$SCDRUGMAP_CACHE`` when set, else ``<store>/cache`` (downloads of the collection and weights)."""
    env = os.environ.get("SCDRUGMAP_CACHE", "")
    return Path(env) if env else Path(store_path) / "cache"


def mirrored(url: str, mirror: str | None = None) -> str:
    """``url`` with its scheme and host replaced by ``mirror`` (default ``$SCDRUGMAP_MIRROR``)."""
    mirror = mirror if mirror is not None else os.environ.get("SCDRUGMAP_MIRROR", "")
    if not mirror:
        return url
    parts = urlsplit(url)
    return mirror.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        msg = f"refusing to download {url!r}: only http(s) URLs are fetched"
        raise InputError(msg)
    if parts.username or parts.password:
        msg = (
            f"refusing to download {parts.scheme}://…@{parts.hostname}: URLs with credentials are not stored"
        )
        raise InputError(msg)


def _verify(path: Path, *, size: int | None, sha256: str | None, md5: str | None, url: str) -> str:
    """Check size and checksums of ``path``; on a mismatch remove it and raise. Returns its SHA-256."""
    got_size = path.stat().st_size
    problem = None
    if size is not None and got_size != size:
        problem = f"size {got_size:,} bytes, expected {size:,}"
    digest = file_digest(path)
    if problem is None and sha256 and digest != sha256.lower():
        problem = f"SHA-256 {digest}, expected {sha256.lower()}"
    if problem is None and md5 and file_digest(path, "md5") != md5.lower():
        problem = f"MD5 {file_digest(path, 'md5')}, expected {md5.lower()}"
    if problem:
        path.unlink(missing_ok=True)
        msg = f"download of {url} refused: {problem}; the partial file was removed, run the command again"
        raise InputError(msg)
    return digest


class _Progress:
    """tqdm on a terminal, otherwise a plain line at every quarter and at the end."""

    def __init__(self, name: str, total: int | None, done: int, enabled: bool) -> None:
        from scdrugmap.store import progress

        enabled = enabled and progress.enabled()  # `scdrugmap --quiet` hides it too
        self.name, self.total, self.done, self.enabled = name, total, done, enabled
        self.bar = None
        self.next_mark = 0.25
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, desc=name, leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.total and self.done / self.total >= self.next_mark:
            print(f"{self.name}: {self.done / self.total:.0%} of {self.total:,} bytes", file=sys.stderr)
            while self.next_mark <= self.done / self.total:
                self.next_mark += 0.25

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def download(
    url: str,
    dest: str | Path,
    *,
    size: int | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    retries: int = 2,
    mirror: str | None = None,
    opener: Callable[..., object] | None = None,
) -> DownloadResult:
    """Download ``url`` to ``dest`` with resume and verification.

    Parameters
    ----------
    url
        ``http(s)`` URL (rewritten by :func:`mirrored`).
    dest
        Final path; bytes go to ``dest.part`` first.
    size, sha256, md5
        Expected size and checksums (``None`` = unknown; the server's length is then checked).
    progress
        Show a progress bar (terminal) or plain progress lines.
    timeout
        Seconds per network operation.
    retries
        Extra attempts after a dropped connection (each resumes from the bytes already there).
    mirror
        Replace the URL's scheme and host (default ``$SCDRUGMAP_MIRROR``).
    opener
        ``urllib.request.urlopen``-like callable (tests).

    Returns
    -------
    DownloadResult

    Raises
    ------
    InputError
        A non-http(s) URL, an HTTP error, a connection that keeps dropping (the partial file is kept
        for the next run), or a size/checksum mismatch (the partial file is removed).
    """
    url = mirrored(url, mirror)
    _check_url(url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and (size is not None or sha256 or md5):
        try:
            digest = _verify(dest, size=size, sha256=sha256, md5=md5, url=url)
            return DownloadResult(dest, url, dest.stat().st_size, digest, "present")
        except InputError:
            pass  # a stale or damaged file: fetched again below
    part = dest.with_name(dest.name + ".part")
    open_url = opener or urllib.request.urlopen
    resumed = part.exists() and part.stat().st_size > 0
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if have:
            req.add_header("Range", f"bytes={have}-")
        try:
            with open_url(req, timeout=timeout) as resp:
                status = getattr(resp, "status", 200)
                if have and status != 206:  # the server ignored the range: start over
                    have = 0
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                bar = _Progress(dest.name, size or total, have, progress)
                try:
                    with open(part, "ab" if have else "wb") as fh:
                        for block in iter(lambda r=resp: r.read(CHUNK), b""):
                            fh.write(block)
                            bar.update(len(block))
                finally:
                    bar.close()
            if total is not None and part.stat().st_size < total:
                msg = f"connection closed after {part.stat().st_size:,} of {total:,} bytes"
                raise ConnectionError(msg)
            break
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # nothing left to send: the part file may be complete
                break
            msg = f"download of {url} failed: HTTP {exc.code} {exc.reason}"
            raise InputError(msg) from None
        except (
            urllib.error.URLError,
            http.client.HTTPException,
            ConnectionError,
            TimeoutError,
            OSError,
        ) as exc:
            if attempt == retries:
                got = part.stat().st_size if part.exists() else 0
                msg = (
                    f"download of {url} interrupted after {got:,} bytes ({exc}); "
                    "run the command again to resume"
                )
                raise InputError(msg) from None
            time.sleep(min(2.0**attempt, 10.0) * 0.1)
    digest = _verify(part, size=size, sha256=sha256, md5=md5, url=url)
    os.replace(part, dest)
    return DownloadResult(dest, url, dest.stat().st_size, digest, "resumed" if resumed else "downloaded")

"""Exception families raised by scdrugmap.

One exception type per family (input, checkpoint, store), all deriving from
:class:`ScDrugMapError`. Each carries a message that names the bad value and
the fix; the CLI prints it as one line and exits with status 1.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "InputError", "ScDrugMapError", "StoreBusyError", "StoreError"]


class ScDrugMapError(Exception):
    """Base class of every error scdrugmap raises on purpose."""


class InputError(ScDrugMapError, ValueError):
    """Bad user input: a file, an option value, labels, metadata, an AnnData."""


class CheckpointError(ScDrugMapError, ValueError):
    """A model checkpoint directory is missing files, has unexpected keys or shapes."""


class StoreError(ScDrugMapError, RuntimeError):
    """The store (catalog + Zarr) is missing, inconsistent, or asked for absent data."""


class StoreBusyError(StoreError):
    """Another process held the store (its lock or the catalog file) for longer than the wait allowed."""

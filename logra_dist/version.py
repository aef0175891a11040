"""The package version and the versions of the stack an index or a job ran with."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """logra_dist, torch, python and (from package metadata, without importing them) the other
    libraries whose behaviour changes rows or files: recorded in manifests and W&B configs."""
    import torch

    out = {"logra_dist": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for dist_name in ("transformers", "deepspeed", "h5py"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # metadata only: no import
            out[dist_name] = importlib.metadata.version(dist_name)
    return out

"""The package version and the versions of the stack an index or a job ran with."""
from __future__ import annotations

import importlib.metadata
import platform

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """logra_dist, torch, python and (from package metadata, without importing them) the other
    libraries whose behaviour changes rows or files: recorded in manifests and W&B configs."""
    import torch

    out = {"logra_dist": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for dist_name in ("transformers", "deepspeed", "h5py"):
        try:  # metadata only: importing deepspeed just for its version costs seconds
            out[dist_name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out

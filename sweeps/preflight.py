"""Checks made before a sweep starts anything: what would otherwise hang, fail late or leak.

A sweep refuses, with one line, an unknown tracking-URI scheme or a server that does not answer,
a results or store folder that cannot be made, resources a local machine lacks, and a storage
folder others may write to (``resume`` loads Ray's pickles from it); on a cluster it says at once
when a trial asks for more than the cluster has.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from sweeps.spec_files import redact_uri

if TYPE_CHECKING:  # importing the spec loads torch: the store checks answer without it
    from sweeps.spec import SweepSpec

__all__ = [
    "TRACKING_SCHEMES",
    "check_can_create",
    "check_cluster_resources",
    "check_local_resources",
    "check_private",
    "check_tracking_store",
    "private_auth_token",
]

#: the tracking-URI schemes MLflow 3.17 serves (its SQLAlchemy stores' dialects among them)
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def check_tracking_store(uri: str, timeout_s: float = 5.0) -> None:
    """Refuse an unknown URI scheme, and a tracking server that does not answer within ``timeout_s``
    (MLflow's own client retries for minutes), before Ray or any trial starts."""
    import urllib.error
    import urllib.request

    shown = redact_uri(uri)
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        raise ValueError(f"tracking URI {shown}: unknown scheme {scheme!r}; use one of {', '.join(TRACKING_SCHEMES)}")
    if scheme in ("http", "https"):
        from sweeps.tracking import ui_base

        try:
            urllib.request.urlopen(f"{ui_base(uri)}/health", timeout=timeout_s).close()
        except urllib.error.HTTPError:
            pass  # it answered (a proxy without /health, a login page): MLflow's client says more
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ConnectionError(
                f"the tracking server at {shown} does not answer ({reason}) within {timeout_s:g} s: is it running?"
            ) from None


def check_can_create(folder: Path, what: str) -> None:
    """``folder`` exists as a writable folder or can be made: its nearest existing ancestor is a
    writable folder. Checked without creating anything, before any work."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{what}: {folder} cannot be made, {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{what}: {existing} is not writable")


def check_cluster_resources(spec: SweepSpec, log: Callable[[str], None]) -> None:
    """On a cluster, say at once when a trial asks for more than the cluster has now: its trials
    wait for an autoscaler to add nodes (Ray's own warning goes to driver.log only)."""
    import ray

    total = ray.cluster_resources()
    for kind, key in (("cpu", "CPU"), ("gpu", "GPU")):
        asked, has = getattr(spec.resources, kind), total.get(key, 0.0)
        if asked > has:
            log(
                f"warning: a trial asks for {asked:g} {key}s; the cluster has {has:g} now: trials wait until an "
                "autoscaler adds nodes (Ctrl-C stops the sweep; resources in the spec)"
            )


def check_local_resources(spec: SweepSpec) -> None:
    """A local Ray instance has this machine's CPUs and GPUs: a trial that asks for more would wait forever."""
    cpus = os.cpu_count() or 1
    if spec.resources.cpu > cpus:
        raise ValueError(f"resources.cpu: a trial asks for {spec.resources.cpu:g} CPUs; this machine has {cpus}")
    if spec.resources.gpu > 0:
        import torch

        gpus = torch.cuda.device_count()
        if spec.resources.gpu > gpus:
            raise ValueError(f"resources.gpu: a trial asks for {spec.resources.gpu:g} GPUs; this machine has {gpus}")


def private_auth_token() -> None:
    """Ray 2.60's token authentication writes ``~/.ray/auth_token`` readable by everyone (0644);
    whoever reads it can submit code to the cluster: make it the owner's alone."""
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file() and token.stat().st_mode & 0o077:
        token.chmod(0o600)


def check_private(folder: Path) -> None:
    """Refuse to resume from a folder that others may write to: Ray Tune restores its experiment
    state from pickles (``tuner.pkl``), and a pickle planted there would run on ``resume``."""
    import stat

    for path in (folder.parent, folder):
        mode = path.stat().st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise PermissionError(
                f"{path} is writable by its group or by everyone ({stat.filemode(mode)}); resuming loads Ray's pickled "
                f"state from it, so only the sweep's owner may write there: chmod go-w {path}"
            )

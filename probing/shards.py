"""The feature cache's on-disk format: a folder of fixed-size shards and a manifest.

Each shard holds the features of ``shard_rows`` consecutive images as a ``.npy`` file (memory-mapped
when read), written atomically after a ``.json`` beside it with its SHA-256 and the node that
computed it; the manifest, written last, names the
backbone and its weights digest, the data set, split, transform, layer, dtype and the shards. So an
interrupted extraction keeps its finished shards and a rerun computes only the missing ones; a
shard that fails its checksum is rebuilt alone; readers take a folder only once its manifest is
complete, and then hold one batch of rows in memory, never the split.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["MANIFEST", "ShardLayout", "ShardedFeatures", "missing_shards", "read_manifest", "write_manifest", "write_shard"]

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ShardLayout:
    """``n_rows`` rows cut into shards of ``shard_rows`` (the last one shorter)."""

    n_rows: int
    shard_rows: int

    def __len__(self) -> int:
        return max(1, -(-self.n_rows // self.shard_rows))

    def rows(self, index: int) -> tuple[int, int]:
        start = index * self.shard_rows
        return start, min(start + self.shard_rows, self.n_rows)


def shard_file(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.npy"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(folder: Path, index: int, features: torch.Tensor, node: str) -> str:
    """Write one shard atomically (its checksum and ``node`` first, then the data under its final
    name); returns the SHA-256."""
    path = shard_file(folder, index)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, features.detach().cpu().contiguous().numpy(), allow_pickle=False)
    checksum = _sha256(tmp)
    path.with_suffix(".json").write_text(json.dumps({"sha256": checksum, "node": node}))
    os.replace(tmp, path)
    return checksum


def _shard_record(path: Path) -> dict[str, str] | None:
    try:
        return json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None


def missing_shards(folder: Path, layout: ShardLayout, log: Callable[[str], None] = print) -> list[int]:
    """The shards to compute: absent, or failing their checksum (then deleted, with a log line)."""
    missing = []
    for index in range(len(layout)):
        path = shard_file(folder, index)
        if not path.is_file():
            missing.append(index)
            continue
        start, stop = layout.rows(index)
        record = _shard_record(path)
        if record is None or record.get("sha256") != _sha256(path) or len(np.load(path, mmap_mode="r")) != stop - start:
            log(f"feature shard {path} fails its checksum (or holds other rows); rebuilding it")
            path.unlink()
            missing.append(index)
    return missing


def write_manifest(folder: Path, layout: ShardLayout, facts: dict[str, Any]) -> None:
    """The manifest, written atomically once every shard is there: what the features are (backbone,
    digest, data set, split, transform, layer, dtype, ...), their shape and the shards."""
    first = np.load(shard_file(folder, 0), mmap_mode="r")
    shards = [
        {"file": shard_file(folder, i).name, "rows": list(layout.rows(i)), **_shard_record(shard_file(folder, i))}
        for i in range(len(layout))
    ]
    manifest = facts | {"n_rows": layout.n_rows, "shard_rows": layout.shard_rows, "row_shape": list(first.shape[1:]), "shards": shards}
    tmp = folder / f"{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest if it is complete and every shard has the size it names, else None
    (sizes only: reading a trial's features must not hash the whole cache; the extractor does)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for shard in manifest["shards"]:
            array = np.load(folder / shard["file"], mmap_mode="r")
            if len(array) != shard["rows"][1] - shard["rows"][0] or list(array.shape[1:]) != manifest["row_shape"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError):
        return None


class ShardedFeatures:
    """A cache folder's features, indexed like an (N, C, h, w) tensor: rows are read from the
    memory-mapped shards on demand (a slice or an index tensor gives a tensor of those rows)."""

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        self.folder, self.manifest = folder, manifest
        self.shard_rows = manifest["shard_rows"]
        self.dtype = getattr(torch, manifest["dtype"])
        self.shape = (manifest["n_rows"], *manifest["row_shape"])
        self._arrays = [np.load(folder / s["file"], mmap_mode="r") for s in manifest["shards"]]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            return self[torch.tensor([index])][0]
        if isinstance(index, slice):
            index = torch.arange(*index.indices(len(self)))
        index = torch.as_tensor(index).flatten()
        index = torch.where(index < 0, index + len(self), index)  # as a tensor counts from the end
        out = torch.empty((len(index), *self.shape[1:]), dtype=self.dtype)
        shard_of = index // self.shard_rows
        for shard in shard_of.unique().tolist():
            chosen = (shard_of == shard).nonzero().flatten()
            rows = (index[chosen] - shard * self.shard_rows).numpy()
            out[chosen] = torch.from_numpy(self._arrays[shard][rows])  # fancy indexing copies: the map stays read-only
        return out

    def to(self, *args, **kwargs) -> torch.Tensor:
        """All rows as one tensor (small splits and tests; a trial reads batches)."""
        return self[:].to(*args, **kwargs)

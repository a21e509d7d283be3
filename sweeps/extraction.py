"""Feature extraction on the cluster, before any trial starts: Ray Data computes the missing shards
of every backbone's features (:mod:`probing.features`).

One pipeline for all backbones and splits: shard ids -> (with GPUs: tasks on the CPUs that decode
and transform each shard's images ->) the backbone in an actor pool (one actor per GPU; on CPU-only
clusters one per node, holding the node's CPUs and decoding its shards itself) that writes each
shard where every node sees it (``$PROBESWEEP_CACHE``). The driver holds every cache folder's lock
meanwhile, so a second sweep needing the same features waits for this extraction instead of
repeating it, then finds it complete; an interrupted extraction leaves its finished shards, and the
next one computes only the missing ones (and those that fail their checksum).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import ExitStack
from typing import Any, Callable

import numpy as np
import torch

from probing.backbones import create_backbone
from probing.datasets import create_dataset
from probing.devices import trial_device
from probing.features import FeatureJob, cached_features, compute_features, feature_cache_path, features_lock, plan_features
from probing.shards import write_shard
from sweeps.spec import SweepSpec

__all__ = ["extract_features", "extract_features_here"]


def _decode_shard(batch: dict[str, np.ndarray], jobs: list[dict[str, Any]], images: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ray Data task: a shard id -> its images, decoded and transformed (float32 in [0, 1])."""
    job = jobs[int(batch["job"][0])]
    start, stop = job["rows"][int(batch["shard"][0])]
    try:
        decoded = images[job["split"]][start:stop].numpy()[None]
    except (ValueError, OSError) as err:  # bad input (an unreadable image): to the driver as data,
        # since Ray Data's wrapping keeps only the traceback's text of an exception
        kind = "ValueError" if isinstance(err, ValueError) else "OSError"
        return batch | {"images": np.zeros((1, 0, 3, 1, 1), np.float32), "error": np.array([f"{kind}: {err}"])}
    return batch | {"images": decoded, "error": np.array([""])}


class _ExtractShards:
    """Ray Data actor: a shard's images -> the backbone's features, written as that shard. With
    ``images`` (the splits' lazy image lists) it decodes the shard itself from its id."""

    def __init__(self, jobs: list[dict[str, Any]], device: str, threads: int, images: dict[str, Any] | None = None):
        import ray

        torch.set_num_threads(threads)  # this actor's process: the CPUs it holds
        self.jobs, self.device, self.images = jobs, trial_device(device), images
        self.node = ray.get_runtime_context().get_node_id()
        self.backbones: dict[int, Any] = {}

    def _backbone(self, job: dict[str, Any]):
        key = job["backbone_key"]
        if key not in self.backbones:
            backbone = create_backbone(job["backbone"], log=lambda m: None, **job["options"]).to(self.device)
            if backbone.digest != job["digest"]:  # a node whose cache pre-trained other weights
                raise RuntimeError(
                    f"node {self.node} has backbone {job['backbone']} with weights {backbone.digest}, the driver "
                    f"{job['digest']}: put $PROBESWEEP_CACHE on storage every node sees"
                )
            self.backbones[key] = backbone
        return self.backbones[key]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.images is not None:
            batch = _decode_shard(batch, self.jobs, self.images)
        done = {"job": batch["job"], "shard": batch["shard"], "node": np.array([self.node]), "error": batch["error"]}
        if batch["error"][0]:
            return done
        job = self.jobs[int(batch["job"][0])]
        images = torch.from_numpy(batch["images"][0])
        features = compute_features(self._backbone(job), images, precision=job["precision"]).to(getattr(torch, job["dtype"]))
        write_shard(job["folder"], int(batch["shard"][0]), features, self.node)
        return done


def _cached_splits(spec: SweepSpec) -> list[str]:
    """The splits whose features trials read (with augment, the train split goes through the backbone each epoch)."""
    return ["val"] if spec.train.augment else ["train", "val"]


def extract_features(spec: SweepSpec, log: Callable[[str], None] = print, shard_rows: int | None = None) -> int:
    """Complete the feature caches every trial of ``spec`` reads (Ray must be initialised), in shards
    of ``shard_rows`` images (default: the spec's ``features.shard_rows``); returns the number of
    shards computed. Every shard of a complete cache is checked against its SHA-256."""
    dataset, dtype, precision = spec.data.dataset, getattr(torch, spec.train.feature_dtype), spec.features.precision
    splits = {name: create_dataset(dataset, name, **spec.data.options()) for name in _cached_splits(spec)}
    wanted = []
    for key, entry in enumerate(spec.backbones):
        backbone = create_backbone(entry.name, log=log, **entry.options())
        for name, split in splits.items():
            wanted.append((feature_cache_path(backbone, split, dataset, name, dtype, precision), key, entry, backbone, name, split))
    with ExitStack() as locks:
        jobs: list[tuple[FeatureJob, dict[str, Any]]] = []
        for folder, key, entry, backbone, name, split in sorted(wanted, key=lambda w: str(w[0])):  # one lock order for every driver
            locks.enter_context(features_lock(folder, log))
            job = plan_features(backbone, split, dataset, name, dtype, precision, True, shard_rows or spec.features.shard_rows, log)
            if job is not None:
                described = {
                    "backbone": entry.name, "options": entry.options(), "backbone_key": key, "digest": backbone.digest,
                    "split": name, "folder": job.folder, "dtype": spec.train.feature_dtype, "precision": precision,
                    "rows": [job.layout.rows(i) for i in range(len(job.layout))],
                }  # fmt: skip
                jobs.append((job, described))
        shards = [{"job": j, "shard": i} for j, (job, _) in enumerate(jobs) for i in job.missing]
        if jobs:
            log(f"extracting features on the cluster: {len(shards)} shards of {len(jobs)} caches ({', '.join(j.folder.parent.name + '/' + j.folder.name.split('-')[1] for j, _ in jobs)})")
        if shards:
            _run(shards, [d for _, d in jobs], {name: split.images for name, split in splits.items()}, spec, log)
        for job, _ in jobs:
            job.finish()
    return len(shards)


def extract_features_here(spec: SweepSpec, log: Callable[[str], None] = print) -> None:
    """The same caches as :func:`extract_features`, computed in this process without Ray (benchmarks
    that must start from warm caches)."""
    dtype = getattr(torch, spec.train.feature_dtype)
    for entry in spec.backbones:
        backbone = create_backbone(entry.name, log=log, **entry.options())
        for name in _cached_splits(spec):
            split = create_dataset(spec.data.dataset, name, **spec.data.options())
            cached_features(
                backbone, split, spec.data.dataset, name, log=log, dtype=dtype, precision=spec.features.precision,
                shard_rows=spec.features.shard_rows,
            )  # fmt: skip


def _run(shards: list[dict[str, int]], jobs: list[dict[str, Any]], images: dict[str, Any], spec: SweepSpec, log) -> None:
    import ray

    gpu = spec.resources.gpu > 0 and spec.train.device != "cpu"
    # on GPUs: a backbone actor per GPU; on CPUs: one per node, with its CPUs but a decoding task's quarter
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
    if gpu:
        extractors, extract_cpus = max(1, int(ray.cluster_resources().get("GPU", 0))), 1.0
    else:
        extractors, extract_cpus = max(1, len(nodes)), max(1.0, min(nodes or [1.0]))
    context, data_log = ray.data.DataContext.get_current(), logging.getLogger("ray.data")
    # a line per shard instead of Ray Data's bars, its log in its own file only, and every backbone
    # actor up before the first shard (else the first one up can take them all); all put back below
    bars, level, wait = context.enable_progress_bars, data_log.level, context.wait_for_min_actors_s
    context.enable_progress_bars, context.wait_for_min_actors_s = False, 600
    data_log.setLevel(logging.CRITICAL)
    try:
        _pipeline(shards, jobs, images, gpu, (extractors, extract_cpus), log)
    finally:
        context.enable_progress_bars, context.wait_for_min_actors_s = bars, wait
        data_log.setLevel(level)


def _pipeline(shards, jobs, images, gpu: bool, extraction: tuple[int, float], log) -> None:
    import ray

    dataset = ray.data.from_items(shards, override_num_blocks=len(shards))
    # The actors' arguments (the jobs) live in the object store, where a restarted actor may not find
    # them (ray-project/ray#53727): a lost actor fails the extraction instead, and the next run
    # resumes it at the missing shards.
    with warnings.catch_warnings():  # Ray 2.60 takes max_restarts only as a keyword it says 2.64 removes
        warnings.simplefilter("ignore", DeprecationWarning)
        # On GPUs: decoding in CPU tasks, as many at once as CPUs allow, decoded shards queueing up
        # for every GPU's actor. On CPUs the backbone actor holds its node's cores and decodes its
        # shards itself: measured on 2 cores, tasks beside it took the same cores, added their
        # workers' start and a copy through the object store (docs/performance-notes.md).
        if gpu:
            dataset = dataset.map_batches(_decode_shard, fn_kwargs={"jobs": jobs, "images": images}, batch_size=1, num_cpus=0.25)
        extractors, extract_cpus = extraction
        dataset = dataset.map_batches(
            _ExtractShards, batch_size=1, num_cpus=extract_cpus, num_gpus=1 if gpu else 0, max_restarts=0,
            fn_constructor_kwargs={
                "jobs": jobs, "device": "cuda" if gpu else "cpu", "threads": max(1, round(extract_cpus)),
                "images": None if gpu else images,
            },
            compute=ray.data.ActorPoolStrategy(size=extractors),
        )  # fmt: skip
    decoding = "" if gpu else ", decoding its shards"
    log(f"  {extractors} backbone actor(s) of {extract_cpus:g} CPU{' and 1 GPU' if gpu else ''} each{decoding}")
    for done, row in enumerate(dataset.iter_rows(), 1):
        if row["error"]:  # the first bad input ends the extraction; the shards written so far stay
            kind, message = str(row["error"]).split(": ", 1)
            raise (ValueError if kind == "ValueError" else OSError)(message)
        log(f"  features: {done}/{len(shards)} shards (node {str(row['node'])[:8]})")

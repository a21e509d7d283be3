"""A tracker that keeps a trial's results in a folder instead of an MLflow run: what a plain
loop of one's own does (the benchmark's baseline, the tests, a notebook).

    from sweeps.folder_tracker import FolderTracker
    from sweeps.trial import run_trial

    tracker = FolderTracker(Path("results/trial_0"))
    scores = run_trial(config, tracker)

Params, tags and metrics are kept in memory (``params``, ``tags``, ``metrics``) and written to
``run.json`` by :meth:`flush`; figures are saved as PNG files as MLflow's ``log_figure`` saves
them, texts and files are copied under their artifact names.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

__all__ = ["FolderTracker"]


class FolderTracker:
    """Implements ``sweeps.trial.Tracker`` on a folder. ``seconds`` counts the time spent writing."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.previous_status: str | None = None  # a folder holds one session of a trial
        self.complete = False
        self.seconds = 0.0
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.metrics: dict[str, dict[int, float]] = {}  # name -> step -> value

    def _path(self, artifact_file: str) -> Path:
        path = self.folder / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _write(self, write, *args) -> None:
        start = time.perf_counter()
        write(*args)
        self.seconds += time.perf_counter() - start

    def latest_metrics(self) -> dict[str, float]:
        return {name: steps[max(steps)] for name, steps in self.metrics.items()}

    def last_step(self, metric: str) -> int:
        return max(self.metrics.get(metric, {0: 0.0}))

    def log_params(self, params: dict[str, str]) -> None:
        self.params.update(params)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int, later: bool = False) -> None:
        for name, value in metrics.items():
            self.metrics.setdefault(name, {})[step] = float(value)

    def flush(self) -> None:
        record = {"params": self.params, "tags": self.tags, "metrics": self.metrics}
        self._write(self._path("run.json").write_text, json.dumps(record, indent=1))

    def log_figure(self, figure, artifact_file: str, key: str | None = None) -> bool:
        import matplotlib.pyplot as plt

        try:
            self._write(figure.savefig, self._path(artifact_file))
        finally:
            plt.close(figure)
        return True

    def log_text(self, text: str, artifact_file: str) -> bool:
        self._write(self._path(artifact_file).write_text, text)
        return True

    def log_artifact(self, local_path, artifact_path: str | None = None) -> bool:
        target = Path(artifact_path or "") / Path(local_path).name
        self._write(shutil.copy, local_path, self._path(str(target)))
        return True

"""The answer on a sweep's parent run, where the MLflow UI shows it: the best value of each
objective as a metric (``best/<objective>``), a markdown results table as the run's description
(best first, each score with its 95% interval, the probes linked to their runs, the Pareto front
and the paired effects), and as artifacts ``summary.csv``, ``pareto.json``, ``pareto.png``,
``parallel.png`` and ``importance.png`` (:mod:`sweeps.study_figures`), ``effects.csv``,
``effects.png``, ``agreement.csv`` and ``agreement-<metric>.png``, and the probes side by side:
``compare/aggatt-*.png`` and ``compare/examples-*.png``."""

from __future__ import annotations

import json
from typing import Callable, Sequence

from mlflow import MlflowClient

from sweeps.effects import Effect
from sweeps.report import (
    SweepAnalysis, analysis_files, cell, front_rows, metric_columns, pareto_figure, sort_rows, summary_csv, sweep_analysis, trial_rows,
    value_of,
)  # fmt: skip
from sweeps.study_figures import importance_figure, parallel_figure
from sweeps.tracking import quiet_downloads, run_url

__all__ = ["DESCRIPTION_TAG", "best_values", "log_sweep_summary", "results_markdown"]

DESCRIPTION_TAG = "mlflow.note.content"  # what the MLflow UI shows as a run's description
MAX_DESCRIPTION = 8000  # MLflow's limit for a tag's value
SHOWN = ("backbone", "loss", "head", "status", "val/accuracy", "grids")


def best_values(rows: Sequence[dict[str, object]], objectives: dict[str, str]) -> dict[str, float]:
    """``best/<objective>``: each objective's best value over the finished trials (in its
    direction); an objective no finished trial has is left out."""
    finished = [r for r in rows if str(r["status"]).startswith("FINISHED")]
    best = {}
    for metric, mode in objectives.items():
        values = [v for v in (value_of(r, metric) for r in finished) if v is not None]
        if values:
            best[f"best/{metric}"] = max(values) if mode == "max" else min(values)
    return best


def _markdown_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    def row(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [row(header), row(["---"] * len(header)), *(row(cells) for cells in lines)]


def results_markdown(
    rows: Sequence[dict[str, object]], objectives: dict[str, str], effects: Sequence[Effect], links: dict[str, str], title: str
) -> str:
    """The sweep's results as markdown (rows best first, ``links``: run id -> its UI page). Within
    MLflow's 8,000 characters: the rows that do not fit are left out, and it says so."""
    rows = sorted(rows, key=lambda r: not str(r["status"]).startswith("FINISHED"))  # a failed trial's partial scores come last
    named = ", ".join(f"{m} ({d})" for m, d in objectives.items())
    scores = metric_columns(rows)
    front = front_rows(list(rows), objectives)
    failed = sum(str(r["status"]).startswith("FAILED") for r in rows)

    def probe(row):
        return f"[{row.get('_name') or row['trial']}]({links.get(str(row['_run_id']), '')})"

    def table(shown_rows):
        return _markdown_table(
            ["probe", *SHOWN, *scores],
            [[probe(r), *(cell(r.get(c), (r.get("_ci") or {}).get(c)) for c in (*SHOWN, *scores))] for r in shown_rows],
        )

    head = [f"### {title}: {len(rows)} trials" + (f", {failed} failed" if failed else ""), "",
            f"Finished trials best first by {named}; a score reads `mean [95% interval over the grids]`.", ""]  # fmt: skip
    tail = ["", "**Pareto front**: " + (", ".join(probe(r) for r in front) or "none (no finished trial)")]
    if effects:
        tail += ["", "**Paired effects** (mean difference per grid, 95% interval; * Holm-adjusted p < 0.05):", ""]
        tail += _markdown_table(
            ["effect", "backbone", "score", "difference", "95% interval", "p (Holm)"],
            [[e.label, e.backbone, e.score, f"{e.mean:+.3f}{' *' if e.significant else ''}", f"[{e.low:+.3f}, {e.high:+.3f}]",
              f"{e.p_holm:.3g}"] for e in effects],
        )  # fmt: skip
    tail += ["", "Figures: `pareto.png`, `parallel.png`, `importance.png`, `effects.png`, `agreement-<metric>.png`, the probes' AggAtt and examples side by side under `compare/`; every trial and interval: `summary.csv` (this run's artifacts)."]
    for shown in range(len(rows), -1, -1):  # as many rows as fit, best first
        note = table(rows[:shown]) + (["", f"*{len(rows) - shown} more in `summary.csv`*"] if shown < len(rows) else [])
        text = "\n".join(head + note + tail)
        if len(text) <= MAX_DESCRIPTION:
            return text
    return text[:MAX_DESCRIPTION]


def log_comparisons(client: MlflowClient, parent_run_id: str, rows: Sequence[dict[str, object]], shared: dict[str, str]) -> list[str]:
    """Put the probes of ``rows`` side by side, a column each in ``rows``' order: for every
    (metric, method, layer) their AggAtt (from ``aggatt/<metric>-<method>-<layer>.npz``) as
    ``compare/aggatt-<...>.png``, and their explanations of the same grids or rows (from
    ``examples/<...>.npz``) as ``compare/examples-<...>.png``, on the parent run. Returns the
    figures' names."""
    import tempfile
    from pathlib import Path

    import matplotlib.pyplot as plt

    from evaluation.aggatt import comparison_figure, examples_comparison_figure, load_aggatt, load_examples
    from evaluation.metrics import METRICS

    kinds = {"aggatt": load_aggatt, "examples": load_examples}
    stored: dict[tuple[str, str], list] = {}
    with tempfile.TemporaryDirectory() as folder, quiet_downloads():
        for row in rows:
            run_id = str(row["_run_id"])
            for kind, load in kinds.items():
                for artifact in client.list_artifacts(run_id, kind):
                    if artifact.path.endswith(".npz"):
                        local = client.download_artifacts(run_id, artifact.path, str(Path(folder) / run_id))
                        stored.setdefault((kind, Path(artifact.path).stem), []).append((str(row.get("_name") or row["trial"]), load(local)))
    logged = []
    for (kind, key), probes in sorted(stored.items()):
        metric, shown = key.split("-", 1)[0], key.replace("-", "/")
        if kind == "aggatt":
            grid = None if metric in METRICS and METRICS.get(metric).protocol == "boxes" else int(shared.get("evaluate.grid", 0)) or None
            figure = comparison_figure(probes, f"{shown}: AggAtt of the sweep's probes", grid)
        else:
            figure = examples_comparison_figure(probes, f"{shown}: explanations")
        if figure is not None:  # (examples: None when the probes share none)
            client.log_figure(parent_run_id, figure, f"compare/{kind}-{key}.png")
            plt.close(figure)
            logged.append(f"compare/{kind}-{key}.png")
    return logged


def log_sweep_summary(
    uri: str, parent_run_id: str, objectives: dict[str, str], title: str = "", log: Callable[[str], None] = print
) -> tuple[list[dict[str, object]], SweepAnalysis]:
    """Log the sweep's answer to its parent run (see the module docstring); a part that cannot be
    made (stored rows or bins a store cannot serve) is left out, with a line to ``log``. Returns
    the front and the analysis of the stored scores (for the printed report: read once)."""
    import matplotlib.pyplot as plt

    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    experiment_id = parent.info.experiment_id
    started = trial_rows(uri, parent_run_id, list(objectives))  # in the order the trials started
    rows = sort_rows(started, objectives)
    front = front_rows(rows, objectives)
    links = {str(r["_run_id"]): run_url(uri, experiment_id, str(r["_run_id"])) for r in rows}
    client.log_text(parent_run_id, summary_csv(rows), "summary.csv")
    listed = [
        {"trial": r["trial"], "name": r["_name"], "run_id": r["_run_id"], "url": links[str(r["_run_id"])], **{m: value_of(r, m) for m in objectives}}
        for r in front
    ]  # fmt: skip
    client.log_text(parent_run_id, json.dumps({"objectives": objectives, "front": listed}, indent=2), "pareto.json")
    for name, value in best_values(rows, objectives).items():
        client.log_metric(parent_run_id, name, value)
    figures = {"pareto.png": pareto_figure(rows, objectives, "Pareto front") if rows else None,
               "parallel.png": parallel_figure(rows, objectives), "importance.png": importance_figure(rows, objectives)}  # fmt: skip
    for name, figure in figures.items():
        if figure is not None:  # (parallel coordinates and importances need two finished trials and a varied factor)
            client.log_figure(parent_run_id, figure, name)
            plt.close(figure)
    try:
        analysis = sweep_analysis(uri, parent_run_id)
    except Exception as err:  # noqa: BLE001 (the answer is logged without them)
        log(f"the sweep's paired effects and agreement are left out of its summary: {err}")
        analysis = SweepAnalysis()
    for name, content in analysis_files(analysis).items():
        if isinstance(content, str):
            client.log_text(parent_run_id, content, name)
        else:
            client.log_figure(parent_run_id, content, name)
            plt.close(content)
    try:
        log_comparisons(client, parent_run_id, [r for r in started if str(r["status"]).startswith("FINISHED")], parent.data.params)
    except Exception as err:  # noqa: BLE001 (the answer is logged without them)
        log(f"the side-by-side figures are left out of the sweep's summary: {err}")
    note = results_markdown(rows, objectives, analysis.effects, links, title or f"sweep {parent.info.run_name}")
    client.set_tag(parent_run_id, DESCRIPTION_TAG, note)
    return front, analysis

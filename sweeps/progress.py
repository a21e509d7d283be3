"""What a running sweep shows: a line when a trial starts or resumes, its epochs as they are
reported (Ray gets a report with each checkpoint, at most every ``train.checkpoint_every_s``)
with an ETA for the trial and for the sweep, and a line when it finishes, is stopped early or
fails (saying where its error is). On a terminal a live table of the trials (rich) sits below
the lines; in a log file or pipe the lines alone, a trial's epoch line at most every
:data:`PLAIN_EVERY_S`.

:class:`Board` keeps the trials' state and does the arithmetic (a clock is passed in: it is
tested on made-up times); :func:`progress_callback` is the Ray Tune callback that feeds it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Board", "PLAIN_EVERY_S", "duration", "progress_callback"]

PLAIN_EVERY_S = 60.0  # between two epoch lines of a trial, where no live table shows them


def duration(seconds: float | None) -> str:
    """``45 s``, ``12 min``, ``2 h 05 min``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


@dataclass
class TrialState:
    label: str
    started: float  # on the board's clock, in this session of the sweep
    from_epoch: int  # the epochs it had when it (re)started
    epoch: int = 0
    status: str = "RUNNING"
    last_line: float = -math.inf
    seconds: float | None = None  # how long it ran, once it ended


@dataclass
class Board:
    """The trials of a sweep of ``total`` trials of ``epochs`` epochs each."""

    total: int
    epochs: int
    clock: Callable[[], float] = time.monotonic
    trials: dict[str, TrialState] = field(default_factory=dict)

    def start(self, trial_id: str, label: str, from_epoch: int = 0) -> str:
        self.trials[trial_id] = TrialState(label, self.clock(), from_epoch, from_epoch)
        how = f"resumes at epoch {from_epoch}/{self.epochs}" if from_epoch else "starts"
        return f"[{self._ended()}/{self.total}] {trial_id} {label} {how} ({self._running()} running)"

    def result(self, trial_id: str, epoch: int, every_s: float = 0.0) -> str | None:
        """Record an epoch; its line, or None when the trial's last line is under ``every_s`` old."""
        state = self.trials[trial_id]
        state.epoch = epoch
        now = self.clock()
        if now - state.last_line < every_s:
            return None
        state.last_line = now
        return (
            f"    {trial_id} {state.label}: epoch {epoch}/{self.epochs}, {duration(now - state.started)}, "
            f"ETA {duration(self.trial_eta(trial_id))} | sweep ETA {duration(self.sweep_eta())}"
        )

    def end(self, trial_id: str, status: str, epoch: int | None = None) -> None:
        """The trial ended (``FINISHED``, ``FAILED``) at ``epoch`` (default: its last reported)."""
        state = self.trials[trial_id]
        state.status, state.seconds = status, self.clock() - state.started
        state.epoch = state.epoch if epoch is None else epoch

    def trial_eta(self, trial_id: str) -> float | None:
        """Training time left: the trial's pace so far over the epochs it has left (the explanation
        after its last epoch is not in it)."""
        state = self.trials[trial_id]
        done = state.epoch - state.from_epoch
        if state.status != "RUNNING":
            return 0.0
        return None if done <= 0 else (self.clock() - state.started) / done * (self.epochs - state.epoch)

    def sweep_eta(self) -> float | None:
        """Time left for the sweep: the running trials' ETAs and, for the trials not started, the
        mean length of a whole trial (those that ran from epoch 0 to the end, else the running
        ones' pace), over as many at a time as run now."""
        running = [t for t, s in self.trials.items() if s.status == "RUNNING"]
        whole = [s.seconds for s in self.trials.values() if s.status == "FINISHED" and s.from_epoch == 0 and s.seconds]
        paces = [(self.clock() - self.trials[t].started) / (self.trials[t].epoch - self.trials[t].from_epoch)
                 for t in running if self.trials[t].epoch > self.trials[t].from_epoch]  # fmt: skip
        per_trial = sum(whole) / len(whole) if whole else (sum(paces) / len(paces) * self.epochs if paces else None)
        left = [self.trial_eta(t) for t in running]
        waiting = self.total - len(self.trials)
        if per_trial is None or None in left:
            return None if waiting or left else 0.0
        return (sum(left) + waiting * per_trial) / max(1, len(running))

    def _ended(self) -> int:
        return sum(s.status != "RUNNING" for s in self.trials.values())

    def _running(self) -> int:
        return sum(s.status == "RUNNING" for s in self.trials.values())

    def table(self):
        """A rich Table of the trials: status, epoch n/N, elapsed, ETA; the sweep's ETA in its title."""
        from rich.table import Table

        now = self.clock()
        table = Table(title=f"{self._ended()}/{self.total} trials ended, {self._running()} running, sweep ETA {duration(self.sweep_eta())}")
        for column in ("trial", "probe", "status", "epoch", "elapsed", "ETA"):
            table.add_column(column, justify="right" if column in ("epoch", "elapsed", "ETA") else "left")
        for trial_id, s in self.trials.items():
            elapsed = s.seconds if s.seconds is not None else now - s.started
            eta = duration(self.trial_eta(trial_id)) if s.status == "RUNNING" else "-"
            table.add_row(trial_id, s.label, s.status, f"{s.epoch}/{self.epochs}", duration(elapsed), eta)
        return table


def progress_callback(total: int, epochs: int, log: Callable[[str], None], on_end: Callable[[dict], None], live=False):
    """The Ray Tune callback of a sweep: the board's lines through ``log``; with ``live`` (True:
    stderr, or a rich Console) a live table of the trials below them, the lines printed above it;
    ``on_end`` gets ``{trial id: (Ray status, last epoch)}`` when the experiment ends (both ways
    out: finished or interrupted)."""
    from ray import tune

    from sweeps.report import grids_label, is_localisation_score
    from sweeps.settings import head_label

    def label(config) -> str:
        return f"{config['backbone']['name']} {config['loss']} {head_label(config['head'])}"

    class Progress(tune.Callback):
        def __init__(self):
            self.board = Board(total, epochs)
            # what Ray reported through on_trial_complete/error: (Ray status, last epoch) by trial id.
            # Trial.status alone cannot tell: Ray marks the trials it stops on Ctrl-C TERMINATED too.
            self.ended: dict[str, tuple[str, int]] = {}
            self.live = None

        def __getstate__(self):  # Ray pickles its callbacks with the experiment state: not the terminal
            return {**self.__dict__, "live": None}

        def _say(self, line: str | None) -> None:
            if line is None:
                return
            if self.live is not None:
                self.live.console.print(line, highlight=False, soft_wrap=True)
                self.live.refresh()
            else:
                log(line)

        def on_trial_start(self, iteration, trials, trial, **info):
            if live and self.live is None:
                from rich.console import Console
                from rich.live import Live

                # drawn anew at each refresh: elapsed times and ETAs move between reports too
                console = live if isinstance(live, Console) else Console(stderr=True)
                self.live = Live(get_renderable=self.board.table, console=console, refresh_per_second=1, transient=True)
                self.live.start()
            self._say(self.board.start(trial.trial_id, label(trial.config), int((trial.last_result or {}).get("epoch", 0))))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if trial.trial_id in self.board.trials and "epoch" in result and result["epoch"] < epochs:
                line = self.board.result(trial.trial_id, int(result["epoch"]), every_s=0.0 if self.live else PLAIN_EVERY_S)
                if self.live is not None:  # the table shows every epoch; the lines only say what changed
                    self.live.refresh()
                else:
                    self._say(line)

        def _status(self, trials, trial, failed_now: bool) -> str:
            """`` | running R, failed F, best val acc X (trial)`` over all trials, this one counted as ended."""
            others = [t for t in trials if t is not trial]
            running = sum(t.status == "RUNNING" for t in others)
            failed = sum(t.status == "ERROR" for t in others) + failed_now
            finished = [t for t in others if t.status == "TERMINATED"] + ([] if failed_now else [trial])
            scored = [(t.last_result["val/accuracy"], t.trial_id) for t in finished if "val/accuracy" in (t.last_result or {})]
            best = f", best val acc {max(scored)[0]:.3f} ({max(scored)[1]})" if scored else ""
            return f" | running {running}, failed {failed}{best}, sweep ETA {duration(self.board.sweep_eta())}"

        def _done(self, trials, trial) -> int:
            # counted from the trials' states, so that a resumed sweep counts its earlier trials
            ended = {"TERMINATED", "ERROR"}
            return sum(t.status in ended for t in trials) + (trial.status not in ended)

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            self.ended[trial.trial_id] = ("TERMINATED", int(result.get("epoch", 0)))
            if trial.trial_id in self.board.trials:
                self.board.end(trial.trial_id, "FINISHED", int(result.get("epoch", epochs)))
            stopped = f"stopped early at epoch {result['epoch']}, " if result.get("epoch", epochs) < epochs else ""
            scores = ", ".join(f"{k} {v:.3f}" for k, v in sorted(result.items()) if is_localisation_score(k) and not math.isnan(v))
            counted = [f"{grids_label(result)} grids"] if "grids/count" in result else []  # "34 top-1 grids": confident on none
            counted += [f"{int(result['epg/rows'])} epg"] if "epg/rows" in result else []
            self._say(
                f"[{self._done(trials, trial)}/{total}] {trial.trial_id} {label(trial.config)}: {stopped}"
                f"val acc {result.get('val/accuracy', float('nan')):.3f}" + "".join(f", {c}" for c in counted)
                + (f", {scores}" if scores else "") + self._status(trials, trial, failed_now=False)
            )  # fmt: skip

        def on_trial_error(self, iteration, trials, trial, **info):
            self.ended[trial.trial_id] = ("ERROR", int((trial.last_result or {}).get("epoch", 0)))
            if trial.trial_id in self.board.trials:
                self.board.end(trial.trial_id, "FAILED")
            self._say(
                f"[{self._done(trials, trial)}/{total}] {trial.trial_id} FAILED: see {trial.local_path or trial.path}/error.txt"
                + self._status(trials, trial, failed_now=True)
            )

        def on_experiment_end(self, trials, **info):
            if self.live is not None:
                self.live.stop()
                self.live = None
            on_end(self.ended)

    return Progress()

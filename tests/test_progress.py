"""The progress of a running sweep on made-up times: start lines, epoch lines with the trial's and
the sweep's ETA, the live table; the lines of a real sweep are in tests/test_e2e.py."""

from rich.console import Console

from sweeps.progress import Board, duration


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_etas_follow_the_pace_of_the_trials():
    clock = Clock()
    board = Board(total=3, epochs=10, clock=clock)
    assert board.start("a", "sup ce linear") == "[0/3] a sup ce linear starts (1 running)"
    assert board.start("b", "sup bce linear", from_epoch=4) == "[0/3] b sup bce linear resumes at epoch 4/10 (2 running)"
    assert board.sweep_eta() is None  # no epoch yet: no pace
    clock.now += 20
    line = board.result("a", 2)
    # a: 10 s an epoch, 8 epochs left
    assert board.trial_eta("a") == 80 and "epoch 2/10, 20 s, ETA 80 s" in line
    assert board.result("a", 3, every_s=60) is None  # a line at most every 60 s, the epoch still counts
    assert board.trials["a"].epoch == 3
    clock.now += 10
    board.result("b", 5)  # b: 30 s for its 1 epoch since it resumed, 5 left
    assert board.trial_eta("b") == 150
    # a: 30 s for 3 epochs, 7 left: 70 s; c waits for a whole trial at the running pace: the mean of
    # 10 and 30 s an epoch over 10 epochs; two at a time
    assert board.trial_eta("a") == 70
    assert board.sweep_eta() == (70 + 150 + 200) / 2
    board.end("a", "FINISHED")
    # a ran 30 s from epoch 0 to its end: a whole trial takes 30 s
    assert board.trial_eta("a") == 0 and board.sweep_eta() == (150 + 30) / 1


def test_the_live_table_has_a_row_per_trial_and_the_sweeps_eta_in_its_title():
    clock = Clock()
    board = Board(total=2, epochs=4, clock=clock)
    board.start("a", "sup ce linear")
    board.start("b", "sup bce linear")
    clock.now += 8
    board.result("a", 2)
    board.end("b", "FAILED")
    console = Console(width=200, record=True)
    console.print(board.table())
    text = console.export_text()
    assert "1/2 trials ended, 1 running, sweep ETA 8 s" in text
    rows = [" ".join(line.replace("│", " ").split()) for line in text.splitlines()]
    assert "a sup ce linear RUNNING 2/4 8 s 8 s" in rows and "b sup bce linear FAILED 0/4 8 s -" in rows


def test_durations_read_as_a_person_says_them():
    assert [duration(s) for s in (None, float("nan"), 4.4, 89, 90, 3000, 5400, 7500)] == [
        "?", "?", "4 s", "89 s", "2 min", "50 min", "1 h 30 min", "2 h 05 min"
    ]  # fmt: skip


def test_the_ray_callback_says_when_trials_start_advance_end_and_fail():
    from types import SimpleNamespace

    from sweeps.progress import progress_callback

    lines, ended = [], {}
    callback = progress_callback(2, 4, lines.append, ended.update, live=False)
    config = {"backbone": {"name": "sup"}, "loss": "bce", "head": {"type": "linear"}}
    good = SimpleNamespace(trial_id="t1", config=config, last_result=None, status="RUNNING")
    bad = SimpleNamespace(trial_id="t2", config=config, last_result={"epoch": 1}, status="RUNNING", local_path="/r/t2", path="/r/t2")
    trials = [good, bad]
    callback.on_trial_start(0, trials, good)
    callback.on_trial_start(0, trials, bad)  # restored from its checkpoint at epoch 1
    callback.on_trial_result(0, trials, good, {"epoch": 1})
    callback.on_trial_result(0, trials, good, {"epoch": 2})  # under a minute after the last line: none
    good.last_result, good.status = {"epoch": 4, "val/accuracy": 0.9, "gridpg/ixg/input": 0.5}, "TERMINATED"
    callback.on_trial_complete(0, trials, good)
    callback.on_trial_error(0, trials, bad)
    callback.on_experiment_end(trials)
    assert lines[0] == "[0/2] t1 sup bce linear starts (1 running)"
    assert lines[1] == "[0/2] t2 sup bce linear resumes at epoch 1/4 (2 running)"
    assert lines[2].startswith("    t1 sup bce linear: epoch 1/4,") and "ETA" in lines[2]
    assert lines[3].startswith("[1/2] t1 sup bce linear: val acc 0.900, gridpg/ixg/input 0.500 | running 1, failed 0")
    assert lines[4].startswith("[2/2] t2 FAILED: see /r/t2/error.txt | running 0, failed 1")
    assert len(lines) == 5 and ended == {"t1": ("TERMINATED", 4), "t2": ("ERROR", 1)}


def test_on_a_terminal_the_lines_print_above_a_live_table_of_the_trials():
    from types import SimpleNamespace

    from sweeps.progress import progress_callback

    terminal = Console(record=True, force_terminal=True, width=140)
    logged = []
    callback = progress_callback(2, 4, logged.append, lambda ended: None, live=terminal)
    config = {"backbone": {"name": "sup"}, "loss": "bce", "head": {"type": "linear"}}
    first = SimpleNamespace(trial_id="t1", config=config, last_result=None, status="RUNNING")
    trials = [first]
    callback.on_trial_start(0, trials, first)
    callback.on_trial_result(0, trials, first, {"epoch": 1})
    callback.on_trial_result(0, trials, first, {"epoch": 2})  # on the table at once, no line
    shown = terminal.export_text(clear=False)
    callback.on_experiment_end(trials)
    assert logged == []  # on a terminal everything goes through the live display
    rows = [" ".join(line.replace("│", " ").split()) for line in shown.splitlines()]
    assert "[0/2] t1 sup bce linear starts (1 running)" in rows
    assert any(row.startswith("t1 sup bce linear RUNNING 2/4 ") for row in rows), rows  # epoch progress and its ETA
    assert "0/2 trials ended, 1 running, sweep ETA" in shown
    assert callback.live is None  # stopped: the terminal is the shell's again

"""The progress display: what fits a terminal, plain lines when piped, rates and ETA."""

import io
import re

from rich.cells import cell_len
from rich.console import Console

from wftool.train.progress import ProgressDisplay

TITLE = "small/pretrain"
TRAIN = {"loss": 2.345, "lr": 3e-4, "tok/s": 999.0, "mem_gb": 12.3, "loss_ce": 1.25}
EVAL = {"eval_loss": 2.5, "eval_ppl": 12.18, "eval_accuracy": 0.5}


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _plain(width=80):
    out = io.StringIO()
    return Console(width=width, file=out, force_terminal=False), out


def _frame(display, width):
    """The live line as a terminal `width` cells wide would show it."""
    console = Console(width=width, file=io.StringIO(), record=True, force_terminal=False)
    console.print(display)
    return console.export_text().rstrip("\n")


def _run_steps(display, clock, steps, seconds=1.0, tokens=1000, first=1):
    for step in range(first, first + steps):
        clock.now += seconds
        display.update(step, dict(TRAIN), tokens_seen=step * tokens)


# ---- MetricsLog -----------------------------------------------------------------------------
def test_live_bar_at_80_columns_keeps_step_eta_and_loss():
    console = Console(width=80, force_terminal=True, record=True, file=io.StringIO())
    clock = FakeClock()
    display = ProgressDisplay("bitnet-2b-4t/pretrain", 50, 0, 1, console, tokens_seen=0,
                              clock=clock)
    try:
        _run_steps(display, clock, 12, seconds=2.0)
        display.update(12, EVAL)
    finally:
        display.close()
    # Frames follow each other in the recording; the last one starts at the last title.
    last = "bitnet-2b-4t/pretrain" + console.export_text().rsplit("bitnet-2b-4t/pretrain", 1)[1]
    last = last.rstrip("\n")
    assert "\n" not in last and cell_len(last) <= 80
    assert "12/50" in last and "eta 0:01:16" in last and "loss 2.345" in last
    assert "tok/s 500" in last  # 12,000 tokens over 24 s, not the 999 the steps claimed
    assert "mem_gb" not in last  # low priority: dropped whole, never cut


def test_wider_terminals_show_more_stats_by_priority():
    clock = FakeClock()
    display = ProgressDisplay(TITLE, 50, 0, 1, _plain()[0], tokens_seen=0, clock=clock)
    _run_steps(display, clock, 12)
    display.update(12, EVAL)
    narrow, wide, widest = (_frame(display, w) for w in (80, 120, 200))
    for line, width in ((narrow, 80), (wide, 120), (widest, 200)):
        assert cell_len(line) <= width and "12/50" in line and "eta 0:00:38" in line
    assert "lr" not in narrow and "lr 0.0003" in wide
    assert "eval_loss 2.5" in wide and "eval_ppl" not in wide
    assert all(s in widest for s in ("eval_ppl 12.18", "eval_accuracy 0.5", "loss_ce 1.25",
                                     "mem_gb 12.3"))
    # The bar stays; the elapsed time shows once there is room.
    assert "━" in narrow and "0:00:12 eta" in wide


def test_tiny_terminal_still_keeps_the_essentials():
    clock = FakeClock()
    display = ProgressDisplay("a-very-long-recipe-name/layerwise", 1000, 0, 1, _plain()[0],
                              clock=clock)
    _run_steps(display, clock, 120)
    line = _frame(display, 50)
    assert cell_len(line) <= 50
    assert "120/1000" in line and "eta 0:14:40" in line and "loss 2.345" in line


def test_phase_shows_on_the_bar_and_leaves_the_essentials():
    clock = FakeClock()
    display = ProgressDisplay("bitnet-2b-4t/pretrain", 50, 0, 1, _plain()[0], clock=clock)
    _run_steps(display, clock, 50)
    display.set_phase("saving checkpoint step-50")
    line = _frame(display, 80)
    assert "saving checkpoint step-50" in line
    assert "50/50" in line and "eta 0:00:00" in line and "loss 2.345" in line
    assert cell_len(line) <= 80
    display.set_phase(None)
    assert "saving" not in _frame(display, 80)


# ---- piped output ---------------------------------------------------------------------------
def test_plain_lines_are_never_wrapped():
    console, out = _plain(width=80)
    display = ProgressDisplay(TITLE, 10, 0, 1, console, clock=FakeClock())
    stats = {f"loss_part_{i}": 0.123456 for i in range(12)}
    display.update(1, {"loss": 2.0, **stats})
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and len(lines[0]) > 150
    assert lines[0].startswith(f"{TITLE} step 1/10") and "loss_part_11 0.1235" in lines[0]


def test_plain_lines_every_n_steps_at_the_end_on_eval_and_on_phase_changes():
    console, out = _plain()
    clock = FakeClock()
    display = ProgressDisplay(TITLE, 12, 0, 5, console, clock=clock)
    _run_steps(display, clock, 7)
    display.set_phase("evaluating")
    display.set_phase("evaluating")  # unchanged: no second line
    display.update(7, EVAL)
    display.set_phase(None)
    _run_steps(display, clock, 5, first=8)
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == [
        f"{TITLE} step 5/12", f"{TITLE} step 7/12", f"{TITLE} step 7/12",
        f"{TITLE} step 10/12", f"{TITLE} step 12/12"]
    assert lines[1].endswith("evaluating")
    assert "eval_loss 2.5" in lines[2] and "tok/s" not in lines[2]


# ---- rates -----------------------------------------------------------------------------------
def test_tok_per_s_is_tokens_over_wall_time_across_the_window():
    console, out = _plain()
    clock = FakeClock()
    display = ProgressDisplay(TITLE, 100, 0, 10, console, tokens_seen=0, window=10,
                              clock=clock)
    for step in range(1, 41):
        clock.now += 0.2 if step % 2 else 1.8  # per-step rates jump 5,000 <-> 556
        display.update(step, {"loss": 1.0, "tok/s": 1000 / (0.2 if step % 2 else 1.8)},
                       tokens_seen=1000 * step)
    lines = out.getvalue().splitlines()
    assert all("tok/s 1,000" in line for line in lines), lines
    for step in range(41, 51):
        clock.now += 2.0
        display.update(step, {"loss": 1.0}, tokens_seen=1000 * step)
    # Ten slower steps fill the window: the old rate is forgotten.
    assert "tok/s 500" in out.getvalue().splitlines()[-1]


def test_time_in_phases_counts_for_the_eta_but_not_for_tok_per_s():
    console, out = _plain()
    clock = FakeClock()
    display = ProgressDisplay(TITLE, 20, 0, 1, console, tokens_seen=0, window=20, clock=clock)
    for step in range(1, 11):
        clock.now += 1.0
        display.update(step, {"loss": 1.0}, tokens_seen=1000 * step)
        if step == 5:  # a 30 s evaluation after step 5
            display.set_phase("evaluating")
            clock.now += 30.0
            display.set_phase(None)
    last = out.getvalue().splitlines()[-1]
    assert "tok/s 1,000" in last, last
    assert "eta 0:00:40" in last, last  # 10 steps left at (10 + 30) s per 10 steps


def test_a_given_tok_per_s_is_shown_as_given():
    """The trainer hands the rate of its logging window (what metrics.jsonl records): the
    bar shows that number, not one of its own."""
    clock = FakeClock()
    display = ProgressDisplay(TITLE, 100, 0, 1, _plain()[0], tokens_seen=0, clock=clock)
    for step, rate in enumerate([1475.0, 183.0, 3718.0], start=1):
        clock.now += 1.0
        display.update(step, {"loss": 1.0, "tok/s": rate})
    shown = int(_frame(display, 200).split("tok/s ")[1].split()[0].replace(",", ""))
    assert shown == 3718


def test_eta_follows_the_recent_steps():
    clock = FakeClock()
    display = ProgressDisplay(TITLE, 100, 0, 1, _plain()[0], window=5, clock=clock)
    _run_steps(display, clock, 20, seconds=1.0)
    assert "eta 0:01:20" in _frame(display, 120)  # 80 steps left at 1 s
    _run_steps(display, clock, 10, seconds=3.0, first=21)
    assert "eta 0:03:30" in _frame(display, 120)  # 70 left at the last steps' 3 s


# ---- the end of a run ------------------------------------------------------------------------
def test_finish_prints_one_summary_line_and_close_after_is_safe():
    console, out = _plain()
    clock = FakeClock()
    display = ProgressDisplay(TITLE, 50, 40, 100, console, tokens_seen=40_000, clock=clock)
    _run_steps(display, clock, 10, first=41)
    clock.now += 5.0  # the final eval and save
    display.finish({"eval_loss": 2.25, "eval_ppl": 9.488, "eval_accuracy": 0.625})
    display.close()
    display.finish({"eval_loss": 0.0})
    lines = out.getvalue().splitlines()
    assert lines[:-1] == [line for line in lines if "step 50/50" in line]
    summary = lines[-1]
    assert summary.startswith(f"{TITLE} done: 10 steps (50/50) in 0:00:15")
    assert "mean tok/s 667" in summary  # 10,000 tokens over 15 s of wall time
    assert "eval_loss 2.25" in summary and "eval_ppl 9.488" in summary
    assert "eval_accuracy 0.625" in summary and "done" not in "".join(lines[:-1])


def test_finish_on_a_terminal_stops_the_bar_and_clears_the_phase():
    console = Console(width=100, force_terminal=True, record=True, file=io.StringIO())
    clock = FakeClock()
    display = ProgressDisplay(TITLE, 5, 0, 1, console, tokens_seen=0, clock=clock)
    try:
        _run_steps(display, clock, 5)
        display.set_phase("writing final/")
    finally:
        display.finish({"eval_loss": 2.0})
    display.close()
    text = console.export_text()
    last_frame = text.rsplit(TITLE, 2)[1]
    assert "5/5" in last_frame and "writing final/" not in last_frame
    assert text.rstrip("\n").endswith("mean tok/s 1,000  eval_loss 2")


# ---- W&B ---------------------------------------------------------------------------------------

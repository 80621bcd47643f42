"""Training progress on the terminal: a live line that fits its width, or plain lines when
output is piped."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.text import Text

# Which stats the bar keeps when the terminal is narrow: earlier ones win. Unlisted keys
# come after these, `loss_*` parts first, in the order they were given.
_STAT_PRIORITY = ("loss", "tok/s", "eval_hidden", "eval_loss", "lr", "eval_accuracy", "eval_ppl",
                  "next-token eval_loss")
_GAP = "  "
_BAR_MIN, _BAR_MAX = 10, 40
_TITLE_MIN = _PHASE_MIN = 12


class ProgressDisplay:
    """Training progress: one live line on a terminal, plain lines when output is piped.

    The live line always keeps `step N/M`, the ETA, the phase and the loss, and adds the
    other stats by priority (`tok/s`, `eval_loss`, `lr`, ...) as the console width allows.
    Piped output prints one never-wrapped line every `every` steps, at the last step, when
    eval numbers arrive, and when the phase changes.

    The ETA is a rate over the last `window` steps of wall time, so one slow step (an eval, a
    checkpoint) does not make it jump. tok/s is tokens over the window's training time when
    updates carry `tokens_seen`; otherwise the caller's own `tok/s` stat as given (the
    trainer's: its logging window's rate, the number metrics.jsonl holds). `tokens_seen` at
    construction is the cumulative count when the display starts (after a resume, the
    resumed count); `clock` is injectable for tests.
    """

    def __init__(self, title: str, total: int, start: int, every: int,
                 console: Console | None = None, *, tokens_seen: int | None = None,
                 window: int = 20, clock: Callable[[], float] = time.monotonic):
        self.console = console or Console(stderr=True)
        self.title = title
        self.total = total
        self.every = max(every, 1)
        self.step = start
        self._start = start
        self._clock = clock
        self._t0 = clock()
        # (time, step, cumulative tokens or None, seconds spent in phases so far) at each
        # step; rates come from the ends. Phases (evaluating, saving) count for the ETA but
        # not for tok/s, which measures training.
        self._samples: deque[tuple[float, int, int | None, float]] = deque(
            [(self._t0, start, tokens_seen, 0.0)], maxlen=max(window, 1) + 1)
        self._phase_seconds = 0.0
        self._phase_began: float | None = None
        self._first_tokens = (self._t0, tokens_seen) if tokens_seen is not None else None
        self._rate_given: float | None = None
        self._stats: dict = {}
        self._phase: str | None = None
        self._printed_step: int | None = None
        self._lock = threading.Lock()  # the live thread renders while update() writes
        self._closed = self._finished = False
        self.live = self.console.is_terminal
        self._live: Live | None = None
        if self.live:
            self._live = Live(self, console=self.console, refresh_per_second=4)
            self._live.start()

    # ---- the trainer's calls -----------------------------------------------------------
    def update(self, step: int, stats: dict, tokens_seen: int | None = None) -> None:
        """Record that `step` is done, with its stats (loss, lr, tok/s, eval_* ...).

        `tokens_seen` is the cumulative token count after `step` (also read from
        `stats["tokens"]`); with it, tok/s is tokens over wall time across the window,
        otherwise a moving average of `stats["tok/s"]`. Stats persist until overwritten,
        so eval numbers stay on the bar; calling again with the same step adds stats
        (e.g. eval results) without counting a step."""
        stats = dict(stats)
        if tokens_seen is None and "tokens" in stats:
            tokens_seen = int(stats.pop("tokens"))
        stats.pop("tokens", None)
        now = self._clock()
        with self._lock:
            last_time, last_step, _, last_paused = self._samples[-1]
            if step != last_step:
                self._samples.append((now, step, tokens_seen, self._phase_seconds))
            elif tokens_seen is not None:
                self._samples[-1] = (last_time, step, tokens_seen, last_paused)
            if tokens_seen is not None and self._first_tokens is None:
                self._first_tokens = (self._samples[-1][0], tokens_seen)
            if "tok/s" in stats:
                self._rate_given = float(stats["tok/s"])
            self.step = step
            self._stats.update(stats)
        if self._live is not None:
            if not self._closed:
                self._live.refresh()
            return
        has_eval = any(k.startswith("eval_") for k in stats)
        due = step != self._printed_step and (step % self.every == 0 or step == self.total)
        if due or has_eval:
            self._printed_step = step
            shown = {k: v for k, v in stats.items() if k != "tok/s"}
            rate = self._rate()
            if rate is not None and ("tok/s" in stats or tokens_seen is not None):
                shown["tok/s"] = rate  # the smoothed rate, on lines about training steps
            parts = [f"{self.title} step {step}/{self.total}",
                     *(_format_stat(k, v) for k, v in _by_priority(shown)),
                     f"{_clock_text(self._clock() - self._t0)} eta {_clock_text(self._eta())}"]
            self._print(_GAP.join(parts))

    def set_phase(self, text: str | None) -> None:
        """Show what the run is doing between steps ("evaluating", "saving checkpoint
        step-50"); None returns to training. Piped output gets one line per new phase."""
        now = self._clock()
        with self._lock:
            changed = text != self._phase
            self._phase = text
            if text is not None and self._phase_began is None:
                self._phase_began = now
            elif text is None and self._phase_began is not None:
                self._phase_seconds += now - self._phase_began
                self._phase_began = None
        if self._live is not None:
            if not self._closed:
                self._live.refresh()
        elif text and changed:
            self._print(f"{self.title} step {self.step}/{self.total}{_GAP}{text}")

    def finish(self, summary: dict | None = None) -> None:
        """Stop the bar and print one summary line: steps done, wall time, mean tok/s (tokens
        over wall time), and the numbers in `summary` (eval_loss, eval_ppl, ...; a `tokens`
        entry is taken as the final cumulative token count). Prints once; close() after
        is safe."""
        if self._finished:
            return
        self._finished = True
        with self._lock:
            self._phase = None
        self.close()
        summary = dict(summary or {})
        now = self._clock()
        tokens = summary.pop("tokens", None)
        if tokens is None:
            tokens = next((s[2] for s in reversed(self._samples) if s[2] is not None), None)
        parts = [f"{self.title} done: {self.step - self._start} steps "
                 f"({self.step}/{self.total}) in {_clock_text(now - self._t0)}"]
        if tokens is not None and self._first_tokens is not None:
            since, first = self._first_tokens
            if now > since:
                parts.append(f"mean {_format_stat('tok/s', (tokens - first) / (now - since))}")
        parts += [_format_stat(k, v) for k, v in _by_priority(summary)]
        self._print(_GAP.join(parts))

    def close(self) -> None:
        """Stop the live bar (leaving its last frame); safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._live is not None:
            self._live.stop()

    # ---- rendering -------------------------------------------------------------------------
    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        with self._lock:
            stats = {k: v for k, v in self._stats.items() if k != "tok/s"}
            rate = self._rate()
            if rate is not None:
                stats["tok/s"] = rate
            line = _bar_line(options.max_width, self.title, self.step, self.total,
                             self._clock() - self._t0, self._eta(), self._phase,
                             [_format_stat(k, v) for k, v in _by_priority(stats)],
                             essential=1 if "loss" in stats else 0)
        yield line

    def _rate(self) -> float | None:
        counted = [(t - paused, n) for t, _, n, paused in self._samples if n is not None]
        if len(counted) >= 2 and counted[-1][0] > counted[0][0]:
            return (counted[-1][1] - counted[0][1]) / (counted[-1][0] - counted[0][0])
        return self._rate_given

    def _eta(self) -> float | None:
        (t_first, s_first, *_), (t_last, s_last, *_) = self._samples[0], self._samples[-1]
        if s_last <= s_first:
            return None
        return (t_last - t_first) / (s_last - s_first) * max(self.total - s_last, 0)

    def _print(self, line: str) -> None:
        # soft_wrap: a piped line stays one line whatever the console width.
        self.console.print(Text(line), soft_wrap=True)


def _bar_line(width: int, title: str, step: int, total: int, elapsed: float,
              eta: float | None, phase: str | None, stats: list[str], essential: int) -> Text:
    """The live line fitted to `width` cells. Always there: N/M, the ETA, the phase (cut to
    a minimum) and the first `essential` stats. Then, while they fit, in this order: the
    title (cut), the whole phase, the bar, the whole title, the next stat, the elapsed time,
    the other stats."""
    count, eta_text = f"{step}/{total}", f"eta {_clock_text(eta)}"
    elapsed_text = _clock_text(elapsed)
    gap = len(_GAP)
    kept = stats[:essential]
    phase_w = min(cell_len(phase), _PHASE_MIN) if phase else 0
    used = cell_len(count) + gap + cell_len(eta_text) + sum(gap + cell_len(s) for s in kept)
    used += gap + phase_w if phase else 0

    def take(cells: int) -> bool:
        nonlocal used
        if used + cells > width:
            return False
        used += cells
        return True

    def grow(current: int, wanted: int) -> int:
        nonlocal used
        extra = max(min(wanted - current, width - used), 0)
        used += extra
        return current + extra

    title_w = min(cell_len(title), _TITLE_MIN)
    title_w = title_w if take(title_w + gap) else 0
    if phase:
        phase_w = grow(phase_w, cell_len(phase))
    # The bar's width follows the terminal only, so it does not jump as stats come and go.
    preferred = min(max(width // 6, _BAR_MIN), _BAR_MAX)
    bar_w = next((w for w in (preferred, _BAR_MIN) if take(w + gap)), 0)
    if title_w:
        title_w = grow(title_w, cell_len(title))
    show_elapsed = False
    optional = stats[essential:]
    for text in [*optional[:1], None, *optional[1:]]:  # None: the elapsed time
        if text is None:
            show_elapsed = take(cell_len(elapsed_text) + 1)
        elif take(gap + cell_len(text)):
            kept.append(text)

    parts: list[Text] = []
    if title_w:
        parts.append(_cut(title, title_w, "bold"))
    if bar_w:
        filled = round(bar_w * min(step / total, 1.0)) if total > 0 else bar_w
        style = "bar.finished" if step >= total else "bar.complete"
        parts.append(Text.assemble(("━" * filled, style), ("━" * (bar_w - filled), "bar.back")))
    parts.append(Text(count, "progress.download"))
    parts.append(Text(f"{elapsed_text} {eta_text}" if show_elapsed else eta_text,
                      "progress.remaining"))
    if phase:
        parts.append(_cut(phase, phase_w, "yellow"))
    parts += [Text(s) for s in kept]
    line = Text(_GAP).join(parts)
    line.no_wrap, line.overflow = True, "ellipsis"
    return line


def _cut(text: str, cells: int, style: str) -> Text:
    out = Text(text, style)
    out.truncate(cells, overflow="ellipsis")
    return out


def _by_priority(stats: dict) -> list[tuple[str, object]]:
    def rank(key: str) -> int:
        if key in _STAT_PRIORITY:
            return _STAT_PRIORITY.index(key)
        return len(_STAT_PRIORITY) + (0 if key.startswith("loss_") else 1)

    return sorted(stats.items(), key=lambda item: rank(item[0]))


def format_duration(seconds: float) -> str:
    """A length of time for people: 4.2 s, 37 s, 2 min 05 s, 1 h 02 min."""
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _clock_text(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _format_stat(key: str, value) -> str:
    if isinstance(value, (int, float)) and key == "tok/s":
        return f"{key} {value:,.0f}"
    if isinstance(value, float):
        return f"{key} {value:.4g}"
    return f"{key} {value}"

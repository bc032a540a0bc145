"""Progress lines with an estimate of the time left, for one run.

The recorder prints one line per round (``task 2/4 · round 1/3 · ...``); this subclass appends the
elapsed time of the run and an ETA: the mean wall time of the rounds run so far in this process
times the rounds left (a resumed run counts only its own rounds). The recorder's own
bookkeeping is untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .recorder import RunRecorder


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


@dataclass
class TimedRecorder(RunRecorder):
    first_round: int | None = field(default=None, repr=False)  # global round before this process's first
    clock: float = field(default_factory=time.time, repr=False)

    def say(self, text: str) -> None:
        if text.startswith("task ") and self.rows:
            done = max(int(r["global_round"]) for r in self.rows)
            if self.first_round is None:  # first round line of this process (after a resume: later)
                self.first_round = done - 1
            ran = done - self.first_round
            left = self.num_tasks * self.rounds_per_task - done
            elapsed = time.time() - self.clock
            text += f" · elapsed {duration(elapsed)}"
            if left > 0 and ran > 0:
                text += f" · ETA {duration(elapsed / ran * left)}"
        super().say(text)

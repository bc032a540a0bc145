"""Progress lines with an estimate of the time left, for one run.

The recorder prints one line per round (``task 2/4 · round 1/3 · ...``); this subclass appends the
elapsed time of the run and, from the second round on, an ETA: the mean wall time of the rounds
since the first one times the rounds left (a resumed run counts only its own rounds). The recorder's own
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
    clock: float = field(default_factory=time.time, repr=False)
    first: tuple[int, float] | None = field(default=None, repr=False)  # (global round, time) of the first line

    def say(self, text: str) -> None:
        if text.startswith("task ") and self.rows:
            now = time.time()
            done = max(int(r["global_round"]) for r in self.rows)
            if self.first is None:  # the first round of this process (a resumed run starts later)
                self.first = (done, now)
            left = self.num_tasks * self.rounds_per_task - done
            text += f" · elapsed {duration(now - self.clock)}"
            ran = done - self.first[0]
            # the pace of the rounds since the first one: the first round also pays for starting
            # Ray and building the clients, which the later rounds do not
            if left > 0 and ran > 0:
                text += f" · ETA {duration((now - self.first[1]) / ran * left)}"
        super().say(text)

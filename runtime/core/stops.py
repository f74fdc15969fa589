"""Stop strings: the answer ends before the first of them, as OpenAI's `stop` and `chat --stop` ask.

The scheduler feeds every piece of text through a `StopFilter` before anyone sees it: text that could be
the start of a stop string is held back until the next piece shows what it is, and the job ends at the
token that completes one, so nothing after it is generated, sent or counted.
"""

from __future__ import annotations

MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256


class StopFilter:
    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """What of the text so far may be shown: everything before a stop string, less a possible start of one."""
        if self.stopped:
            return ""
        self.buf += piece
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf, self.stopped = self.buf[: min(hits)], "", True
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.buf) - hold
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out

    def finish(self) -> str:
        """The text held back, once the answer ended without completing a stop string."""
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out

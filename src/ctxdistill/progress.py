"""Progress bars: redrawn several times a second on a terminal, every 30 s into a log file.

A bar redraws itself with carriage returns on one line, so in a log file (SLURM, ``nohup``, a
redirected console) every redraw lengthens that line; at tqdm's default of 10 redraws a second a
long run's bar becomes a line of megabytes. ``TQDM_MININTERVAL`` still sets the interval.
Log records go through `BarSafeHandler` (the console handler of every run), which lifts the bars
off the screen while it writes, so a log line never lands in the middle of a bar's line.
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm

LOG_FILE_REDRAW_S = 30.0


def progress_bar(*args, **kwargs) -> tqdm:
    """`tqdm.auto.tqdm`, redrawn at most every `LOG_FILE_REDRAW_S` when stderr is not a terminal."""
    if not sys.stderr.isatty() and "ipykernel" not in sys.modules:  # a notebook's widget is no log file
        interval = float(os.environ.get("TQDM_MININTERVAL", LOG_FILE_REDRAW_S))
        # maxinterval too: tqdm's monitor thread otherwise redraws a slow bar every 10 s
        kwargs.setdefault("mininterval", interval)
        kwargs.setdefault("maxinterval", max(interval, 10.0))
    return tqdm(*args, **kwargs)


class BarSafeHandler(logging.StreamHandler):
    """A console handler that writes through `tqdm.write`: open bars are cleared, the record is written on
    a line of its own, and the bars are drawn again below it. Made without a stream, it writes to the
    ``sys.stderr`` of the moment, not to one that was replaced (and perhaps closed) since."""

    def __init__(self, stream=None):
        super().__init__(stream)
        self.follows_stderr = stream is None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr if self.follows_stderr else self.stream)
        except Exception:
            self.handleError(record)


def close_bars() -> None:
    """Close the bars still open (a run stopped by Ctrl-C in the middle of one): each ends its line as it stands, so
    that what is printed next starts a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def quiet_library_bars() -> None:
    """No bars of transformers' own ("Loading weights", "Writing model shards"): one comes with every model a run
    loads or saves, and is over in a fraction of a second. The Hub's download bars (huggingface_hub's) stay."""
    from transformers.utils import logging as transformers_logging

    if hasattr(transformers_logging, "set_tqdm_hook"):  # transformers >= 5
        transformers_logging.set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))

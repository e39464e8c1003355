"""Progress of long commands: a tqdm bar with ETA on a terminal, plain lines in a log file.

    for path in progress(paths, desc="predict", unit="image"):
        ...

On a terminal the bar redraws itself in place with carriage returns. Written to a file (a SLURM
log, `2> log.txt`) those would pile up into one unreadable line, so there each report is a line
of its own, every `every` steps (by default about 20 lines over a run of known length):

    predict 40/200 (20%) | 3.1 image/s | elapsed 0:00:13 | ETA 0:00:52
"""

import datetime
import math
import sys
import time

from tqdm import tqdm

LINES_PER_RUN = 20


def progress(iterable, total=None, desc="", unit="it", every=None, terminal=None, file=None):
    """`iterable`, reporting progress to `file` (stdout, the log; errors alone go to stderr) as
    its items are taken.

    `total` defaults to len(iterable) when it has one. `terminal` forces the bar (True) or the
    plain lines (False); by default it is whether `file` is a terminal. `every` is the number of
    steps between plain lines (the last step always gets one).
    """
    file = sys.stdout if file is None else file
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if terminal is None:
        terminal = file.isatty()
    if terminal:
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=file, dynamic_ncols=True)
    if every is None:
        every = max(1, math.ceil(total / LINES_PER_RUN)) if total else 1
    return _plain_lines(iterable, total, desc, unit, every, file)


def _plain_lines(iterable, total, desc, unit, every, file):
    start = time.monotonic()
    step = 0
    for step, item in enumerate(iterable, start=1):
        yield item
        if step % every == 0 or step == total:
            print(progress_line(desc, unit, step, total, time.monotonic() - start), file=file)
            file.flush()
    if step % every != 0 and step != total:
        print(progress_line(desc, unit, step, total, time.monotonic() - start), file=file)
        file.flush()


def progress_line(desc, unit, step, total, elapsed):
    """One report: steps done (of total), rate, elapsed time and, with a total, the ETA."""
    done = f"{step}/{total} ({100 * step / total:.0f}%)" if total else f"{step}"
    parts = [f"{desc} {done}".strip()]
    if elapsed > 0:
        parts.append(f"{step / elapsed:.3g} {unit}/s")
    parts.append(f"elapsed {_duration(elapsed)}")
    if total and step:
        parts.append(f"ETA {_duration(elapsed / step * (total - step))}")
    return " | ".join(parts)


def _duration(seconds):
    return str(datetime.timedelta(seconds=round(seconds)))

"""Progress bars that read the same live and stored: a widget in Jupyter, one final line in a stored run.

A tqdm widget saved in a notebook shows its first frame ("0%| | 0/188") on GitHub and in nbval, since
the frames after it live only in the widget state. Runs whose outputs are kept (``make notebooks``,
nbval, ``make course``) set ``COURSE_HEADLESS=1``; there a bar prints only its final state, as text,
without timings, so the stored line is true and the same on every run.
"""

from __future__ import annotations

import functools
import io
import os

HEADLESS_ENV = "COURSE_HEADLESS"
FINAL = "{l_bar}{bar}| {n_fmt}/{total_fmt} {unit}"


def headless() -> bool:
    """True in runs whose outputs are stored or compared (no live frontend to draw a widget)."""
    return os.environ.get(HEADLESS_ENV) == "1"


def progress(iterable=None, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)`` live; a bar that prints one final line when headless."""
    from tqdm.auto import tqdm

    return _final_line_class()(iterable, **kwargs) if headless() else tqdm(iterable, **kwargs)


@functools.cache  # tqdm is imported only when a bar is made
def _final_line_class():
    from tqdm.std import tqdm

    class FinalLine(tqdm):
        """Counts like tqdm, draws nothing while running, prints its last state once on close."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "file": io.StringIO()})
            self._printed = False

        def close(self):
            if not self._printed and not self.disable:
                self._printed = True
                fmt = FINAL if self.total else "{desc}: {n_fmt} {unit}"
                print(self.format_meter(self.n, self.total, 0, prefix=self.desc or "",
                                        unit=self.unit, bar_format=fmt))
            super().close()

    return FinalLine


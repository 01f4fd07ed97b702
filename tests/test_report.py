"""The leaderboard, its tables and its Markdown read everything from the records' evaluation columns:
aggregation, spread, ranking, headings, formats, the terminal's choice. A plugin-like evaluation defined
here (no edit to blockbench) becomes a column, ranks the board, prints, is summarised by the stability
study and is gated by the regression gate."""

import io
import math
import re

import pytest
from pydantic import Field
from rich.cells import cell_len
from rich.console import Console

from algorithms.evaluations.base import Column, Evaluation, Params
from bench import gate, report, stability
from tests.records_factory import make_record, units_grid

SCORES = [6, 5, 1, 2, 4, 3]


def _builtin(i, *, metric, seed, ppl, acc, kl=0.2, prefill=1.2, removed=(2, 3), budget="2 blocks", model="m"):
    values = {"ppl_pruned": ppl, "ppl_dense": 10.0,
              "acc_pruned": acc, "acc_dense": 0.6, "acc_retained": acc / 0.6, "acc:arc_easy": acc + 0.1,
              "acc:piqa": acc - 0.1, "kl": kl, "top1": 0.8, "prefill_speedup": prefill, "decode_speedup": 1.1}
    return make_record(i, removed=removed, scores=SCORES, values=values, metric=metric, seed=seed, budget=budget,
                       model=model)


def _grid():
    """bi: low accuracy, low perplexity; angular: high accuracy, high perplexity; two seeds each."""
    return [
        _builtin(0, metric="bi", seed=0, ppl=20.0, acc=0.40, kl=0.10),
        _builtin(1, metric="bi", seed=1, ppl=22.0, acc=0.44, kl=0.30),
        _builtin(2, metric="angular", seed=0, ppl=30.0, acc=0.50, kl=0.20, removed=(1, 2)),
        _builtin(3, metric="angular", seed=1, ppl=34.0, acc=0.56, kl=0.20, removed=(1, 2)),
    ]


def test_every_column_aggregates_over_seeds_under_its_own_key():
    board = report.leaderboard(_grid()).set_index("metric")
    assert board.attrs["ranked_by"] == "acc_pruned"  # accuracy has the highest rank of the built-ins
    assert [c.key for c in board.attrs["columns"]] == [
        "acc_pruned", "acc_dense", "acc_retained", "acc:arc_easy", "acc:piqa", "ppl_pruned", "ppl_dense", "kl",
        "top1", "prefill_speedup", "decode_speedup"]
    bi = board.loc["bi"]
    assert bi["ppl_pruned"] == 21.0 and bi["ppl_pruned_std"] == pytest.approx(math.sqrt(2))
    assert bi["acc_pruned"] == pytest.approx(0.42) and bi["acc_pruned_std"] == pytest.approx(math.sqrt(0.0008))
    assert bi["kl"] == pytest.approx(0.2) and bi["kl_std"] == pytest.approx(math.sqrt(0.02))
    assert bi["acc:piqa"] == pytest.approx(0.32) and bi["ppl_dense"] == 10.0 and bi["seeds"] == 2
    # no spread column, no std; the old names are gone
    assert not {"ppl_dense_std", "top1_std", "acc_retained_std", "ppl_mean", "ppl_std", "acc_std"} & set(board.columns)
    assert list(board.index) == ["angular", "bi"] and list(board["rank"]) == [1, 2]  # accuracy: higher first


def test_one_seed_has_zero_spread():
    board = report.leaderboard(_grid()[:1])
    assert (board.loc[0, "ppl_pruned_std"], board.loc[0, "acc_pruned_std"], board.loc[0, "kl_std"]) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(("rank_by", "key", "first"), [
    ("auto", "acc_pruned", "angular"),
    ("accuracy", "acc_pruned", "angular"),
    ("acc", "acc_pruned", "angular"),
    ("perplexity", "ppl_pruned", "bi"),  # lower first
    ("ppl", "ppl_pruned", "bi"),
    ("ppl_pruned", "ppl_pruned", "bi"),
    ("kl", "kl", "angular"),  # 0.2 each: a tie, both rank 1, angular first by name
    ("acc:piqa", "acc:piqa", "angular"),
    ("speed", "prefill_speedup", "angular"),  # speed has no ranked column: its first with a direction
    ("speedup", "prefill_speedup", "angular"),
])
def test_rank_by_evaluation_column_or_measure(rank_by, key, first):
    board = report.leaderboard(_grid(), rank_by=rank_by)
    assert board.attrs["ranked_by"] == key
    assert board.loc[0, "metric"] == first and board.loc[0, "rank"] == 1


def test_rank_by_kl_ties_and_lower_is_better():
    records = _grid()[:2] + [_builtin(5, metric="angular", seed=0, ppl=30.0, acc=0.5, kl=0.05, removed=(1, 2))]
    board = report.leaderboard(records, rank_by="kl")
    assert list(zip(board["metric"], board["rank"], strict=True)) == [("angular", 1), ("bi", 2)]


def test_unknown_rank_by_names_the_choices():
    with pytest.raises(ValueError) as info:
        report.leaderboard(_grid(), rank_by="f1")
    assert str(info.value) == (
        "rank_by: unknown 'f1'; choose from auto, an evaluation (accuracy, kl, perplexity, speed), a column "
        "(acc_pruned, acc_retained, acc:arc_easy, acc:piqa, ppl_pruned, kl, top1, prefill_speedup, decode_speedup) "
        "or a measure (acc, kl, ppl, speedup, top1)")
    with pytest.raises(ValueError, match=r"^rank_by: column 'ppl_dense' \(ppl \(dense\)\) is a reference value"):
        report.leaderboard(_grid(), rank_by="ppl_dense")
    only_ppl = [make_record(0, removed=(1,), values={"ppl_pruned": 20.0, "ppl_dense": 10.0})]
    with pytest.raises(ValueError, match=r"^rank_by: unknown 'accuracy'; choose from auto, an evaluation "
                                         r"\(perplexity\)"):
        report.leaderboard(only_ppl, rank_by="accuracy")


def test_ranks_stay_within_model_and_budget():
    records = _grid() + [_builtin(10 + i, metric="bi", seed=i, ppl=50.0, acc=0.3, budget="3 blocks", removed=(1, 2, 3))
                         for i in range(2)]
    board = report.leaderboard(records)
    assert list(zip(board["budget"], board["metric"], board["rank"], strict=True)) == [
        ("2 blocks", "angular", 1), ("2 blocks", "bi", 2), ("3 blocks", "bi", 1)]


def test_display_headings_formats_and_order():
    board = report.leaderboard(_grid())
    shown = report.display(board)
    assert list(shown.columns) == [
        "rank", "model", "budget", "metric", "selector", "acc", "acc (dense)", "retained", "arc_easy", "piqa",
        "ppl (pruned)", "ppl (dense)", "KL", "top-1 agree", "prefill ×", "decode ×", "params kept", "span loss",
        "evals", "seeds", "distinct sets", "jaccard", "τ", "scoring s", "typical removed"]
    bi = shown[shown["metric"] == "bi"].iloc[0]
    assert (bi["acc"], bi["ppl (pruned)"], bi["KL"]) == ("0.420 ± 0.028", "21.00 ± 1.41", "0.2000 ± 0.1414")
    assert (bi["retained"], bi["piqa"], bi["ppl (dense)"], bi["prefill ×"]) == ("70.0%", "0.320", "10.00", "1.20")
    assert (bi["budget"], bi["typical removed"], bi["params kept"], bi["seeds"]) == (
        "2 blocks (2/6)", "2,3", "70.0%", 2)


def test_terminal_shows_the_terminal_columns_under_their_short_headings():
    board = report.leaderboard(_grid())
    shown = report.display(board, terminal=True)
    assert list(shown.columns) == [
        "rank", "model", "budget", "metric", "selector", "acc", "retained", "ppl pruned", "dense", "KL", "top-1",
        "prefill ×", "decode ×", "evals", "seeds", "jaccard", "τ", "score s", "removed"]
    assert list(shown["rank"]) == ["1", "2"]  # two seeds: nothing can be separable, so no letters are shown
    assert list(board["rank_group"]) == ["a", "a"]  # (the CSV keeps them)
    header, rows, note = _terminal(board, 300)
    assert header == [["", "", "", "", "", "", "", "", "", "", "", "prefill", "decode", "", "", "", "", "score", ""],
                      ["rank", "model", "budget", "metric", "selector", "acc", "retained", "ppl pruned", "dense", "KL",
                       "top-1", "×", "×", "evals", "seeds", "jaccard", "τ", "s", "removed"]]
    assert rows == shown.astype(str).values.tolist() and note == ""


# ---------------------------------------------------------------------------------------- the terminal
def _terminal(board, width, **kwargs):
    """Render at ``width``: the header lines split into the columns' cells, the rows' cells and the note.
    Cells are cut at the columns' positions (from the rule's gaps under the header), so a number the
    table cut or wrapped would not come back whole."""
    console = Console(width=width, record=True, file=io.StringIO())
    report.render_terminal(board, console, title="blockbench leaderboard: test grid", **kwargs)
    lines = console.export_text().splitlines()
    assert all(cell_len(line) <= width for line in lines), [line for line in lines if cell_len(line) > width]
    rule = next(i for i, line in enumerate(lines) if line.startswith("─"))
    body = lines[rule + 1:rule + 1 + len(board)]
    # the columns: runs of positions, split by two or more positions blank on every header and body line
    # (a cell holds single spaces at most: "0.420 ± 0.028")
    lines_ = [line for line in lines[rule - 2:rule] if line.strip() and "leaderboard" not in line] + body
    span = max(len(line) for line in lines_)
    rows_and_header = [line.ljust(span) for line in lines_]
    blank = "".join(" " if all(line[i] == " " for line in rows_and_header) else "x" for i in range(span))
    spans = [m.span() for m in re.finditer(r"x+(?: x+)*", blank)]

    def split(line):
        return [line[a:b].strip() for a, b in spans]

    header = [split(line) for line in rows_and_header[:-len(body)]]
    note = " ".join(line.strip() for line in lines[rule + 1 + len(board):])
    return header, [split(line) for line in body], note


def _realistic_records():
    """Four methods of one model at one budget, three seeds each, every built-in evaluation's columns."""
    out = []
    methods = [("angular", "topk", 0.5736, 22.48, 0.0812, (1, 2), (-1, 0, 1)),
               ("bi", "topk", 0.5348, 24.91, 0.1203, (2, 3), (0, 1, -1)),
               ("cosine", "greedy", 0.5561, 1234.56, 0.0955, (1, 3), (1, -1, 0)),
               ("taylor", "optuna", 0.4012, 87.2, 0.3121, (4, 5), (-1, 0, 1))]
    for j, (metric, selector, acc, ppl, kl, removed, wiggles) in enumerate(methods):
        for seed, wiggle in enumerate(wiggles):
            record = _builtin(10 * j + seed, metric=metric, seed=seed, ppl=ppl + wiggle, acc=acc + 0.01 * wiggle,
                              kl=kl + 0.001 * wiggle, prefill=1.31, removed=removed, budget="33%", model="smollm2-135m")
            out.append(record.model_copy(update={"labels": record.labels.model_copy(update={"selector": selector})}))
    return out


def test_the_terminal_never_cuts_a_number_and_names_what_it_left_out():
    board = report.leaderboard(_realistic_records())
    shown = report.display(board, terminal=True)
    assert list(shown["ppl pruned"]) == ["22.48 ± 1.00", "1234.56 ± 1.00", "24.91 ± 1.00", "87.20 ± 1.00"]
    assert list(shown["rank"]) == ["1 a", "2 a", "3 a", "4 b"]  # the top three move with the seeds' noise
    header, rows, note = _terminal(board, 80, full_table="results/test/leaderboard.md")
    kept = ["rank", "model", "budget", "metric", "selector", "acc", "retained"]
    left = [c for c in shown.columns if c not in kept]
    assert header == [kept]
    assert rows == shown[kept].astype(str).values.tolist()  # every shown cell whole, in its own column
    assert note == f"Left out to fit 80 columns: {', '.join(left)}. Full table: results/test/leaderboard.md."
    assert left == ["ppl pruned", "dense", "KL", "top-1", "prefill ×", "decode ×", "evals", "seeds", "jaccard", "τ",
                    "score s", "removed"]

    # ranked by perplexity: the ranking column comes right after the row's identity
    by_ppl = report.leaderboard(_realistic_records(), rank_by="ppl")
    header, rows, note = _terminal(by_ppl, 80)
    kept = ["rank", "model", "budget", "metric", "selector", "acc", "ppl pruned"]
    assert list(by_ppl["rank_group"]) == ["a", "a", "b", "c"]
    assert header[-1] == kept and rows == report.display(by_ppl, terminal=True)[kept].astype(str).values.tolist()
    assert note.startswith("Left out to fit 80 columns: retained, dense, KL, top-1, prefill ×, decode ×, evals, "
                           "seeds, jaccard, τ, score s, removed. Full table: leaderboard.md and leaderboard.csv in the "
                           "results folder.")

    header, rows, note = _terminal(board, 200)
    assert rows == shown.astype(str).values.tolist() and note == ""
    assert [" ".join(filter(None, cells)) for cells in zip(*header, strict=True)] == list(shown.columns)


def test_a_narrow_terminal_keeps_the_columns_in_priority_order():
    board = report.leaderboard(_realistic_records())
    shown = report.display(board, terminal=True)
    keys = {c.short or c.label: c.key for c in report.board_columns(board) if c.terminal}
    priority = report.terminal_priority(shown, keys, "acc_pruned")
    assert priority == ["rank", "model", "budget", "metric", "selector", "acc", "retained", "ppl pruned", "dense", "KL",
                        "top-1", "prefill ×", "decode ×", "seeds", "evals", "jaccard", "τ", "score s", "removed"]
    for width in (40, 60, 100, 120, 140, 160):
        header, rows, note = _terminal(board, width)
        kept = [" ".join(filter(None, cells)) for cells in zip(*header, strict=True)]
        assert kept == [c for c in shown.columns if c in priority[:len(kept)]]  # a prefix of the priority order
        assert rows == shown[kept].astype(str).values.tolist()
        left = [c for c in shown.columns if c not in kept]
        assert note.startswith(f"Left out to fit {width} columns: {', '.join(left)}. Full table: ") == bool(left)


# ---------------------------------------------------------------------------------------- rank groups
def _seeded(metric, accs, *, budget="2 blocks", start=0):
    return [_builtin(start + seed, metric=metric, seed=seed, ppl=20.0, acc=acc, budget=budget)
            for seed, acc in enumerate(accs)]


def test_the_readme_gap_over_three_seeds_is_not_a_clear_win():
    """bi 83.48 ± 3.09 against angular 87.36 ± 1.26 over three seeds: even paired as closely as those
    spreads allow (the seeds move together), the t statistic is 3.88 / (1.83 / √3) = 3.67 < t(0.975, 2) = 4.30."""
    angular = [87.36 - 1.26, 87.36, 87.36 + 1.26]
    bi = [83.48 - 3.09, 83.48, 83.48 + 3.09]
    board = report.leaderboard(_seeded("angular", [a / 100 for a in angular])
                               + _seeded("bi", [b / 100 for b in bi], start=10))
    assert list(board["acc_pruned"]) == pytest.approx([0.8736, 0.8348])
    assert list(board["acc_pruned_std"]) == pytest.approx([0.0126, 0.0309])
    assert list(zip(board["metric"], board["rank"], board["rank_group"], strict=True)) == [
        ("angular", 1, "a"), ("bi", 2, "a")]
    assert list(report.display(board)["rank"]) == ["1 a", "2 a"]
    assert report.paired_p_value(dict(enumerate(angular)), dict(enumerate(bi))) == pytest.approx(0.0668, abs=1e-4)
    # the same gap on every seed is separable
    steady = report.leaderboard(_seeded("angular", [0.87, 0.88, 0.89]) + _seeded("bi", [0.83, 0.84, 0.85], start=10))
    assert list(steady["rank_group"]) == ["a", "b"]


def test_rank_groups_overlap_like_a_compact_letter_display():
    """angular beats taylor on every seed; bi lies between and is separable from neither."""
    records = (_seeded("angular", [0.60, 0.61, 0.62, 0.63]) + _seeded("bi", [0.59, 0.58, 0.61, 0.58], start=10)
               + _seeded("taylor", [0.55, 0.559, 0.571, 0.58], start=20))
    board = report.leaderboard(records)
    assert list(zip(board["metric"], board["rank"], board["rank_group"], strict=True)) == [
        ("angular", 1, "a"), ("bi", 2, "ab"), ("taylor", 3, "b")]
    assert list(report.display(board)["rank"]) == ["1 a", "2 ab", "3 b"]
    assert list(report.display(board, terminal=True)["rank"]) == ["1 a", "2 ab", "3 b"]
    # ranks and groups stay within (model, budget); a row without a ranking value has no group
    more = records + _seeded("bi", [0.3, 0.3, 0.3], budget="3 blocks", start=30) + _seeded(
        "angular", [0.4, 0.4, 0.4], budget="3 blocks", start=40)
    unmeasured = {"ppl_pruned": 30.0, "ppl_dense": 10.0, "acc_pruned": None, "acc_dense": 0.6, "acc_retained": None,
                  "acc:arc_easy": None, "acc:piqa": None, "kl": 0.2, "top1": 0.8, "prefill_speedup": 1.2,
                  "decode_speedup": 1.1}
    more.append(make_record(50, removed=(2, 3), scores=SCORES, values=unmeasured, metric="taylor", budget="3 blocks"))
    board = report.leaderboard(more)
    assert list(zip(board["budget"], board["metric"], board["rank"], board["rank_group"], strict=True)) == [
        ("2 blocks", "angular", 1, "a"), ("2 blocks", "bi", 2, "ab"), ("2 blocks", "taylor", 3, "b"),
        ("3 blocks", "angular", 1, "a"), ("3 blocks", "bi", 2, "b"), ("3 blocks", "taylor", 3, "")]
    assert list(report.display(board)["rank"])[3:] == ["1 a", "2 b", "3"]


def test_fewer_than_three_seeds_claim_nothing():
    assert list(report.leaderboard(_grid())["rank_group"]) == ["a", "a"]  # two seeds
    one_seed = [_builtin(0, metric="bi", seed=0, ppl=20.0, acc=0.1), _builtin(1, metric="angular", seed=0, ppl=20.0,
                                                                             acc=0.9)]
    assert list(report.leaderboard(one_seed)["rank_group"]) == ["a", "a"]
    # seeds count only when both rows have them: three seeds each, two in common
    shifted = _seeded("angular", [0.9, 0.9, 0.9]) + [
        _builtin(10 + s, metric="bi", seed=s, ppl=20.0, acc=0.1) for s in (1, 2, 3)]
    assert list(report.leaderboard(shifted)["rank_group"]) == ["a", "a"]


def test_rank_groups_are_holm_corrected_over_the_pairs():
    """Alone, rows 0 and 2 differ (p = 0.03 < 5%), but three pairs are tested: Holm needs p <= 5% / 3."""
    rows = [{0: 10.0, 1: 10.0, 2: 10.0, 3: 10.0}, {0: 8.0, 1: 10.0, 2: 7.0, 3: 10.0}, {0: 9.0, 1: 7.0, 2: 8.0, 3: 6.0}]
    assert report.paired_p_value(rows[0], rows[2]) == pytest.approx(0.0305, abs=1e-4)
    assert report.rank_groups(rows) == ["a", "a", "a"]
    assert report.rank_groups(rows[::2]) == ["a", "b"]  # one pair: no correction
    assert report.rank_groups(rows, alpha=0.1) == ["a", "ab", "b"]


def test_rank_groups_chain_and_skip_rows_without_values():
    """0 ~ 1 ~ 2 ~ 3 in a chain, every other pair separable: four rows, three overlapping groups."""
    base = [50.0, 52.0, 49.0, 51.0, 50.0]
    noise = [6.0, -6.0, 6.0, -6.0, 0.0]
    rows = [{s: b for s, b in enumerate(base)},
            {s: b - 5 + n for s, (b, n) in enumerate(zip(base, noise, strict=True))},
            {s: b - 10 for s, b in enumerate(base)},
            {s: b - 15 + n for s, (b, n) in enumerate(zip(base, noise, strict=True))}]
    assert report.rank_groups(rows) == ["a", "ab", "bc", "c"]
    assert report.rank_groups([rows[0], {}, rows[2]]) == ["a", "", "b"]
    assert report.rank_groups([]) == [] and report.rank_groups([{}]) == [""]
    assert report.paired_p_value({0: 1.0, 1: 2.0}, {0: 0.0, 1: 0.0}) is None  # two seeds: no test
    assert report.paired_p_value({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.0, 1: 2.0, 2: 3.0}) == 1.0  # equal on every seed


def _md_table_header(md: str) -> list[str]:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in md.splitlines()
            if line.startswith("|")]
    assert rows[0][0] == "rank" and set(rows[1]) <= {"---:", ":---"} | {"-" * n + ":" for n in range(3, 40)} | {
        ":" + "-" * n for n in range(3, 40)}
    return rows[0]


def _md_rows(md: str) -> list[list[str]]:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in md.splitlines()
            if line.startswith("|")]
    return [dict(zip(rows[0], row, strict=True)) for row in rows[2:]]


def test_markdown_notes_come_from_the_columns(tmp_path):
    board = report.leaderboard(_grid())
    md_path, csv_path = report.write_reports(board, tmp_path, title="t")
    md = md_path.read_text()
    assert md.startswith("# t\n\nRanks within each model and budget, by `acc` (higher first). No row has 3 "
                         "calibration seeds or more, so no rank is tested against the noise over seeds (run more seeds "
                         "for rank groups). ")
    assert "`ppl (pruned)`: lower is better (`bench check` measure `ppl`); `KL`: lower is better" in md
    assert "`acc`, `ppl (pruned)`, `KL`: ± the std over seeds" in md
    assert _md_table_header(md) == list(report.display(board).columns)
    bi = next(row for row in _md_rows(md) if row["metric"] == "bi")  # every cell in its column's format
    assert (bi["rank"], bi["acc"], bi["retained"], bi["ppl (dense)"], bi["span loss"], bi["scoring s"]) == (
        "2", "0.420 ± 0.028", "70.0%", "10.00", "0.1000", "0.100")
    csv_header = csv_path.read_text().splitlines()[0].split(",")
    assert csv_header[:8] == ["model", "budget", "metric", "selector", "seeds", "k", "n_blocks", "acc_pruned"]
    assert {"ppl_pruned", "ppl_pruned_std", "kl_std", "rank"} <= set(csv_header)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["leaderboard.csv", "leaderboard.md"]  # no temp files
    empty = report.leaderboard([])
    assert empty.empty and empty.attrs == {"columns": [], "ranked_by": None}
    md_path, _ = report.write_reports(empty, tmp_path / "none", title="t")
    assert md_path.read_text() == "# t\n\n_no finished cells yet_\n"


def test_a_column_clashing_with_a_core_column_is_refused():
    class Clash(Evaluation):
        name = "clash"

        def columns(self):
            return [Column("seeds", "seeds!", True)]

        def measure(self, target):
            raise NotImplementedError

        def values(self, dense, pruned):
            raise NotImplementedError

    records = [make_record(0, removed=(1,), values={"seeds": 3.0}, evaluations=[Clash()])]
    with pytest.raises(ValueError, match="evaluation column 'seeds' .* clashes with the leaderboard column 'seeds'"):
        report.leaderboard(records)


# ---------------------------------------------------------------------------------------- a plugin
class MyScoreParams(Params):
    weight: float = Field(1.0, gt=0)


class MyScore(Evaluation):
    """A third-party evaluation: one column, higher is better, outranks the built-ins, its own measure."""

    name = "my_eval"
    version = "3"
    Params = MyScoreParams

    def columns(self):
        return [Column("my_score", "my score", True, fmt=".1f", spread=True, gate="mine", rank=30, short="mine"),
                Column("my_median", "my median", False, fmt=".2f", aggregate="median")]

    def measure(self, target):
        raise NotImplementedError

    def values(self, dense, pruned):
        return {"my_score": pruned["score"] * self.params.weight, "my_median": pruned["median"]}


def _plugin_records(scores=((70.0, 74.0), (90.0, 80.0))):
    """bi: lower perplexity, lower my_score; angular: the reverse."""
    out = []
    for j, (metric, ppl, mine) in enumerate((("bi", 20.0, scores[0]), ("angular", 30.0, scores[1]))):
        for seed in range(2):
            values = {"ppl_pruned": ppl + seed, "ppl_dense": 10.0, "my_score": mine[seed], "my_median": 5.0}
            out.append(make_record(2 * j + seed, removed=(2, 3), scores=SCORES, values=values, metric=metric,
                                   seed=seed, evaluations=[MyScore(), _perplexity()]))
    return out


def _perplexity():
    from algorithms.evaluations.perplexity import Perplexity

    return Perplexity()


def test_a_plugin_column_joins_ranks_prints_and_is_summarised(tmp_path):
    records = _plugin_records()
    board = report.leaderboard(records)
    assert board.attrs["ranked_by"] == "my_score"  # rank 30 outranks perplexity's 10
    assert list(zip(board["metric"], board["rank"], board["my_score"], board["my_score_std"], strict=True)) == [
        ("angular", 1, 85.0, pytest.approx(math.sqrt(50))), ("bi", 2, 72.0, pytest.approx(math.sqrt(8)))]
    assert list(report.leaderboard(records, rank_by="ppl")["metric"]) == ["bi", "angular"]
    assert list(report.leaderboard(records, rank_by="my_eval")["metric"]) == ["angular", "bi"]
    assert report.leaderboard(records, rank_by="mine").attrs["ranked_by"] == "my_score"

    shown = report.display(board)
    assert list(shown.columns[5:9]) == ["my score", "my median", "ppl (pruned)", "ppl (dense)"]
    assert list(shown["my score"]) == ["85.0 ± 7.1", "72.0 ± 2.8"]
    assert list(report.display(board, terminal=True).columns[5:9]) == ["mine", "my median", "ppl pruned", "dense"]

    md = report.write_reports(board, tmp_path, title="plugin")[0].read_text()
    assert "by `my score` (higher first)" in md
    assert "`my score`: higher is better (`bench check` measure `mine`)" in md
    assert "(the median for `my median`)" in md
    assert _md_table_header(md)[5:7] == ["my score", "my median"]

    frame = stability.stability_frame(records).set_index("metric")
    assert [c.key for c in frame.attrs["columns"]] == ["my_score", "ppl_pruned"]
    assert frame.loc["angular", "my_score_mean"] == 85.0
    assert frame.loc["angular", "my_score_std"] == pytest.approx(math.sqrt(50))
    assert frame.loc["angular", "my_score_ci_low"] == 80.0 and frame.loc["angular", "my_score_ci_high"] == 90.0
    assert "my_median_mean" not in frame  # no spread: not summarised
    shown = stability.display(stability.stability_frame(records))
    assert list(shown.columns[10:14]) == ["my score", "my score 95% CI", "ppl (pruned)", "ppl (pruned) 95% CI"]
    assert list(zip(shown["metric"], shown["my score 95% CI"], strict=True)) == [
        ("angular", "[80.0, 90.0]"), ("bi", "[70.0, 74.0]")]


def test_a_median_column_aggregates_by_median():
    records = [make_record(i, removed=(2, 3), scores=SCORES, seed=i, evaluations=[MyScore()],
                           values={"my_score": 1.0, "my_median": v}) for i, v in enumerate([1.0, 2.0, 10.0])]
    board = report.leaderboard(records)
    assert board.loc[0, "my_median"] == 2.0 and "my_median_std" not in board  # the mean would be 4.33
    assert list(report.display(board)["my median"]) == ["2.00"]


def test_a_plugin_measure_is_gated(tmp_path):
    path = tmp_path / "baseline.json"
    gate.save_baseline(report.leaderboard(_plugin_records()), path, grid=None, env={})
    stored = gate.load_baseline(path)
    assert gate.measures(stored) == (["mine", "ppl"], ["my_score", "ppl_pruned"])
    assert stored["rows"][0]["values"]["my_score"] == {"value": 85.0, "gate": "mine", "higher_is_better": True}

    same = gate.compare(stored, report.leaderboard(_plugin_records()), gate.parse_fail("mine:1%"))
    assert list(same["status"]) == ["ok", "ok"] and not gate.failed(same)
    worse = report.leaderboard(_plugin_records(scores=((70.0, 74.0), (80.0, 80.0))))  # angular: 85 -> 80
    table = gate.compare(stored, worse, gate.parse_fail("mine:5%,ppl:1%"))
    assert list(zip(table["cell"], table["measure"], table["status"], strict=True)) == [
        ("m/angular/topk/2 blocks", "my_score", "regression"), ("m/angular/topk/2 blocks", "ppl_pruned", "ok"),
        ("m/bi/topk/2 blocks", "my_score", "ok"), ("m/bi/topk/2 blocks", "ppl_pruned", "ok")]
    assert gate.failed(table)
    assert list(gate.compare(stored, worse, gate.parse_fail("my_score:6%"))["status"]) == ["ok", "ok"]  # -5.9%
    with pytest.raises(gate.GateError) as info:
        gate.compare(stored, worse, gate.parse_fail("acc:1%"))
    assert str(info.value) == ("unknown measure 'acc'; the baseline has mine, ppl "
                               "(or one of its columns: my_score, ppl_pruned)")


# ---------------------------------------------------------------------------------------- units and healing
UNIT_HEADINGS = [
    "rank", "model", "budget", "metric", "selector", "unit", "healing", "acc", "acc (dense)", "retained", "piqa",
    "ppl (pruned)", "ppl (dense)", "params kept", "span loss", "evals", "seeds", "distinct sets", "jaccard", "τ",
    "scoring s", "healing s", "typical removed"]


def test_units_and_healing_rank_together_within_one_params_budget():
    board = report.leaderboard(units_grid())
    # one row per (unit, healing), all four ranked within (model, budget): sub-layer rows compete with blocks
    assert list(zip(board["unit"], board["healing"], board["rank"], board["rank_group"], strict=True)) == [
        ("attention", "linear", 1, "a"), ("attention", "none", 2, "b"), ("block", "linear", 3, "c"),
        ("block", "none", 4, "d")]
    assert list(board["acc_pruned"]) == [0.65625, 0.53125, 0.40625, 0.28125]
    assert list(board["seeds"]) == [3, 3, 3, 3] and list(board["k"]) == [4, 4, 2, 2]
    assert list(board["healing_s"].fillna(-1.0)) == [2.0, -1.0, 2.0, -1.0]  # mean over seeds; no healing: NaN
    assert list(board.columns[:7]) == ["model", "budget", "metric", "selector", "unit", "healing", "seeds"]
    shown = report.display(board)
    assert list(shown.columns) == UNIT_HEADINGS
    assert list(shown["rank"]) == ["1 a", "2 b", "3 c", "4 d"]
    assert list(shown["unit"]) == ["attention", "attention", "block", "block"]
    assert list(shown["healing"]) == ["linear", "none", "linear", "none"]
    assert list(shown["healing s"]) == ["2.00", "–", "2.00", "–"]
    assert list(shown["typical removed"]) == ["attn 2-5", "attn 2-5", "3,4", "3,4"]
    assert list(shown["budget"]) == ["params 90% (4/6)", "params 90% (4/6)", "params 90% (2/6)", "params 90% (2/6)"]


def test_units_and_healing_columns_only_when_some_row_is_not_the_default():
    records = units_grid()
    # default rows only: neither column, nor healing seconds, in the board, the tables or the CSV
    default = report.leaderboard(records[:3])
    assert not {"unit", "healing", "healing_s"} & set(default.columns)
    assert list(report.display(default).columns) == [
        "rank", "model", "budget", "metric", "selector", "acc", "acc (dense)", "retained", "piqa", "ppl (pruned)",
        "ppl (dense)", "params kept", "span loss", "evals", "seeds", "distinct sets", "jaccard", "τ", "scoring s",
        "typical removed"]
    assert list(report.display(default, terminal=True).columns) == [
        "rank", "model", "budget", "metric", "selector", "acc", "retained", "ppl pruned", "dense", "evals", "seeds",
        "jaccard", "τ", "score s", "removed"]
    assert "unit" not in report.notes(default) and "healing" not in report.notes(default)
    # blocks with and without healing: a healing column and its seconds, no unit column
    healed = report.display(report.leaderboard(records[:6]))
    assert list(healed.columns[4:7]) == ["selector", "healing", "acc"] and "unit" not in healed
    assert list(healed.columns[-3:]) == ["scoring s", "healing s", "typical removed"]
    assert list(healed["healing"]) == ["linear", "none"]
    # attention and blocks without healing: a unit column, no healing column nor seconds
    units = report.display(report.leaderboard(records[:3] + records[6:9]))
    assert list(units.columns[4:7]) == ["selector", "unit", "acc"]
    assert not {"healing", "healing s"} & set(units.columns)
    assert list(zip(units["unit"], units["typical removed"], strict=True)) == [("attention", "attn 2-5"),
                                                                                ("block", "3,4")]


def test_units_and_healing_in_the_terminal_markdown_and_csv(tmp_path):
    board = report.leaderboard(units_grid())
    shown = report.display(board, terminal=True)
    assert list(shown.columns) == [
        "rank", "model", "budget", "metric", "selector", "unit", "healing", "acc", "retained", "ppl pruned", "dense",
        "evals", "seeds", "jaccard", "τ", "score s", "heal s", "removed"]
    assert list(shown["unit"]) == ["attn", "attn", "block", "block"] and list(shown["removed"])[0] == "attn 2-5"
    # at 80 columns the unit and the healing are part of the row's identity: kept before any number
    header, rows, note = _terminal(board, 80)
    assert header[-1][:8] == ["rank", "model", "budget", "metric", "selector", "unit", "healing", "acc"]
    assert [row[5:8] for row in rows] == [["attn", "linear", "0.656 ± 0.031"], ["attn", "none", "0.531 ± 0.031"],
                                          ["block", "linear", "0.406 ± 0.031"], ["block", "none", "0.281 ± 0.031"]]
    assert note.startswith("Left out to fit 80 columns: retained, ppl pruned, dense, evals, seeds, jaccard, τ, "
                           "score s, heal s, removed.")
    md_path, csv_path = report.write_reports(board, tmp_path, title="units")
    md = md_path.read_text()
    assert "| rank   | model   | budget           | metric   | selector   | unit      | healing   |" in md
    assert "`unit`: what the row removes" in md and "`healing s`: its mean seconds" in md
    assert csv_path.read_text().splitlines()[0].startswith("model,budget,metric,selector,unit,healing,seeds,")


def test_units_and_healing_in_the_stability_table_and_the_figures():
    records = units_grid()
    frame = stability.stability_frame(records)
    assert list(frame.columns[:7]) == ["model", "calibration", "metric", "selector", "budget", "unit", "healing"]
    assert list(zip(frame["unit"], frame["healing"], frame["runs"], strict=True)) == [
        ("block", "none", 3), ("block", "linear", 3), ("attention", "none", 3), ("attention", "linear", 3)]
    shown = stability.display(frame)
    assert list(shown.columns[4:8]) == ["selector", "unit", "healing", "runs"]
    assert list(shown["always removed"]) == ["3,4", "3,4", "attn 2-5", "attn 2-5"]
    default = stability.stability_frame(records[:3])
    assert not {"unit", "healing"} & set(default.columns)
    assert list(default.columns[:6]) == ["model", "calibration", "metric", "selector", "budget", "k"]
    assert list(stability.display(default).columns[:6]) == ["model", "calibration", "budget", "metric", "selector",
                                                            "runs"]
    # the leaderboard's stability columns per (unit, healing) row, and a frame without the columns still groups
    assert list(stability.group_stability(stability.runs_frame(records).drop(columns=["unit", "healing"]),
                                          report.GROUP)["unit"]) == ["block"]
    from bench import html_report

    runs = stability.runs_frame(records)
    curves = html_report.curves_figure(runs, html_report.curves_column(runs))
    assert curves.axes[0].get_legend_handles_labels()[1] == [
        "bi/topk", "bi/topk [+linear]", "bi/topk [attention]", "bi/topk [attention +linear]"]
    frequency = html_report.frequency_figure(frame)
    assert [t.get_text() for t in frequency.axes[0].get_yticklabels()] == [
        "bi/topk", "bi/topk [+linear]", "bi/topk [attention]", "bi/topk [attention +linear]"]
    assert frequency.axes[0].get_title() == "m, params 90% (6 blocks): share of seeds removing each block"
    importance = html_report.importance_figure(runs)  # scores per unit; healing comes after selection
    assert [t.get_text() for t in importance.axes[0].get_yticklabels()] == ["bi", "bi [attention]"]
    old = html_report.frequency_figure(stability.stability_frame(records[:3]))
    assert [t.get_text() for t in old.axes[0].get_yticklabels()] == ["bi/topk"]
    assert old.axes[0].get_title() == "m, params 90% (2/6 blocks): share of seeds removing each block"

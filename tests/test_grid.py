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
        ({"budgets": {}}, "budgets: give at least one of 'ratios' or 'blocks'"),
        ({"calibration": {"samples": 0}}, r"calibration.samples: .*greater than or equal to 1"),
        ({"calibration": {"seeds": [1, 1]}}, r"calibration.seeds: seeds repeat"),
        ({"metrics": [{"name": "bi", "parms": {}}]}, r"metrics\[0\].parms: unknown key"),
        ({"models": []}, "models: List should have at least 1 item"),
        ({"device": "tpu"}, "device 'tpu' is not one of"),
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


def test_shipped_configs_parse():
    for path in ("configs/quick.yaml", "configs/full.yaml"):
        config = load_config(path)
        assert expand(config)
        assert yaml.safe_load(open(path))["name"] == config.name

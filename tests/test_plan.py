"""The cost plan (bench/plan.py): its numbers follow the documented formulas, and `bench validate` refuses a
grid that does not fit the device's memory, naming the knob. No weights: the models are config.json files
written here and built on the meta device."""

import json
import math

import pytest
import yaml
from typer.testing import CliRunner

from algorithms.models.nll import CHUNK_ROWS
from bench.cli import app
from bench.config import ConfigError, parse_config
from bench.plan import (
    MEMORY_ENV,
    human_bytes,
    human_count,
    parse_size,
    plan,
    search_evaluations,
    validate_plan,
)

cli = CliRunner()

LLAMA_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
}
TINY = {**LLAMA_70B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 512, "bos_token_id": 1,
        "eos_token_id": 2}


def llama_parameters(c):
    """Parameters of a Llama model, by hand: embeddings, q/k/v/o, gate/up/down, two norms per block, the
    final norm and the (untied) head."""
    d, f, n_layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    block = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    return vocab * d + n_layers * block + d + vocab * d


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The two model folders (config.json only) and a cache folder shared by this module's tests, so the
    70B model is built on the meta device once (its parameter count is memoised there)."""
    root = tmp_path_factory.mktemp("plan")
    for name, config in (("llama-70b", LLAMA_70B), ("tiny", TINY)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture
def cache(models, monkeypatch):
    monkeypatch.setenv("BLOCKBENCH_CACHE", str(models / "cache"))
    monkeypatch.delenv(MEMORY_ENV, raising=False)
    return models / "cache"


def grid(models, name="llama-70b", **overrides):
    data = {
        "name": "plan", "models": [str(models / name)], "metrics": ["bi"], "selectors": ["topk"],
        "budgets": {"blocks": [8]}, "calibration": {"samples": 128, "seq_len": 2048, "batch_size": 4},
        "perplexity": {"seq_len": 512, "max_windows": 16}, "device": "cpu", "dtype": "bfloat16",
    }
    return {**data, **overrides}


def write(tmp_path, data):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_70b_plan_equals_its_formulas(models, cache):
    data = grid(models, selectors=["topk", {"name": "span", "params": {"objective": "loss"}}],
                calibration={"samples": 128, "seq_len": 2048, "batch_size": 4, "seeds": [0, 1]})
    (p,) = plan(parse_config(data))
    assert p.parameters == llama_parameters(LLAMA_70B) == 70_553_706_496
    assert p.weight_bytes == 70_553_706_496 * 2  # bfloat16
    assert (p.n_blocks, p.width, p.intermediate_size, p.vocab_size) == (80, 8192, 28672, 128256)
    assert p.depths == 81
    assert p.state_bytes == 81 * 128 * 2048 * 8192 * 4
    # the logits of the predicted positions (wider than the MLP's 3 × 28672) and a chunk of log-probs
    assert p.activation_bytes == 4 * 2048 * 128256 * 4 + 2 * CHUNK_ROWS * 128256 * 4
    # perplexity (16 windows of 512, batches of 4): its batch's logits, smaller than calibration's; on the
    # host the dense states fill prefix_memory_mb (1 GiB < 80 × 16 × 512 × 8192 × 2 B) and the 4 pruned
    # sets' states prefix_sets_mb (1 GiB)
    assert p.evaluation_activation_bytes == 4 * 512 * 128256 * 4 + 2 * CHUNK_ROWS * 128256 * 4
    assert p.host_bytes == 2 * 2**30 and p.host_device
    assert p.peak_bytes == p.weight_bytes + p.state_bytes + p.activation_bytes + p.host_bytes
    assert (p.groups, p.cells, p.block_sets) == (2, 4, 5)
    # capture: S per group; span with the loss objective: its 80 - 8 + 1 runs × S, per cell (one per seed)
    assert p.calibration_windows == {"capture": 2 * 128, "model metrics": 0, "search": 2 * 73 * 128}
    assert p.evaluation_passes == {"perplexity": 16 * 5}
    assert human_bytes(p.state_bytes) == "696 GB"


def test_sublayer_units_double_the_depths_and_model_metrics_count_their_passes(models, cache):
    data = grid(models, metrics=["bi", "ppl"], units=["block", "attention"],
                calibration={"samples": 16, "seq_len": 128, "batch_size": 2})
    (p,) = plan(parse_config(data))
    assert p.depths == 2 * 80 + 1
    assert p.state_bytes == 161 * 16 * 128 * 8192 * 4
    # ppl: (L + 1) × S per unit kind of the group (block and attention)
    assert p.calibration_windows == {"capture": 16, "model metrics": 2 * 81 * 16, "search": 0}


def test_taylor_adds_gradients_to_the_peak(models, cache):
    (p,) = plan(parse_config(grid(models, metrics=["taylor"], calibration={"samples": 4, "seq_len": 64})))
    assert p.taylor_bytes == p.parameters * (2 + 4)
    # 64-token calibration windows: perplexity's 512-token batch has the larger activations
    assert p.evaluation_activation_bytes > p.activation_bytes
    assert p.peak_bytes == (p.weight_bytes + p.state_bytes + p.evaluation_activation_bytes + p.taylor_bytes
                            + p.host_bytes)


def test_worst_case_evaluations_of_the_search_selectors():
    from algorithms.ising import Ising
    from algorithms.selectors import Exhaustive, FastBlockSelect, Iterative, OptunaSearch, Span, TopK

    none = frozenset()
    assert search_evaluations(TopK(), 10, none, 3) == 0
    assert search_evaluations(Iterative(), 10, none, 3) == 10 + 9 + 8
    assert search_evaluations(Span(), 10, none, 3) == 8
    assert search_evaluations(Span(), 10, frozenset({0, 9}), 3) == 6
    assert search_evaluations(Exhaustive(), 10, none, 3) == math.comb(10, 3)
    assert search_evaluations(Ising(), 10, none, 3) == 1 + 10 + (9 + 8)  # adjacent pairs, window 2
    assert search_evaluations(Ising(pairs="all"), 10, none, 3) == 1 + 10 + 45
    assert search_evaluations(Ising(pairs="top", candidates=4), 10, none, 3) == 1 + 10 + 6
    assert search_evaluations(OptunaSearch(trials=30), 10, none, 3) == 30
    assert search_evaluations(FastBlockSelect(), 10, none, 3) == 1 + 50 * (8 + 1)
    assert search_evaluations(object(), 10, none, 3) is None  # a plugin's: unknown


def test_validate_refuses_a_plan_over_the_device_memory(models, cache, tmp_path, monkeypatch):
    monkeypatch.setenv(MEMORY_ENV, "80GB")
    data = grid(models)
    with pytest.raises(ConfigError, match=r"calibration\.samples or calibration\.seq_len"):
        validate_plan(parse_config(data))
    results = tmp_path / "out"
    for command in (["validate"], ["run", "--results", str(results)]):
        result = cli.invoke(app, [*command, "--grid", str(write(tmp_path, data))])
        assert result.exit_code == 2, result.output
        message = " ".join(result.output.split())
        assert (f"error: models[0] = '{models / 'llama-70b'}': the plan needs 843 GB of memory for capture, "
                "scoring and evaluation (hidden states 696 GB: calibration.samples × calibration.seq_len, weights "
                "141 GB at bfloat16, activations 4.27 GB: calibration.batch_size, evaluations' shared prefix "
                "2.15 GB: prefix_memory_mb + prefix_sets_mb), the cpu has 80 GB "
                f"({MEMORY_ENV}): lower calibration.samples or calibration.seq_len, or set scoring: streamed, or "
                "run on a larger device") in message
    assert not results.exists()


def test_streamed_scoring_replaces_the_states_by_what_the_metrics_keep(models, cache, monkeypatch):
    """The 70B grid that needs 843 GB stored: streamed, bi keeps one float64 sum per (block, span length
    up to k = 8) and the group one capture batch of every depth; Gaussian MI keeps (L + 1 + L k) d x d
    float64 sums, which at d = 8192 is the largest term; a metric that cannot stream keeps the states."""
    batch = 81 * 4 * 2048 * 8192 * 4
    (p,) = plan(parse_config(grid(models, scoring="streamed")))
    assert not p.states_stored and p.state_bytes == 81 * 128 * 2048 * 8192 * 4
    assert p.stream_bytes == 80 * 8 * 8 + batch
    assert p.peak_bytes == p.weight_bytes + p.stream_bytes + p.activation_bytes + p.host_bytes
    monkeypatch.setenv(MEMORY_ENV, "400GB")
    validate_plan(parse_config(grid(models, scoring="streamed")))  # fits; stored it does not
    with pytest.raises(ConfigError, match="hidden states 696 GB"):
        validate_plan(parse_config(grid(models)))

    (p,) = plan(parse_config(grid(models, scoring="streamed", metrics=["bi", "mi_gauss"])))
    assert p.stream_bytes == 80 * 8 * 8 + (81 + 80 * 8) * 8192**2 * 8 + batch
    # cka_linear shares mi_gauss's covariances; hsic and mi_ksg (2048 tokens, seed 0) one sample
    (shared,) = plan(parse_config(grid(models, scoring="streamed", metrics=["bi", "mi_gauss", "cka_linear", "hsic", "mi_ksg"])))
    assert shared.stream_bytes == p.stream_bytes + 81 * 2048 * 8192 * 4
    with pytest.raises(ConfigError, match=r"streamed scoring 409 GB \(scoring: streamed\).*score fewer moment metrics"):
        validate_plan(parse_config(grid(models, scoring="streamed", metrics=["bi", "mi_gauss"])))

    (p,) = plan(parse_config(grid(models, scoring="streamed", metrics=["bi", {"name": "cka_linear", "params": {"debiased": True}}])))
    assert p.states_stored and p.peak_bytes == (p.weight_bytes + p.state_bytes + p.stream_bytes + p.activation_bytes
                                                + p.host_bytes)


def test_evaluations_count_their_batch_and_on_a_cpu_what_they_keep_between_sets(models, cache, monkeypatch):
    """Perplexity's and KL's batches are in the peak when larger than calibration's (the knob then names
    theirs); what they keep on the host (dense states within prefix_memory_mb, measured sets' within
    prefix_sets_mb, KL's dense log-probabilities) is in it when the device is the host's memory, and not
    on a CUDA device."""
    small = {"samples": 2, "seq_len": 64, "batch_size": 1}
    evaluations = {"perplexity": {"seq_len": 512, "max_windows": 2, "batch_size": 16, "prefix_sets_mb": 64},
                   "kl": {"seq_len": 256, "max_windows": 4, "batch_size": 4, "prefix_memory_mb": 0}}
    (p,) = plan(parse_config(grid(models, calibration=small, **evaluations)))
    assert p.evaluation_activation_bytes == 16 * 512 * 128256 * 4 + 2 * CHUNK_ROWS * 128256 * 4  # perplexity's: larger
    assert p.evaluation_knob == "perplexity.batch_size"
    dense = 80 * 2 * 512 * 8192 * 2  # 1.34 GB > prefix_memory_mb 1024: the budget
    assert dense > 2**30
    kl_log_probs = 4 * 255 * 128256 * 4  # kl keeps no states (prefix_memory_mb: 0), its dense log-probs
    assert p.host_bytes == 2**30 + 64 * 2**20 + kl_log_probs
    assert p.peak_bytes == p.weight_bytes + p.state_bytes + p.evaluation_activation_bytes + p.host_bytes
    # KL's batch of 64 × 256 tokens outweighs perplexity's 16 × 512: its knob is named
    (k,) = plan(parse_config(grid(models, calibration=small, perplexity=evaluations["perplexity"],
                                  kl={**evaluations["kl"], "batch_size": 64, "max_windows": 64})))
    assert k.evaluation_activation_bytes == 64 * 256 * 128256 * 4 + 2 * CHUNK_ROWS * 128256 * 4
    assert k.evaluation_knob == "kl.batch_size"
    monkeypatch.setenv(MEMORY_ENV, "400GB")
    with pytest.raises(ConfigError, match=r"activations 269 GB: perplexity\.batch_size, weights 141 GB.*"
                                          r": lower perplexity\.batch_size, or run on a larger device"):
        validate_plan(parse_config(grid(models, calibration=small,
                                        perplexity={**evaluations["perplexity"], "batch_size": 1024})))
    # on a CUDA device the shared prefix stays on the host: not in the device's peak
    monkeypatch.setattr("bench.grid.device_type", lambda device: "cuda")
    (gpu,) = plan(parse_config(grid(models, calibration=small, **evaluations)))
    assert not gpu.host_device and gpu.host_bytes == p.host_bytes
    assert gpu.peak_bytes == gpu.weight_bytes + gpu.state_bytes + gpu.evaluation_activation_bytes


def test_the_knob_is_the_largest_term(models, cache, monkeypatch):
    monkeypatch.setenv(MEMORY_ENV, "100GB")
    small = {"samples": 2, "seq_len": 64, "batch_size": 1}
    with pytest.raises(ConfigError, match="weights 282 GB at float32.*: set dtype: bfloat16, or run"):
        validate_plan(parse_config(grid(models, dtype="float32", calibration=small)))
    stability = grid(models, stability={"samples": [2, 64]}, calibration=small)
    monkeypatch.setenv(MEMORY_ENV, "400GB")
    with pytest.raises(ConfigError, match=r"lower stability\.samples\[1\] or calibration\.seq_len"):
        validate_plan(parse_config({**stability, "calibration": {**small, "seq_len": 4096}}))


def test_a_plan_that_fits_passes_and_is_printed(models, cache, tmp_path, monkeypatch):
    monkeypatch.setenv(MEMORY_ENV, "1TB")
    data = grid(models, "tiny", budgets={"blocks": [1]}, calibration={"samples": 4, "seq_len": 32})
    result = cli.invoke(app, ["validate", "--grid", str(write(tmp_path, data))])
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert ": ok: 1 cells" in out
    assert f"{llama_parameters(TINY):,}" in out
    assert "peak (capture, scoring, evaluation)" in out and "the cpu has 1 TB" in out
    assert "evaluations' shared prefix (host)" in out
    # the 70B grid fits the same override
    assert cli.invoke(app, ["validate", "--grid", str(write(tmp_path, grid(models)))]).exit_code == 0


def test_a_hub_id_is_unknown_until_loaded_and_not_checked(cache, tmp_path, monkeypatch):
    monkeypatch.setenv(MEMORY_ENV, "1")
    data = {"name": "hub", "models": ["some-org/some-model"], "metrics": ["bi"], "selectors": ["topk"],
            "budgets": {"ratios": [0.25]}, "device": "cpu"}
    (p,) = validate_plan(parse_config(data))[0]
    assert p.parameters is None and p.peak_bytes is None and p.note == "unknown until loaded"
    result = cli.invoke(app, ["validate", "--grid", str(write(tmp_path, data))])
    assert result.exit_code == 0, result.output
    assert "unknown until loaded" in result.stdout


@pytest.mark.parametrize(("text", "size"), [("25769803776", 25769803776), ("24GB", 24 * 10**9),
                                             ("24 GiB", 24 * 2**30), ("1.5e9", 1_500_000_000), ("512mb", 512 * 10**6)])
def test_memory_sizes(text, size):
    assert parse_size(text) == size


def test_a_bad_memory_override_is_a_config_error(models, cache, tmp_path, monkeypatch):
    monkeypatch.setenv(MEMORY_ENV, "lots")
    result = cli.invoke(app, ["validate", "--grid", str(write(tmp_path, grid(models, "tiny", budgets={"blocks": [1]})))])
    assert result.exit_code == 2
    assert f"{MEMORY_ENV}='lots' is not a size" in result.output


def test_the_quick_grid_still_validates_with_its_plan(smollm2_on_disk):
    result = cli.invoke(app, ["validate", "--grid", "configs/quick.yaml"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "configs/quick.yaml: ok: 6 cells" in out
    assert "plan: smollm2-135m" in out and "134,515,008" in out


def test_a_zoo_model_not_built_yet_is_planned_from_its_recipe(smollm2_on_disk, tmp_path, monkeypatch):
    """On a fresh machine (an empty cache) the plan of a zoo model is the plan of its built folder: the
    recipe records the sizes config.json would give, so nothing is downloaded to plan."""
    config = parse_config(yaml.safe_load(open("configs/full.yaml")))
    (built,) = plan(config)
    monkeypatch.setenv("BLOCKBENCH_CACHE", str(tmp_path))
    (fresh,) = plan(config)
    assert not (tmp_path / "models").exists()
    assert fresh.note is None and fresh.parameters == 134_515_008 and fresh.peak_bytes is not None
    assert fresh.to_json() == built.to_json()


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-1.5b"])
def test_every_zoo_model_is_planned_on_a_fresh_machine(name, tmp_path, monkeypatch):
    """Every zoo recipe records all the sizes the plan needs (tests/test_zoo.py checks them against the
    builds), so an empty cache still gives a full plan, and nothing is downloaded for it."""
    from algorithms.models.zoo import MODELS

    monkeypatch.setenv("BLOCKBENCH_CACHE", str(tmp_path))
    recipe = MODELS.get(name)
    assert None not in (recipe.intermediate_size, recipe.vocab_size, recipe.parameters)
    config = parse_config({**grid(tmp_path), "models": [name], "budgets": {"blocks": [2]},
                           "calibration": {"samples": 4, "seq_len": 64}})
    (p,) = plan(config)
    assert not (tmp_path / "models").exists() and not (tmp_path / "downloads").exists()
    assert p.note is None and p.peak_bytes is not None
    assert (p.n_blocks, p.width, p.intermediate_size, p.vocab_size, p.parameters) == (
        recipe.n_blocks, recipe.hidden_size, recipe.intermediate_size, recipe.vocab_size, recipe.parameters)


def test_run_prints_the_plan_first_and_its_json_has_it(models, cache, tmp_path, monkeypatch):
    monkeypatch.setenv(MEMORY_ENV, "1TB")
    path = write(tmp_path, grid(models, "tiny", budgets={"blocks": [1]}, calibration={"samples": 4, "seq_len": 32}))
    result = cli.invoke(app, ["run", "--grid", str(path), "--results", str(tmp_path / "out"), "--no-report"])
    out = " ".join(result.output.split())
    line = f"plan: {models / 'tiny'}: {human_count(llama_parameters(TINY))} parameters"
    assert line in out and out.index(line) < out.index("loading model"), result.output
    result = cli.invoke(app, ["run", "--grid", str(path), "--results", str(tmp_path / "out"), "--json"])
    (p,) = json.loads(result.stdout)["plan"]
    assert p["parameters"] == llama_parameters(TINY) and p["cells"] == 1

"""Streamed scoring (estimators.streaming): the scores of states fed batch by batch equal the stored
path's, and what a stream keeps does not grow with the number of tokens."""

import pytest
import torch

from estimators import METRICS
from estimators.base import Metric
from estimators.streaming import (
    MomentAccumulator,
    SampleAccumulator,
    TokenAccumulator,
    accumulator,
    stream_scores,
)


def _states(samples: int = 6, seq_len: int = 40, d: int = 24, blocks: int = 6, seed: int = 0) -> torch.Tensor:
    """A residual stream with a large offset (hidden states carry a few huge features), a constant feature
    and one block that shifts everything: what makes covariances cancel and sides degenerate."""
    g = torch.Generator().manual_seed(seed)
    states = [torch.randn(samples, seq_len, d, generator=g) * 3 + 50]
    for i in range(blocks):
        states.append(0.8 * states[-1] + 0.5 * torch.randn(samples, seq_len, d, generator=g) + (10.0 if i == 2 else 0))
    states = torch.stack(states)
    states[..., 3] = 7.0
    return states


EXACT = [("bi", {}), ("angular", {}), ("angular", {"tokens": "last"}),
         ("hsic", {"n_tokens": 100}), ("hsic", {"n_tokens": 100, "n_exact": 50}),  # exact and Fourier kernels
         ("hsic", {"n_tokens": None}), ("mi_ksg", {"n_tokens": 150}), ("mi_ksg", {"n_tokens": None}),
         ("mi_renyi", {"n_tokens": 64})]


@pytest.mark.parametrize(("name", "params"), EXACT)
@pytest.mark.parametrize("batch_size", [1, 4, 6])
def test_token_and_sample_kinds_equal_the_stored_path(name, params, batch_size):
    """Per-token values summed in float64 (to 1e-12 relative: the stored path takes a float64 mean of the
    same float32 cosines) and the very rows the stored path draws, the generator moved on as it moves (the
    Fourier features and the KSG noise drawn after the sample are the same): equal bit for bit."""
    states = _states()
    metric = METRICS.get(name)(**params)
    expected = metric.score_span_lengths(states, [1, 2, 3])
    got = stream_scores(metric, states, batch_size=batch_size, lengths=[1, 2, 3])
    assert sorted(got) == [1, 2, 3]
    for n in (1, 2, 3):
        assert got[n].shape == (7 - n,) and got[n].dtype == torch.float64
        if metric.stream_kind() == "sample":
            assert torch.equal(got[n], expected[n]), (n, got[n], expected[n])
        else:
            torch.testing.assert_close(got[n], expected[n], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("name", "params"), [("mi_gauss", {}), ("mi_gauss", {"max_dim": 8}), ("cka_linear", {})])
def test_moment_kinds_are_as_close_to_float64_as_the_stored_path(name, params):
    """Float32 states: both paths round (float32 products summed in float64); against the float64 truth
    the streamed scores are as accurate as the stored ones (measured on a similar stream with offset 5: mi_gauss 6.5e-7 vs 5.4e-7,
    max_dim=8 9.3e-7 vs 4.1e-6, cka 1e-7), so they agree to a few 1e-6, not to the last bit."""
    states = _states()
    metric = METRICS.get(name)(**params)
    truth = metric.score_span_lengths(states.double(), [1, 2])
    stored = metric.score_span_lengths(states, [1, 2])
    for batch_size in (1, 4):
        got = stream_scores(metric, states, batch_size=batch_size, lengths=[1, 2])
        for n in (1, 2):
            stored_error = ((stored[n] - truth[n]).abs() / truth[n].abs()).max()
            streamed_error = ((got[n] - truth[n]).abs() / truth[n].abs()).max()
            assert streamed_error < max(3 * stored_error, 2e-6), (name, n, streamed_error, stored_error)
            torch.testing.assert_close(got[n], stored[n], rtol=1e-5, atol=0)
    # in float64 the two paths are the same maths
    got64 = stream_scores(metric, states.double(), batch_size=4, lengths=[1, 2])
    for n in (1, 2):
        torch.testing.assert_close(got64[n], truth[n], rtol=1e-10, atol=0)


def test_gaussian_mi_from_moments_drops_a_constant_feature_as_the_stored_path_does():
    """A constant feature has exactly zero variance in both paths (the stream subtracts the first batch's
    mean, which equal float32 values reproduce exactly), so both drop it and agree; kept, it would make the
    correlation matrix singular."""
    states = _states().double()
    metric = METRICS.get("mi_gauss")()
    acc = accumulator(metric, depths=7, samples=6, seq_len=40)
    for start in range(0, 6, 2):
        acc.update(states[:, start:start + 2], slice(start, start + 2))
    assert acc.moments(0).cov[3, 3].item() == 0.0 and acc.moments(0).cov[2, 2].item() > 0
    side = metric.prepare_moments(acc.moments(0))
    assert side.d == 23 and side.keep.tolist() == [i for i in range(24) if i != 3]
    torch.testing.assert_close(acc.span_lengths([1])[1], metric.score_blocks(states), rtol=1e-10, atol=0)


def test_what_a_stream_keeps_does_not_grow_with_tokens():
    """The bytes held after 4 and after 64 samples: equal for every kind (a sample holds n_tokens rows
    however many tokens pass; moments hold d x d matrices; token sums one number per span)."""
    held = {}
    for samples in (4, 64):
        states = torch.randn(5, samples, 32, 16, generator=torch.Generator().manual_seed(samples))
        for name, params in [("bi", {}), ("mi_gauss", {}), ("hsic", {"n_tokens": 64})]:
            acc = accumulator(METRICS.get(name)(**params), depths=5, samples=samples, seq_len=32, max_length=2)
            for start in range(0, samples, 4):
                acc.update(states[:, start:start + 4], slice(start, start + 4))
            held[name, samples] = acc.nbytes
    assert held["bi", 4] == held["bi", 64] == 4 * 2 * 8  # (depths - 1) x max_length float64 sums
    assert held["mi_gauss", 4] == held["mi_gauss", 64] == 8 * (5 * 16 * 16 + 2 * 5 * 16 + 7 * 16 * 16)  # 4 + 3 spans
    assert held["hsic", 4] == held["hsic", 64] == 5 * 64 * 16 * 4


def test_metrics_that_keep_the_same_state_share_one_accumulator():
    """mi_gauss and cka_linear read the same covariances, hsic and mi_ksg at one n_tokens and seed the same
    rows: one accumulator each pair, fed once, kept for the longer span; every metric scores as alone."""
    from estimators.streaming import shared_accumulators

    states = _states().double()
    metrics = {"gauss": METRICS.get("mi_gauss")(), "cka": METRICS.get("cka_linear")(),
               "hsic": METRICS.get("hsic")(n_tokens=100), "ksg": METRICS.get("mi_ksg")(n_tokens=100),
               "renyi": METRICS.get("mi_renyi")(n_tokens=64), "bi": METRICS.get("bi")()}
    lengths = {"gauss": 1, "cka": 3, "hsic": 2, "ksg": 1, "renyi": 1, "bi": 2}
    feeds, streams = shared_accumulators({name: (m, 7, lengths[name]) for name, m in metrics.items()},
                                         samples=6, seq_len=40)
    assert len(feeds) == 4
    assert streams["gauss"].accumulator is streams["cka"].accumulator and streams["cka"].accumulator.max_length == 3
    assert streams["hsic"].accumulator is streams["ksg"].accumulator is not streams["renyi"].accumulator
    for start in range(0, 6, 4):
        for feed in feeds:
            feed.update(states[:, start:start + 4], slice(start, min(start + 4, 6)))
    for name, m in metrics.items():
        alone = stream_scores(m, states, batch_size=4, lengths=[1, lengths[name]])
        got = streams[name].span_lengths([1, lengths[name]])
        for n in alone:
            assert torch.equal(got[n], alone[n]), (name, n)


def test_kinds_and_refusals():
    kinds = {name: METRICS.get(name)().stream_kind() for name in METRICS.list()}
    assert kinds == {"bi": "tokens", "angular": "tokens", "mi_gauss": "moments", "cka_linear": "moments",
                     "hsic": "sample", "mi_ksg": "sample", "mi_renyi": "sample"}
    assert METRICS.get("cka_linear")(debiased=True).stream_kind() is None  # needs every token's norm
    types = {name: type(accumulator(METRICS.get(name)(), depths=3, samples=2, seq_len=4))
             for name in ("bi", "mi_gauss", "hsic")}
    assert types == {"bi": TokenAccumulator, "mi_gauss": MomentAccumulator, "hsic": SampleAccumulator}

    class Plugin(Metric):  # says nothing about streaming: scored from stored states
        name = "plugin"

        def pair(self, x, y):
            return (x - y).abs().mean().double()

    assert accumulator(Plugin(), depths=3, samples=2, seq_len=4) is None
    with pytest.raises(ValueError, match="'plugin' has no stream kind"):
        stream_scores(Plugin(), torch.randn(3, 2, 4, 5), batch_size=1)

    states = _states()
    acc = accumulator(METRICS.get("bi")(), depths=7, samples=6, seq_len=40, max_length=2)
    with pytest.raises(ValueError, match="no batch was streamed"):
        acc.span_lengths([1])
    acc.update(states, slice(0, 6))
    with pytest.raises(ValueError, match=r"span length 3: this stream kept spans of 1 to 2 blocks \(max_length\)"):
        acc.span_lengths([3])
    with pytest.raises(ValueError, match=r"max_length must be in \[1, 6\], got 7"):
        accumulator(METRICS.get("bi")(), depths=7, samples=6, seq_len=40, max_length=7)
    sample = accumulator(METRICS.get("hsic")(n_tokens=100), depths=7, samples=6, seq_len=40)
    sample.update(states[:, :3], slice(0, 3))  # half the samples never streamed
    with pytest.raises(ValueError, match="the stream covered [0-9]+ of the 100 sampled tokens"):
        sample.span_lengths([1])


# --------------------------------------------------------------------------- in the pipeline
GRID = {
    "name": "streamed",
    "metrics": ["bi", {"name": "mi_gauss", "params": {"max_dim": 8}}, {"name": "hsic", "params": {"n_tokens": 64}}],
    "selectors": ["topk", {"name": "iterative", "params": {"objective": "proxy_span"}}],
    "units": ["block", "sublayer"],
    "budgets": {"blocks": [2]},
    "calibration": {"source": "wikipedia", "samples": 6, "seq_len": 32, "seeds": [0], "batch_size": 4},
    "perplexity": {"source": "wikipedia", "seq_len": 64, "max_windows": 2},
    "device": "cpu",
}


@pytest.fixture(scope="module")
def tiny_folder(smollm2_on_disk, tmp_path_factory):
    """A 6-block random Llama with SmolLM2's tokenizer (real calibration text, a model that runs in ms)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_on_disk)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48,
                                 num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _run(tiny_folder, tmp_path, scoring: str, **extra):
    import yaml

    from bench.config import load_config
    from bench.runner import Runner
    from bench.store import ResultStore

    grid = tmp_path / f"{scoring}.yaml"
    grid.write_text(yaml.safe_dump({**GRID, **extra, "models": [str(tiny_folder)], "scoring": scoring}))
    summary = Runner(load_config(grid), tmp_path / scoring).run()
    assert summary.failed == 0
    records = ResultStore(tmp_path / scoring).records()
    return {(r.labels.metric, r.labels.selector, r.spec.get("unit", "block")): r for r in records}


@pytest.mark.usefixtures("one_thread")
def test_a_streamed_grid_selects_what_the_stored_grid_selects(tiny_folder, tmp_path):
    """Every cell of a block + sub-layer grid: the streamed run stores no hidden states, its scores equal
    the stored run's (bi to 1e-12, mi_gauss to float32 rounding, hsic bit for bit), it removes the same
    units, and only the cells whose numbers may differ in their last digits (bi, mi_gauss) change id."""
    stored = _run(tiny_folder, tmp_path, "stored")
    streamed = _run(tiny_folder, tmp_path, "streamed")
    assert sorted(stored) == sorted(streamed) and len(stored) == 12
    for key, a in stored.items():
        b = streamed[key]
        metric = key[0].split("(")[0]
        assert b.removed_blocks == a.removed_blocks, key
        if metric == "hsic":
            assert b.scores == a.scores and b.cell_id == a.cell_id, key
        else:
            # mi_gauss: this random model's block outputs are nearly its inputs (MI 17-30 nats: correlations
            # within 1e-12 of 1), where the log-determinants amplify float32 rounding; measured against the
            # float64 truth the stored scores are off by 1.2e-4, the streamed ones by 4.5e-5
            rtol = 1e-3 if metric == "mi_gauss" else 1e-12
            torch.testing.assert_close(torch.tensor(b.scores), torch.tensor(a.scores), rtol=rtol, atol=1e-12)
            assert b.cell_id != a.cell_id and b.spec["scoring"] == "streamed" and "scoring" not in a.spec, key
        assert b.evaluations["perplexity"].values == a.evaluations["perplexity"].values, key
    assert not list((tmp_path / "streamed" / "cache" / "hidden").glob("*")), "a streamed group stored its states"
    assert list((tmp_path / "stored" / "cache" / "hidden").glob("*.safetensors"))


@pytest.mark.usefixtures("one_thread")
def test_a_metric_that_cannot_stream_keeps_the_states_of_its_group(tiny_folder, tmp_path):
    import yaml

    from bench.config import load_config
    from bench.grid import expand
    from bench.stages import Pipeline

    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({**GRID, "models": [str(tiny_folder)], "scoring": "streamed", "units": ["block"],
                                    "metrics": ["bi", {"name": "cka_linear", "params": {"debiased": True}}]}))
    pipeline = Pipeline(load_config(grid), tmp_path / "r")
    cells = expand(pipeline.config)
    loaded = pipeline.load(cells[0].model)
    both = pipeline.capture(loaded, cells[0].calibration, cells=cells)
    only_bi = pipeline.capture(loaded, cells[0].calibration, cells=[c for c in cells if c.metric.name == "bi"])
    assert both.states is not None and both.states.shape == (7, 6, 32, 24)
    assert only_bi.states is None and only_bi.n_blocks == 6 and len(only_bi.streams) == 1
    cka = next(c for c in cells if c.metric.name == "cka_linear")
    assert cka.stream_kind is None and "scoring" not in cka.spec()
    with pytest.raises(RuntimeError, match="streamed its states"):
        only_bi.blocks()
    bi = next(c for c in cells if c.metric.name == "bi")
    torch.testing.assert_close(pipeline.score(only_bi, bi).values,
                               METRICS.get("bi")().score_blocks(both.states), rtol=1e-12, atol=1e-15)


@pytest.mark.usefixtures("one_thread")
def test_states_kept_in_float16_are_half_the_bytes_and_their_own_cells(tiny_folder, tmp_path):
    """``state_dtype: float16``: the group's states (and their cache file) are float16, the float32 states
    rounded; scores move by that rounding only; cells and caches are apart from float32's; the search
    loss does not start from rounded states (it runs from the first block: the very float32 numbers)."""
    import yaml

    from bench.config import load_config
    from bench.grid import expand
    from bench.plan import plan
    from bench.stages import Pipeline

    pipelines, captured = {}, {}
    for dtype in ("float32", "float16"):
        grid = tmp_path / f"{dtype}.yaml"
        grid.write_text(yaml.safe_dump({**GRID, "models": [str(tiny_folder)], "units": ["block"], "metrics": ["bi"],
                                        "state_dtype": dtype}))
        pipelines[dtype] = Pipeline(load_config(grid), tmp_path / dtype)
        cells = expand(pipelines[dtype].config)
        loaded = pipelines[dtype].load(cells[0].model)
        captured[dtype] = (pipelines[dtype].capture(loaded, cells[0].calibration), cells[0], loaded)
    (c32, cell32, loaded32), (c16, cell16, loaded16) = captured["float32"], captured["float16"]
    assert c16.states.dtype == torch.float16 and torch.equal(c16.states, c32.states.half())
    assert c16.key != c32.key and cell16.cell_id != cell32.cell_id and cell16.spec()["state_dtype"] == "float16"
    assert "state_dtype" not in cell32.spec()
    (cached,) = (tmp_path / "float16" / "cache" / "hidden").glob("*.safetensors")
    assert cached.stat().st_size < 0.55 * next((tmp_path / "float32" / "cache" / "hidden").glob("*.safetensors")).stat().st_size
    s32, s16 = pipelines["float32"].score(c32, cell32).values, pipelines["float16"].score(c16, cell16).values
    assert not torch.equal(s16, s32)
    torch.testing.assert_close(s16, s32, rtol=2e-2, atol=1e-6)
    for removed in ({2, 3}, {4}):
        assert c16.loss(loaded16.model, "block", 4)(removed) == c32.loss(loaded32.model, "block", 4)(removed)
    (p32,), (p16,) = plan(pipelines["float32"].config), plan(pipelines["float16"].config)
    assert p16.state_bytes * 2 == p32.state_bytes == 7 * 6 * 32 * 24 * 4


@pytest.mark.cuda
@pytest.mark.parametrize(("name", "params"), [("bi", {}), ("mi_gauss", {"max_dim": 8}), ("cka_linear", {}),
                                              ("hsic", {"n_tokens": 100}), ("mi_renyi", {"n_tokens": 64})])
def test_streaming_on_cuda_equals_cpu(name, params):
    """Accumulators keep their state on the batches' device; the scores come back to the CPU."""
    states = _states().double()
    metric = METRICS.get(name)(**params)
    cpu = stream_scores(metric, states, batch_size=4, lengths=[1, 2])
    cuda = stream_scores(metric, states.cuda(), batch_size=4, lengths=[1, 2])
    for n in (1, 2):
        assert cuda[n].device.type == "cpu"
        torch.testing.assert_close(cuda[n], cpu[n], rtol=1e-6, atol=1e-9)

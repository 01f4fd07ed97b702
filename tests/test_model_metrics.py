"""Model metrics (``ppl``, ``taylor``) against oracles built by hand on tiny models.

- ``ppl``: the calibration NLL of a *really* pruned copy (``pruned_copy``, ``pruned_units_copy``) minus
  the dense NLL, bit for bit (masking in place is removal).
- ``taylor``: ``sum_w w * dL/dw`` over a block is the derivative of the loss along the block's own
  weights, ``d/dt L(w_block * (1 + t))`` at ``t = 0``: checked by central finite differences on a float64
  model (step 1e-3: transformers computes the rotary tables in float32, so smaller steps are noise);
  the per-weight form ``sum_w |w * dL/dw|`` against one autograd pass over all windows at once.
"""

from __future__ import annotations

import pytest
import torch

from algorithms import MODEL_METRICS
from algorithms.evaluations.perplexity import perplexity
from algorithms.model_metrics import (
    ModelMetric,
    RemovalLoss,
    ScoringTarget,
    TaylorImportance,
    check_model_metric,
)
from algorithms.models.blocks import get_blocks, pruned_copy
from algorithms.models.nll import mean_nll
from algorithms.models.units import pruned_units_copy
from algorithms.objectives import ObjectiveFactory
from estimators import METRICS
from estimators.registry import Registry, RegistryError, find
from tests.test_removal import N_LAYERS, build, ids


@pytest.fixture(scope="module")
def llama():
    model = build("llama")
    return model, ids(seed=3, batch=5, length=12)


@pytest.fixture(scope="module")
def llama64():
    model = build("llama").double()
    return model, ids(seed=4, batch=3, length=10)


def test_registry_holds_the_model_metrics_and_the_contract_check():
    assert MODEL_METRICS.list() == ["ppl", "taylor"]
    for name in MODEL_METRICS:
        cls = MODEL_METRICS.get(name)
        assert cls.name == name and check_model_metric(cls) is None
        assert cls.higher_is_important is True
    assert check_model_metric(int) == "<class 'int'> is not a subclass of algorithms.model_metrics.ModelMetric"

    class NoScore(ModelMetric):
        name = "x"

    assert check_model_metric(NoScore) == "NoScore does not implement score_units"


def test_one_metric_axis_over_two_registries():
    assert find("bi", METRICS, MODEL_METRICS) is METRICS
    assert find("ppl", METRICS, MODEL_METRICS) is MODEL_METRICS
    with pytest.raises(RegistryError) as info:
        find("pll", METRICS, MODEL_METRICS)
    assert str(info.value).startswith("unknown metric 'pll'. Did you mean 'ppl'? Known: angular, bi, cka_linear, ")
    clash = Registry("metric")
    clash.register("bi", object, origin="plugin: other 1.0")
    with pytest.raises(RegistryError, match=r"^metric 'bi' is registered twice: by built-in and by plugin: other 1.0$"):
        find("bi", METRICS, clash)


def test_ppl_equals_the_nll_of_really_pruned_copies(llama):
    model, x = llama
    scores = RemovalLoss().score_units(ScoringTarget(model=model, input_ids=x, batch_size=2))
    dense = perplexity(model, x, batch_size=2)["nll"]
    expected = [perplexity(pruned_copy(model, [i]), x, batch_size=2)["nll"] - dense for i in range(N_LAYERS)]
    assert scores.dtype == torch.float64 and scores.tolist() == expected


@pytest.mark.parametrize("unit", ["attention", "mlp"])
def test_ppl_of_branches_equals_really_pruned_branches(llama, unit):
    model, x = llama
    scores = RemovalLoss().score_units(ScoringTarget(model=model, input_ids=x, unit=unit, batch_size=5))
    dense = mean_nll(model, x, batch_size=5)[0]
    expected = [mean_nll(pruned_units_copy(model, unit, [i]), x, batch_size=5)[0] - dense for i in range(N_LAYERS)]
    assert scores.tolist() == expected


def test_ppl_uses_the_shared_loss_and_scores_runs_by_removing_them(llama):
    model, x = llama
    loss = ObjectiveFactory(model=model, input_ids=x, batch_size=2).get("loss")
    target = ScoringTarget(model=model, input_ids=x, batch_size=2, loss=loss)
    metric = RemovalLoss()
    scores = metric.score_units(target)
    assert loss.evaluations == N_LAYERS + 1  # the dense model and each block once
    assert scores.tolist() == [loss({i}) - loss(set()) for i in range(N_LAYERS)] and loss.evaluations == N_LAYERS + 1
    run = metric.span_score(scores, 1, 2, target)
    assert run == loss({1, 2}) - loss(set()) and loss.evaluations == N_LAYERS + 2
    assert metric.span_score(scores, 3, 1, target) == scores[3].item()
    # the proxy_span objective of a model metric removes each run together
    factory = ObjectiveFactory(block_scores=scores, higher_is_important=True, metric=metric,
                               run_score=lambda s, n: metric.span_score(scores, s, n, target))
    assert factory.get("proxy_span")([1, 2, 4]) == run + scores[4].item()
    assert factory.get("proxy_sum")([1, 2, 4]) == scores[1].item() + scores[2].item() + scores[4].item()


def _nll64(model, x) -> float:
    """Mean next-token NLL in float64 throughout (the metric's own loss promotes logits to float32 only)."""
    with torch.no_grad():
        logits = model(input_ids=x).logits[:, :-1, :].double()
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)))


def _loss_with_scaled(model, x, params, t: float) -> float:
    """The loss with ``params`` scaled by ``1 + t`` (put back afterwards)."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.mul_(1 + t)
    try:
        return _nll64(model, x)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def _derivative(model, x, params, eps: float = 1e-3) -> float:
    return (_loss_with_scaled(model, x, params, eps) - _loss_with_scaled(model, x, params, -eps)) / (2 * eps)


def test_taylor_unit_sum_is_the_directional_derivative(llama64):
    model, x = llama64
    scores = TaylorImportance(granularity="unit").score_units(ScoringTarget(model=model, input_ids=x, batch_size=2))
    for block in range(N_LAYERS):
        weights = [p for name, p in get_blocks(model)[block].named_parameters() if name.endswith("weight")]
        assert scores[block].item() == pytest.approx(abs(_derivative(model, x, weights)), rel=2e-4)


def test_taylor_weight_sum_equals_one_autograd_pass(llama64):
    model, x = llama64
    scores = TaylorImportance().score_units(ScoringTarget(model=model, input_ids=x, batch_size=1))
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=x).logits[:, :-1, :]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    nll.backward()
    expected = []
    for block in get_blocks(model):
        weights = [p for name, p in block.named_parameters() if name.endswith("weight")]
        expected.append(sum(float((p.detach() * p.grad).abs().sum()) for p in weights))
    model.zero_grad(set_to_none=True)
    # float32 accumulation of each batch's w * g: equal to float32 precision
    assert scores.tolist() == pytest.approx(expected, rel=1e-6)


def test_taylor_counts_the_branch_weights_only(llama64):
    model, x = llama64
    whole = TaylorImportance(granularity="unit").score_units(ScoringTarget(model=model, input_ids=x))
    mlp = TaylorImportance(granularity="unit").score_units(ScoringTarget(model=model, input_ids=x, unit="mlp"))
    block = get_blocks(model)[2]
    mlp_params = [block.post_attention_layernorm.weight, *block.mlp.parameters()]
    assert len(mlp_params) == 4  # norm, gate, up, down
    assert mlp[2].item() == pytest.approx(abs(_derivative(model, x, mlp_params)), rel=1e-3)
    assert abs(whole[2].item() - mlp[2].item()) > 0.1 * mlp[2].item()  # the block counts its attention too


def test_taylor_leaves_the_model_as_it_was_and_works_under_inference_mode(llama):
    model, x = llama
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    get_blocks(model)[0].mlp.up_proj.weight.requires_grad_(False)
    flags["model.layers.0.mlp.up_proj.weight"] = False
    with torch.inference_mode():
        inference_x = x.clone()
    a = TaylorImportance().score_units(ScoringTarget(model=model, input_ids=inference_x, batch_size=5))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    get_blocks(model)[0].mlp.up_proj.weight.requires_grad_(True)
    # batch size changes only the float32 summation order
    b = TaylorImportance().score_units(ScoringTarget(model=model, input_ids=x, batch_size=1))
    assert a.tolist() == pytest.approx(b.tolist(), rel=1e-5)


def test_parameters_are_checked_by_name():
    with pytest.raises(ValueError, match="granularity"):
        TaylorImportance(granularity="row")
    with pytest.raises(TypeError):
        RemovalLoss(tokens="last")
    assert TaylorImportance().describe() == {"name": "taylor", "version": "1", "params": {"granularity": "weight"}}

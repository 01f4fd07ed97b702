"""The one NLL (:mod:`algorithms.models.nll`): the head on the predicted positions only and the
log-probabilities formed a chunk of positions at a time must give, bit for bit, the sum of the
straightforward formula it replaced (``cross_entropy`` over the shifted logits), because calibration
losses, loss journals, perplexities and stored baselines were all computed with that formula and
``LOSS_VERSION`` did not move. Checked on every architecture blockbench removes blocks from (tiny random
models), with chunk edges inside windows, on bfloat16 logits, on a model without ``logits_to_keep`` and
on SmolLM2 on real held-out text."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from algorithms.models import nll
from algorithms.models.nll import batch_nll, mean_nll, summed_nll
from tests.test_removal import ALL, V, build, ids

pytestmark = pytest.mark.usefixtures("one_thread")


def straightforward(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, int]:
    """The formula blockbench used until the head was trimmed: full logits, shifted copy, cross-entropy."""
    logits = model(input_ids=x, use_cache=False).logits[:, :-1, :].float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                             reduction="sum")
    return float(loss.double()), x[:, 1:].numel()


@pytest.mark.parametrize("arch", sorted(ALL))
@torch.inference_mode()
def test_the_same_bits_as_the_straightforward_formula_on_every_architecture(arch, monkeypatch):
    model = build(arch)
    monkeypatch.setattr(nll, "CHUNK_ROWS", 5)  # windows of 19 predicted positions: chunks 5, 5, 5, 4
    x = ids(seed=3, batch=3, length=20)
    assert batch_nll(model, x) == straightforward(model, x)
    assert nll._keeps_logits(type(model))  # every causal LM here trims its head


class NoTrimming(torch.nn.Module):
    """A model whose forward takes no ``logits_to_keep`` (a wrapper, as peft's): its full logits are sliced."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.inner(input_ids=input_ids, use_cache=use_cache).logits)


@torch.inference_mode()
def test_a_model_without_logits_to_keep_gives_the_same_bits(monkeypatch):
    model = NoTrimming(build("llama"))
    monkeypatch.setattr(nll, "CHUNK_ROWS", 4)
    x = ids(seed=4, batch=2, length=16)
    assert not nll._keeps_logits(NoTrimming)
    assert batch_nll(model, x) == straightforward(model, x)


@torch.inference_mode()
def test_bfloat16_logits_are_promoted_chunk_by_chunk_to_the_same_bits(monkeypatch):
    model = build("llama").to(torch.bfloat16)
    monkeypatch.setattr(nll, "CHUNK_ROWS", 3)
    x = ids(seed=5, batch=2, length=12)
    assert batch_nll(model, x) == straightforward(model, x)


def test_summed_nll_against_the_log_softmax_by_hand():
    """Known answer: uniform logits give ``log V`` per position; a logit ``a`` above ``V - 1`` zeros gives
    ``log(e^a + V - 1) - a`` for its token and ``log(e^a + V - 1)`` for the others."""
    vocab, a = 7, 2.0
    logits = torch.zeros(2, 3, vocab)
    assert summed_nll(logits, torch.zeros(2, 3, dtype=torch.long)) == pytest.approx(6 * math.log(vocab), rel=1e-6)
    logits[0, 0, 4] = a
    targets = torch.tensor([[4, 1, 0], [2, 2, 2]])
    z = math.log(math.exp(a) + vocab - 1)
    assert summed_nll(logits, targets) == pytest.approx((z - a) + 5 * math.log(vocab), rel=1e-6)
    targets[0, 0] = 1
    assert summed_nll(logits, targets) == pytest.approx(z + 5 * math.log(vocab), rel=1e-6)


@pytest.mark.slow
@pytest.mark.download
def test_smollm2_on_real_text_gives_the_same_bits(smollm2_on_disk):
    """SmolLM2 on held-out windows of 512 tokens in batches of 4, the perplexity protocol of the grids:
    the new sum equals the old one per batch, and the mean over batches too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from algorithms.data import heldout_windows

    model = AutoModelForCausalLM.from_pretrained(smollm2_on_disk, dtype=torch.float32).eval()
    windows = heldout_windows(AutoTokenizer.from_pretrained(smollm2_on_disk), "wikipedia", seq_len=512,
                              max_windows=6)
    with torch.inference_mode():
        old = [straightforward(model, windows[s : s + 4]) for s in range(0, 6, 4)]  # batches of 4 and 2
        assert [batch_nll(model, windows[s : s + 4]) for s in range(0, 6, 4)] == old
    assert mean_nll(model, windows, batch_size=4) == (sum(n for n, _ in old) / (6 * 511), 6 * 511)
    assert model.config.vocab_size == 49152 > V  # the real head: 49,152 columns, chunked by CHUNK_ROWS positions

"""The one NLL (:mod:`algorithms.models.nll`) and KL's log-probabilities: the head on the predicted
positions only and the log-probabilities formed a chunk of positions at a time must give, bit for bit,
the numbers of the straightforward formulas they replaced (``cross_entropy`` and ``log_softmax`` over the
shifted logits), because calibration losses, loss journals, perplexities, KL values and stored baselines
were all computed with those and neither ``LOSS_VERSION`` nor the evaluations' versions moved. Checked on
every architecture blockbench removes blocks from (tiny random models), with chunk edges inside windows,
on bfloat16 logits, on a model without ``logits_to_keep`` and on SmolLM2 on real held-out text."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from algorithms.evaluations.kl import kl_and_agreement, next_token_log_probs
from algorithms.models import nll
from algorithms.models.nll import batch_nll, mean_nll, summed_nll
from tests.test_removal import ALL, V, build, ids


def straightforward(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, int]:
    """The formula blockbench used until the head was trimmed: full logits, shifted copy, cross-entropy."""
    logits = model(input_ids=x, use_cache=False).logits[:, :-1, :].float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                             reduction="sum")
    return float(loss.double()), x[:, 1:].numel()


def straightforward_log_probs(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """KL's dense log-probabilities as computed until the head was trimmed: whole batches, concatenated."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        logits = model(input_ids=x[start : start + batch_size], use_cache=False).logits[:, :-1, :].float()
        out.append(torch.log_softmax(logits, dim=-1))
    return torch.cat(out)


def straightforward_kl(dense: torch.Tensor, model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> dict:
    """KL and top-1 agreement as computed until the head was trimmed: a whole batch's log-softmax at once."""
    kl_sum, agree, positions = 0.0, 0, 0
    for start in range(0, x.shape[0], batch_size):
        ids_ = x[start : start + batch_size]
        log_q = torch.log_softmax(model(input_ids=ids_, use_cache=False).logits[:, :-1, :].float(), dim=-1)
        log_p = dense[start : start + ids_.shape[0]]
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
        kl_sum += float(kl.double().sum())
        agree += int((log_p.argmax(dim=-1) == log_q.argmax(dim=-1)).sum())
        positions += kl.numel()
    return {"kl": kl_sum / positions, "top1": agree / positions, "positions": positions}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("arch", sorted(ALL))
@torch.inference_mode()
def test_the_same_bits_as_the_straightforward_formula_on_every_architecture(arch, monkeypatch):
    model = build(arch)
    monkeypatch.setattr(nll, "CHUNK_ROWS", 5)  # windows of 19 predicted positions: chunks 5, 5, 5, 4
    x = ids(seed=3, batch=3, length=20)
    assert batch_nll(model, x) == straightforward(model, x)
    assert nll._keeps_logits(type(model))  # every causal LM here trims its head


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("arch", sorted(ALL))
@torch.inference_mode()
def test_kl_and_its_dense_log_probs_are_the_same_bits_on_every_architecture(arch, monkeypatch):
    """Two differently seeded models (so KL is far from 0), 5 windows in
    batches of 2 (the last one short), chunks of 5 of 19 positions."""
    dense, other = build(arch), build(arch, seed=1)
    monkeypatch.setattr(nll, "CHUNK_ROWS", 5)
    x = ids(seed=6, batch=5, length=20)
    log_p = next_token_log_probs(dense, x, 2)
    assert torch.equal(log_p, straightforward_log_probs(dense, x, 2))
    got = kl_and_agreement(log_p, other, x, 2)
    assert got == straightforward_kl(log_p, other, x, 2)
    assert got["kl"] > 0.01 and got["positions"] == 5 * 19


class NoTrimming(torch.nn.Module):
    """A model whose forward takes no ``logits_to_keep`` (a wrapper, as peft's): its full logits are sliced."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.inner(input_ids=input_ids, use_cache=use_cache).logits)


@pytest.mark.usefixtures("one_thread")
@torch.inference_mode()
def test_a_model_without_logits_to_keep_gives_the_same_bits(monkeypatch):
    model = NoTrimming(build("llama"))
    monkeypatch.setattr(nll, "CHUNK_ROWS", 4)
    x = ids(seed=4, batch=2, length=16)
    assert not nll._keeps_logits(NoTrimming)
    assert batch_nll(model, x) == straightforward(model, x)


@pytest.mark.usefixtures("one_thread")
@torch.inference_mode()
def test_bfloat16_logits_are_promoted_chunk_by_chunk_to_the_same_bits(monkeypatch):
    model = build("llama").to(torch.bfloat16)
    monkeypatch.setattr(nll, "CHUNK_ROWS", 3)
    x = ids(seed=5, batch=2, length=12)
    assert batch_nll(model, x) == straightforward(model, x)


def test_log_prob_chunks_cover_every_position_once_in_order(monkeypatch):
    """The chunks of 2 windows × 7 positions at 3 rows: (0, 0:3) (0, 3:6) (0, 6:7) (1, 0:3) … and each
    chunk is the float32 log-softmax of its rows."""
    monkeypatch.setattr(nll, "CHUNK_ROWS", 3)
    logits = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    chunks = list(nll.log_prob_chunks(logits))
    assert [(b, rows.start, rows.stop) for b, rows, _ in chunks] == [
        (0, 0, 3), (0, 3, 6), (0, 6, 7), (1, 0, 3), (1, 3, 6), (1, 6, 7)]
    for b, rows, log_probs in chunks:
        assert log_probs.dtype == torch.float32
        assert torch.equal(log_probs, torch.log_softmax(logits[b, rows].float(), dim=-1))


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
    """SmolLM2 on 5 held-out windows of 512 tokens in batches of 4 (and 1), the perplexity protocol of
    the grids: the new mean NLL is the old batches' sums added in the same order, bit for bit; KL and
    its dense log-probabilities likewise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from algorithms.data import heldout_windows
    from algorithms.models.masking import skip_blocks

    model = AutoModelForCausalLM.from_pretrained(smollm2_on_disk, dtype=torch.float32).eval()
    windows = heldout_windows(AutoTokenizer.from_pretrained(smollm2_on_disk), "wikipedia", seq_len=512,
                              max_windows=5)
    with torch.inference_mode():
        old = [straightforward(model, windows[s : s + 4]) for s in range(0, 5, 4)]  # batches of 4 and 1
    assert mean_nll(model, windows, batch_size=4) == (sum(n for n, _ in old) / (5 * 511), 5 * 511)
    # KL of SmolLM2 without blocks 13, 14 and 17 to the dense model on 3 windows, batches of 2
    with torch.inference_mode():
        dense = next_token_log_probs(model, windows[:3], 2)
        assert torch.equal(dense, straightforward_log_probs(model, windows[:3], 2))
        with skip_blocks(model, (13, 14, 17)) as pruned:
            assert kl_and_agreement(dense, pruned, windows[:3], 2) == straightforward_kl(dense, pruned, windows[:3], 2)
    assert model.config.vocab_size == 49152 > V  # the real head: 49,152 columns, chunked by CHUNK_ROWS positions

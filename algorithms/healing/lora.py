"""``lora`` healing: LoRA fine-tuning of the pruned model on calibration text (ShortGPT, Gromov et al.
"The Unreasonable Ineffectiveness of the Deeper Layers", Shortened LLaMA), merged into the weights.

Every targeted linear layer ``W`` (``target="all-linear"``: every ``nn.Linear``/``Conv1D`` but the
output head; or a list of module names) gets a trainable low-rank update ``W + (alpha / rank) B A``
(``A`` random, ``B`` zero at the start, so step 1 sees the pruned model unchanged) with ``peft``; the
rest is frozen. ``steps`` AdamW steps (learning rate ``lr``, no weight decay) minimise the mean
next-token NLL of the calibration rows (the protocol of :func:`algorithms.models.nll.batch_nll`:
every token but the first predicted, logits in float32), ``batch_size`` rows per step taken in order
and cycling (row ``(step * batch_size + j) mod samples``), the model in eval mode (no dropout). With
the seed fixed (``torch.manual_seed(seed)`` inside a forked RNG: the caller's RNG is untouched) the
run is deterministic on the CPU. Afterwards the updates are merged (``merge_and_unload``) into the
weights of ``target.pruned`` itself, which ends as a plain model of the same architecture (it saves and
reloads with plain transformers), its ``requires_grad`` flags and train/eval mode as they were.
Cost: ``steps`` forward and backward passes of the pruned model on ``batch_size`` rows.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from algorithms import extras
from algorithms.healing.base import Healing, HealOutcome, HealTarget, Params


class LoraParams(Params):
    rank: int = Field(8, ge=1, strict=True)
    alpha: float = Field(16.0, gt=0, strict=True)
    steps: int = Field(20, ge=1, strict=True)
    lr: float = Field(2e-4, gt=0, strict=True)
    seed: int = Field(0, ge=0, strict=True)
    #: ``"all-linear"`` or the names (suffixes) of the modules that get adapters
    target: Literal["all-linear"] | tuple[str, ...] = "all-linear"
    #: rows per step; None: the target's batch size
    batch_size: int | None = Field(None, ge=1, strict=True)

    @field_validator("target")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, tuple) and (not value or not all(isinstance(v, str) and v for v in value)):
            raise ValueError("target must be 'all-linear' or a non-empty list of module names")
        return value


def next_token_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch ``(B, T)`` (every token but the first predicted, logits
    promoted to float32), with gradients: the training twin of :func:`algorithms.models.nll.batch_nll`."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1, :].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class LoraHealing(Healing):
    """LoRA fine-tuning of the pruned model on calibration text (peft, next-token loss, AdamW), merged
    into its weights afterwards; deterministic on the CPU for a fixed seed."""

    name = "lora"
    version = "1"
    requires = extras.PEFT  #: read by ``bench validate`` without importing peft
    Params = LoraParams

    def heal(self, target: HealTarget) -> HealOutcome:
        """Train LoRA adapters on ``target.pruned`` and merge them into it in place (see the module doc).
        ``trained_parameters``: the adapters' parameter count. ``info``: ``steps``, ``loss_first`` (the
        loss of step 1, i.e. of the unhealed model on its batch), ``loss_last`` (that of the last step,
        before its update), ``losses`` (every step's), ``adapted_modules``."""
        peft = extras.require("peft", feature="healing 'lora'", extra="lora")

        started = time.perf_counter()
        p = self.params
        model = target.pruned
        if target.input_ids.shape[1] < 2:
            raise ValueError("input_ids must have at least 2 tokens per row to train on next tokens")
        device = next(model.parameters()).device
        rows = p.batch_size or target.batch_size
        samples = target.input_ids.shape[0]
        flags = {name: q.requires_grad for name, q in model.named_parameters()}
        was_training = model.training
        config = peft.LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=0.0, bias="none",
                                 target_modules="all-linear" if p.target == "all-linear" else list(p.target))
        losses: list[float] = []
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad():
            torch.manual_seed(p.seed)
            peft_model = peft.get_peft_model(model, config)
            try:
                peft_model.eval()
                trainable = [q for q in peft_model.parameters() if q.requires_grad]
                trained = sum(q.numel() for q in trainable)
                adapted = sorted({name.rsplit(".lora_", 1)[0] for name, q in peft_model.named_parameters()
                                  if q.requires_grad})
                opt = torch.optim.AdamW(trainable, lr=p.lr, weight_decay=0.0)
                for step in range(p.steps):
                    index = torch.arange(step * rows, (step + 1) * rows) % samples
                    loss = next_token_loss(peft_model, target.input_ids[index].to(device))
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    losses.append(float(loss.detach()))
                    target.report(step + 1, p.steps)
            finally:
                merged = peft_model.merge_and_unload()
        if merged is not model:  # peft changes the model's modules in place and hands the same object back
            raise RuntimeError("peft's merge_and_unload returned a new model object, not target.pruned")
        for name, q in model.named_parameters():
            q.requires_grad_(flags.get(name, q.requires_grad))
        model.train(was_training)
        info = {"steps": p.steps, "batch_size": rows, "loss_first": losses[0], "loss_last": losses[-1],
                "losses": losses, "adapted_modules": len(adapted)}
        return HealOutcome(seconds=time.perf_counter() - started, trained_parameters=trained, info=info)

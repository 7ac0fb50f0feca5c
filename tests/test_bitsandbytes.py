"""bitsandbytes on the cpu: the 8-bit AdamW behind `optimizer = "adamw_8bit"`."""

from __future__ import annotations

import torch

from runtime.contract.config import StageSpec, AdapterSpec
from runtime.core.optim import build_optimizer

import bitsandbytes as bnb  # noqa: E402  (the qlora extra, part of the test extra)


def _stage(optimizer: str) -> StageSpec:
    return StageSpec(name="sft", kind="sft", data="d", start="base", adapter=AdapterSpec(kind="full"), epochs=1,
                     max_steps=None, micro_batch_size=1, grad_accum=1, learning_rate=1e-2, lr_schedule="constant",
                     warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optimizer=optimizer,
                     adam_betas=(0.9, 0.999), adam_eps=1e-8, log_every_steps=1, eval_every_steps=None,
                     save_every_steps=None, keep_checkpoints=1, length_grouping=True, packing=False, momentum=0.9,
                     report_to=(), params={}, cross_entropy="chunked", compile=False)


def _train(optimizer: str, steps: int = 20) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = build_optimizer(model, _stage(optimizer))
    x = torch.randn(256, 128)
    y = x[:, :4].sum(dim=1, keepdim=True)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


def test_adamw_8bit_keeps_8_bit_state_and_follows_adamw() -> None:
    model, opt = _train("adamw_8bit")
    assert isinstance(opt, bnb.optim.AdamW8bit)
    big = model[0].weight  # 8,192 elements: quantized state; the small tensors keep 32-bit state
    assert opt.state[big]["state1"].dtype == torch.uint8 and opt.state[big]["state2"].dtype == torch.uint8
    reference, _ = _train("adamw")
    start = _train("adamw", steps=0)[0][0].weight.detach()
    update_8bit, update = big.detach() - start, reference[0].weight.detach() - start
    # the 8-bit updates are AdamW's up to the blockwise rounding of its moments
    cosine = torch.nn.functional.cosine_similarity(update_8bit.flatten(), update.flatten(), dim=0)
    assert cosine > 0.95, float(cosine)
    assert 0.8 < update_8bit.norm() / update.norm() < 1.25

def test_adamw_8bit_state_round_trips_for_resume() -> None:
    model, opt = _train("adamw_8bit", steps=3)
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[model[0].weight].items()}
    state = opt.state_dict()
    fresh = build_optimizer(model, _stage("adamw_8bit"))
    fresh.load_state_dict(state)
    for key, value in saved.items():
        got = fresh.state[model[0].weight][key]
        assert torch.equal(got, value) if torch.is_tensor(value) else got == value, key

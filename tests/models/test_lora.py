"""LoRA with runtime scales: per-sample scales in one batch equal separate calls; nothing re-wraps."""

import pytest
import torch
from torch import nn

from dmdr.models.lora import (
    LoRALinear,
    inject_lora,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    merge_adapter,
)


class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.to_q = nn.Linear(d, d)
        self.to_out = nn.Linear(d, d)
        self.ff = nn.Linear(d, d)

    def forward(self, x):
        return self.ff(torch.tanh(self.to_out(torch.tanh(self.to_q(x)))))


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(Block(), Block())
    scales = inject_lora(m, "critic", rank=4, alpha=8, targets=["to_q", "to_out"])
    for p in lora_parameters(m, "critic"):
        nn.init.normal_(p, std=0.3)  # non-zero B so the adapter matters
    return m, scales


def test_targets_and_scaling():
    m, _ = _model()
    names = [n for n, _ in lora_layers(m)]
    assert names == ["0.to_q", "0.to_out", "1.to_q", "1.to_out"]
    layer = m[0].to_q
    assert isinstance(layer, LoRALinear) and layer.lora_scaling["critic"] == 2.0
    with pytest.raises(ValueError, match="match no nn.Linear"):
        inject_lora(nn.Sequential(Block()), "x", 2, 2, ["to_k"])


def test_formula_against_float64():
    m, scales = _model()
    x = torch.randn(3, 5, 8)
    scales.set(critic=0.7)
    out = m[0].to_q(x)
    layer = m[0].to_q
    w, b = layer.base.weight.double(), layer.base.bias.double()
    a, bb = layer.lora_A["critic"].double(), layer.lora_B["critic"].double()
    ref = x.double() @ w.T + b + 0.7 * 2.0 * (x.double() @ a.T) @ bb.T
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_per_sample_scales_equal_separate_calls():
    m, scales = _model()
    x = torch.randn(3, 5, 8)
    per = torch.tensor([0.25, 0.25, 2.0])
    scales.set(critic=per)
    batched = m(x)
    for i, s in enumerate(per.tolist()):
        scales.set(critic=s)
        assert torch.allclose(batched[i], m(x[i : i + 1])[0], atol=1e-6)
    scales.set(critic=0.0)
    base_only = m(x)
    for layer in (mod for _, mod in lora_layers(m)):
        for p in layer.lora_B.values():
            p.data.zero_()
    scales.set(critic=5.0)
    assert torch.allclose(m(x), base_only, atol=1e-6)


def test_changing_scale_keeps_modules_and_params():
    m, scales = _model()
    ids = [id(mod) for mod in m.modules()]
    pids = [id(p) for p in m.parameters()]
    for s in (0.0, 0.5, torch.tensor([1.0, 2.0])):
        scales.set(critic=s)
        m(torch.randn(2, 4, 8))
    assert ids == [id(mod) for mod in m.modules()] and pids == [id(p) for p in m.parameters()]


def test_gradients_reach_only_the_adapter():
    m, scales = _model()
    for p in m.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(m, "critic"):
        p.requires_grad_(True)
    scales.set(critic=2.0)
    m(torch.randn(2, 3, 8)).pow(2).mean().backward()
    assert all(p.grad is not None for p in lora_parameters(m, "critic"))
    assert all(p.grad is None for n, p in m.named_parameters() if "lora_" not in n)


def test_two_adapters_and_merge():
    m, scales = _model()
    inject_lora(m, "generator", rank=2, alpha=2, targets=["to_q"])
    for p in lora_parameters(m, "generator"):
        nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 3, 8)
    scales.set(critic=0.0, generator=1.0)
    with_gen = m(x)
    merge_adapter(m, "generator", scale=1.0)
    scales.set(generator=0.0)
    assert torch.allclose(m(x), with_gen, atol=1e-5)
    sd = lora_state_dict(m, "critic")
    assert "0.to_q.lora_A.weight" in sd and sd["0.to_q.lora_A.weight"].shape == (4, 8)


def test_init_is_a_function_of_seed_module_and_adapter():
    """``lora_A`` depends on (seed, module name, adapter) only: not on the global RNG nor the order."""
    from dmdr.models.lora import init_from_key, lora_init

    def build(seed, order):
        m = nn.Sequential(Block(), Block())
        for adapter in order:
            torch.manual_seed(len(adapter))  # the global RNG must not matter
            inject_lora(m, adapter, rank=3, alpha=3, targets=["to_q", "to_out"], seed=seed)
        return m

    a, b = build(7, ["critic", "generator"]), build(7, ["generator", "critic"])
    for (name, la), (_, lb) in zip(lora_layers(a), lora_layers(b)):
        for adapter in ("critic", "generator"):
            assert torch.equal(la.lora_A[adapter], lb.lora_A[adapter])
            assert torch.equal(la.lora_A[adapter], lora_init((3, 8), seed=7, module=name, adapter=adapter))
            assert torch.equal(la.lora_A[adapter], init_from_key(f"{name}.lora_A.{adapter}", (3, 8),
                                                                 torch.float32, seed=7))
            assert not la.lora_B[adapter].any() and la.lora_A[adapter].dtype == torch.float32
            assert la.lora_A[adapter].abs().max() <= 1 / 8 ** 0.5  # kaiming-uniform(a=sqrt(5)) bound
    layer = a[0].to_q
    assert not torch.equal(layer.lora_A["critic"], layer.lora_A["generator"])
    assert not torch.equal(layer.lora_A["critic"], a[1].to_q.lora_A["critic"])
    assert not torch.equal(layer.lora_A["critic"], build(8, ["critic"])[0].to_q.lora_A["critic"])
    assert init_from_key("0.to_q.weight", (8, 8), torch.float32) is None


def test_activation_checkpoint_recompute_sees_forward_time_scales():
    """The generator step's pattern: forward at one scale, the same network called at other scales
    (a per-sample batch of another size), then backward through the first forward's recompute."""
    from dmdr.distributed.parallelize import apply_activation_checkpointing

    def grads(ac: bool):
        m, scales = _model()
        for p in m.parameters():
            p.requires_grad_("lora_" in str(p.shape) or p.ndim == 2 and p.shape[0] in (4,))
        params = lora_parameters(m, "critic")
        for p in params:
            p.requires_grad_(True)
        if ac:
            apply_activation_checkpointing(m, list(m), "full")
        x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
        scales.set(critic=torch.tensor([0.5, 2.0]))
        loss = m(x).pow(2).mean()
        with torch.no_grad():  # the teacher's 3x batched call in between
            scales.set(critic=torch.tensor([0.1, 0.1, 0.1, 3.0, 3.0, 3.0]))
            m(torch.randn(6, 3, 8))
        loss.backward()
        assert isinstance(scales.get("critic"), torch.Tensor) and scales.get("critic").shape == (6,)
        return [p.grad.clone() for p in params]

    for a, b in zip(grads(ac=False), grads(ac=True)):
        assert torch.allclose(a, b, atol=1e-6)

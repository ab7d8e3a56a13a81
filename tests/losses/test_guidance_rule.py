"""The real/fake score rule of guidance-distilled teachers (FLUX.1-dev, docs/guidance.md) against hand-computed
float64 references: the real score at embedding w (LoRA s_r), the fake score at the generator's embedding (LoRA
s_f), one 2x teacher call; optional true CFG on top (3x); the CFG rule unchanged; the tiny FLUX.1 teacher reads
the embedding from the conditioning."""

from __future__ import annotations

import pytest
import torch

from dmdr.algorithm import DecoupledDMD, dmd_generator_loss
from dmdr.guidance import CFG, GUIDANCE_KEY, ScoreRule, with_guidance
from dmdr.parameterization import FlowMatching

PARAM = FlowMatching(t_min=0.001)
B, C, H, W = 3, 2, 4, 4


class EmbeddedCritic:
    """A fixed nonlinear 'teacher + critic LoRA' whose prediction depends on x, t, the text, the guidance embedding
    and the per-sample LoRA scale; records every call."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.m = torch.randn(C, C, generator=g, dtype=torch.float64)
        self.calls: list[dict] = []

    def __call__(self, x, t, cond, scale):
        self.calls.append({"batch": x.shape[0], "guidance": cond[GUIDANCE_KEY].clone(), "scale": scale.clone()})
        return self.f(x, t, cond["text"], cond[GUIDANCE_KEY], scale).float()

    def f(self, x, t, text, guidance, scale):
        col = lambda v: v.double().view(-1, 1, 1, 1)  # noqa: E731
        mixed = torch.tanh(torch.einsum("bchw,cd->bdhw", x.double(), self.m))
        return mixed * (1 + col(scale)) + col(text) * col(t) + 0.3 * col(guidance) * mixed.flip(1)


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, C, H, W, generator=g)
    cond = {"text": torch.rand(B, generator=g) + 0.5}
    uncond = {"text": torch.zeros(B)}
    t_d = torch.rand(B, generator=g) * 0.8 + 0.1
    return x0, cond, uncond, t_d


def _x0(x, t, v):
    return x + (PARAM.t_min - t.double().view(-1, 1, 1, 1)) * v


def _reference(critic, x0, cond, uncond, t_d, eps, w, g_gen, s_r, s_f, true_cfg=1.0):
    """By hand, float64: x_d, v_real = f(x_d; g=w, s_r) (true CFG on top if asked), v_fake = f(x_d; g=g_gen, s_f),
    g = (p_r - p_f) / (mean |p_r| + 1e-8)."""
    x0, t = x0.double(), t_d.double()
    x_d = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps.double()
    full = lambda v: torch.full((B,), float(v), dtype=torch.float64)  # noqa: E731
    v_real = critic.f(x_d, t, cond["text"], full(w), full(s_r))
    if true_cfg > 1:
        v_u = critic.f(x_d, t, uncond["text"], full(w), full(s_r))
        v_real = v_u + true_cfg * (v_real - v_u)
    v_fake = critic.f(x_d, t, cond["text"], full(g_gen), full(s_f))
    p_r, p_f = x0 - _x0(x_d, t, v_real), x0 - _x0(x_d, t, v_fake)
    return (p_r - p_f) / (p_r.abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-8)


@pytest.mark.parametrize("true_cfg", [1.0, 2.5])
def test_embedded_rule_against_a_hand_computed_reference(true_cfg):
    x0, cond, uncond, t_d = _inputs()
    w, g_gen, s_r, s_f = 4.2, 3.5, 0.3, 2.0
    critic = EmbeddedCritic()
    rule = ScoreRule(embedded=True, generator_guidance=g_gen, true_cfg=true_cfg)
    out = dmd_generator_loss(x0, cond, uncond, critic, PARAM, t_d, w, s_r, s_f,
                             generator=torch.Generator().manual_seed(5), rule=rule)
    eps = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(5))
    ref = _reference(critic, x0, cond, uncond, t_d, eps, w, g_gen, s_r, s_f, true_cfg)
    torch.testing.assert_close(out.grad.double(), ref, rtol=1e-5, atol=1e-5)
    # ONE teacher call: [cond @ w, cond @ g_gen] (2x), or [uncond @ w, cond @ w, cond @ g_gen] (3x)
    assert len(critic.calls) == 1
    call = critic.calls[0]
    n_real = 2 if true_cfg > 1 else 1
    assert call["batch"] == (n_real + 1) * B
    expect_g = torch.tensor([w] * (n_real * B) + [g_gen] * B)
    expect_s = torch.tensor([s_r] * (n_real * B) + [s_f] * B)
    torch.testing.assert_close(call["guidance"], expect_g)
    torch.testing.assert_close(call["scale"], expect_s)
    x = x0.clone().requires_grad_(True)  # what the generator receives: g / numel
    dmd_generator_loss(x, cond, uncond, critic, PARAM, t_d, w, s_r, s_f, generator=torch.Generator().manual_seed(5),
                       rule=rule).loss.backward()
    torch.testing.assert_close(x.grad.double(), ref / x0.numel(), rtol=1e-5, atol=1e-9)


def test_real_and_fake_at_the_same_embedding_and_scale_give_no_gradient():
    """With w = g_gen and s_r = s_f the real and fake scores are the same call: the gradient is exactly 0 (the
    fake score starts where the real one is when the generator runs at the real score's embedding)."""
    x0, cond, uncond, t_d = _inputs(3)
    out = dmd_generator_loss(x0, cond, uncond, EmbeddedCritic(), PARAM, t_d, 3.5, 1.0, 1.0,
                             generator=torch.Generator().manual_seed(1),
                             rule=ScoreRule(embedded=True, generator_guidance=3.5))
    assert torch.equal(out.grad, torch.zeros_like(out.grad))


def test_cfg_rule_keeps_the_three_branch_call():
    conds, n_real = CFG.branches("c", "u", 7.0)
    assert conds == ["u", "c", "c"] and n_real == 2
    u, c, f = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert CFG.combine([u, c, f], 7.0) == (u, c, 7.0, f)


def test_decoupled_dmd_refuses_an_embedded_teacher():
    x0, cond, uncond, t_d = _inputs()
    with pytest.raises(ValueError, match="dmd.decoupled needs a CFG teacher"):
        dmd_generator_loss(x0, cond, uncond, EmbeddedCritic(), PARAM, t_d, 3.5, 0.0, 1.0,
                           decoupled=DecoupledDMD(), rule=ScoreRule(embedded=True, generator_guidance=3.5))


def test_tiny_flux_teacher_reads_the_embedding_from_the_conditioning(tmp_path):
    """The FLUX.1 adapter: a conditioning's per-sample ``guidance`` overrides the generator's default embedding,
    which ``configure_guidance`` sets; the rule it declares carries that value; schnell-like nets are CFG."""
    from dmdr.models import load_backbone
    from dmdr.models.tiny_flux import build_tiny_flux

    backbone = load_backbone(build_tiny_flux(tmp_path / "flux"), dtype=torch.float32, max_sequence_length=8)
    teacher = backbone.teacher
    teacher.configure_guidance(2.0, true_cfg=1.0)
    assert teacher.score_rule() == ScoreRule(embedded=True, generator_guidance=2.0, true_cfg=1.0)
    cond = backbone.text_encoder.encode(["a red cube", "a cat"])
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.7, 0.3])
    with torch.no_grad():
        default = teacher(x, t, cond)
        explicit = teacher(x, t, with_guidance(cond, 2.0))
        other = teacher(x, t, with_guidance(cond, 5.0))
    assert torch.equal(default, explicit)
    assert (default - other).abs().max() > 1e-4
    teacher.net.register_to_config(guidance_embeds=False)
    assert teacher.score_rule() == CFG

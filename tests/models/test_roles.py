"""Generator and critic LoRA on the real adapters: per-sample scales in one batch, freezing, the full copy."""

import pytest
import torch

from dmdr.models import (
    CRITIC,
    GENERATOR,
    add_critic_lora,
    cat_conditioning,
    make_generator,
)
from dmdr.models.lora import lora_layers, lora_parameters


def _randomise(net, adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(net, adapter):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("family", ["sd3", "zimage", "sdxl"])
def test_per_sample_scales_equal_separate_forwards(load, family):
    """One forward over (uncond, cond, fake) at scales (s_r, s_r, s_f) equals three forwards (SDXL: with
    LoRA on the UNet's convolutions too)."""
    b = load(family)
    generator, adapter = make_generator(b, "lora", rank=4, alpha=8)
    add_critic_lora(b, rank=4, alpha=4)
    _randomise(b.teacher.net, CRITIC)
    _randomise(b.teacher.net, GENERATOR, seed=1)
    names = {n for n, _ in lora_layers(b.teacher.net)}
    assert names and all(any(n.endswith(t) for t in b.lora_targets) for n in names)

    enc = b.text_encoder
    cond = enc.encode(["a red cube on a blue floor"])
    # uncond and cond differ in caption length for Z-Image: the batch is padded and masked inside.
    batch_cond = cat_conditioning([enc.negative(), cond, cond])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *b.latent_shape(16), generator=g).expand(3, -1, -1, -1).contiguous()
    t = torch.full((3,), 0.6)
    s_r, s_f = 0.35, 2.0
    with torch.no_grad():
        per_sample = {GENERATOR: 0.0, CRITIC: torch.tensor([s_r, s_r, s_f])}
        batched = b.teacher(x, t, batch_cond, lora_scales=per_sample)
        singles = []
        for i, s in enumerate((s_r, s_r, s_f)):
            c = {k: v[i:i + 1] for k, v in batch_cond.items()}
            singles.append(b.teacher(x[i:i + 1], t[i:i + 1], c, lora_scales={GENERATOR: 0.0, CRITIC: s}))
        base = b.teacher(x[2:], t[2:], cond, lora_scales={GENERATOR: 0.0, CRITIC: 0.0})
        gen = generator(x[2:], t[2:], cond, lora_scales={GENERATOR: 1.0, CRITIC: 0.0})
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-4, atol=1e-5)
    # Not vacuous: the scale changes the output, and uncond differs from cond.
    assert (singles[1] - singles[2]).abs().max() > 1e-3
    assert (singles[0] - singles[1]).abs().max() > 1e-3
    assert (singles[2] - base).abs().max() > 1e-3 and (gen - base).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["sd3", "zimage"])
def test_lora_generator_shares_the_frozen_base(load, family):
    b = load(family, load_text_encoder=False)
    generator, adapter = make_generator(b, "lora")
    critic = add_critic_lora(b)
    assert generator is b.teacher and adapter == GENERATOR
    gen_params = lora_parameters(b.teacher.net, GENERATOR)
    trainable = {id(p) for p in b.teacher.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in gen_params + critic}
    layer = next(layer for _, layer in lora_layers(b.teacher.net))
    assert layer.lora_A[GENERATOR].shape[0] == 64 and layer.lora_scaling[GENERATOR] == 2.0
    assert layer.lora_A[CRITIC].shape[0] == 32 and layer.lora_scaling[CRITIC] == 1.0
    # Fresh adapters are no-ops (B = 0): the generator starts as the teacher.
    x, t = torch.randn(2, 16, 8, 8), torch.tensor([0.9, 0.4])
    cond = _dummy_cond(b, 2)
    with torch.no_grad():
        a = generator(x, t, cond, lora_scales={GENERATOR: 1.0, CRITIC: 0.0})
        c = b.teacher(x, t, cond, lora_scales={GENERATOR: 0.0, CRITIC: 0.0})
    torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sd3", "zimage"])
def test_full_generator_is_a_trainable_copy(load, family):
    b = load(family, load_text_encoder=False)
    generator, adapter = make_generator(b, "full", dtype=torch.float64)
    critic = add_critic_lora(b)
    assert adapter is None and generator is not b.teacher
    assert all(p.requires_grad and p.dtype == torch.float64 for p in generator.parameters())
    assert not list(lora_layers(generator.net))  # the copy was taken before the critic LoRA
    assert {id(p) for p in b.teacher.parameters() if p.requires_grad} == {id(p) for p in critic}
    # Training the copy leaves the teacher untouched; gradients reach the copy's weights.
    x, t, cond = torch.randn(1, 16, 8, 8), torch.tensor([0.5]), _dummy_cond(b, 1)
    generator(x, t, cond).square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())
    assert all(p.grad is None for p in b.teacher.parameters())
    with pytest.raises(ValueError, match="before any LoRA"):
        make_generator(b, "full")


def _dummy_cond(b, n):
    """Random conditioning of the family's shapes (as an embedding cache would provide)."""
    g = torch.Generator().manual_seed(5)
    if b.family == "sd3":
        return {"prompt_embeds": torch.randn(n, 77 + 16, 32, generator=g),
                "pooled_prompt_embeds": torch.randn(n, 32, generator=g)}
    mask = torch.arange(64)[None, :] < torch.tensor([40, 64][:n])[:, None]
    return {"prompt_embeds": torch.randn(n, 64, 32, generator=g) * mask[..., None], "prompt_mask": mask}


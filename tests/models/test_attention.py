"""``model.attention``: names checked against diffusers' dispatcher, one-line errors on CPU, ``native`` bitwise
equal to the stock path (SD3's processor swapped for one that goes through the dispatcher), and the choice
recorded in the TensorBoard text summary."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from dmdr.config import TrainConfig, apply_overrides
from dmdr.errors import ConfigError
from dmdr.models import attention
from dmdr.models.attention import INSTALL, resolve_attention

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a cuda device object needs no GPU


@pytest.mark.parametrize("value", ["auto", "native", "flash", "flash_varlen", "flash3", "sage", "xformers", "flex"])
def test_dispatcher_names_and_auto_are_accepted(value):
    assert apply_overrides(TrainConfig(), ["--model.attention", value]).model.attention == value


@pytest.mark.parametrize("value,needle", [
    ("flashh", "is not one of auto, flash,"),
    ("sdpa", "native"),
    ("flash_hub", "dmdr never downloads; install the package and use flash instead"),
])
def test_bad_names_fail_in_one_line(value, needle):
    with pytest.raises(ConfigError, match="--model.attention") as err:
        apply_overrides(TrainConfig(), ["--model.attention", value])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_auto_is_native_on_cpu_and_flash_on_cuda_with_the_package(monkeypatch):
    assert resolve_attention("auto", CPU) == "native"
    assert resolve_attention("native", CPU) == "native"
    if not attention.flash_attn_usable():  # this machine: no flash-attn, so auto stays native on CUDA too
        assert resolve_attention("auto", CUDA) == "native"
    monkeypatch.setattr(attention, "flash_attn_usable", lambda: True)
    assert resolve_attention("auto", CPU) == "native"
    assert resolve_attention("auto", CUDA) == "flash"
    assert resolve_attention("auto", CUDA, masked=True, family="zimage") == "flash_varlen"


@pytest.mark.parametrize("value", ["flash", "flash_varlen"])
def test_flash_on_cpu_names_the_backend_and_the_install_command(value):
    with pytest.raises(ConfigError) as err:
        resolve_attention(value, CPU)
    msg = str(err.value)
    assert msg.startswith(f"--model.attention {value}: flash-attn runs only on GPUs") and INSTALL in msg
    assert "\n" not in msg


def test_gpu_only_backends_on_cpu_and_masks():
    with pytest.raises(ConfigError, match="--model.attention sage: the sage backend runs only on GPUs"):
        resolve_attention("sage", CPU)
    with pytest.raises(ConfigError, match="zimage transformer passes a padding mask.*use --model.attention "
                                          "flash_varlen"):
        resolve_attention("flash", CUDA, masked=True, family="zimage")
    with pytest.raises(ConfigError, match="_flash_varlen_3"):
        resolve_attention("flash3", CUDA, masked=True, family="zimage")


@pytest.mark.skipif(attention.flash_attn_usable(), reason="flash-attn is installed here")
def test_flash_without_the_package_names_the_install_command():
    with pytest.raises(ConfigError) as err:  # on a (nominal) CUDA device: diffusers' own package check
        resolve_attention("flash", CUDA)
    assert "flash-attn" in str(err.value) and str(err.value).endswith(f"install it with {INSTALL}")


def test_build_stops_on_the_backend_before_loading_the_model(tmp_path):
    from dmdr.build import build_models

    cfg = apply_overrides(TrainConfig(), ["--model.path", str(tmp_path / "missing"), "--model.attention", "flash"])
    with pytest.raises(ConfigError, match="--model.attention flash"):  # not the missing folder
        build_models(cfg, CPU)


def _forward_backward(denoiser, x, t, cond):
    x = x.clone().requires_grad_(True)
    out = denoiser(x, t, cond)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("family", ["sd3", "zimage"])
def test_native_is_bitwise_the_default_path_and_goes_through_the_dispatcher(load, family, one_thread):
    from diffusers.models import attention_dispatch

    b = load(family)
    g = torch.Generator().manual_seed(0)
    # Two prompts of different lengths: Z-Image then passes a padding mask to every attention.
    cond = b.text_encoder.encode(["a red cube", "a much longer prompt about a blue sphere on a wooden floor"])
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.3, 0.8])
    default = _forward_backward(b.teacher, x, t, cond)

    b.teacher.set_attention_backend("native")
    registry = attention_dispatch._AttentionBackendRegistry._backends
    key = attention_dispatch.AttentionBackendName.NATIVE
    spy = mock.Mock(side_effect=registry[key])
    with mock.patch.dict(registry, {key: spy}):  # the dispatcher looks the backend up per call
        native = _forward_backward(b.teacher, x, t, cond)
    attentions = [m for m in b.teacher.net.modules() if hasattr(m, "processor")]
    assert spy.call_count == len(attentions) > 0  # every attention went through the dispatcher
    assert all(str(m.processor._attention_backend) in ("native", "AttentionBackendName.NATIVE")
               for m in attentions)
    for a, n in zip(default, native):
        assert torch.equal(a, n)


def test_run_summary_records_the_backend_in_tensorboard(load, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dmdr.build import run_summary
    from dmdr.observability import MetricsLogger

    b = load("sd3")
    b.extras["attention"] = "native"
    cfg = apply_overrides(TrainConfig(), ["--model.attention", "auto"])
    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log_text(0, "run/summary", run_summary(cfg, b, CPU, 1))
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("run/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "attention backend: native (model.attention=auto)" in text and '"attention": "auto"' in text

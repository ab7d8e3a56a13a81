"""The family registry: each adapter's spec is the one place a family is described, and config, export,
release, card and planner read it."""

import dataclasses

import pytest

from dmdr.config import TrainConfig, apply_overrides
from dmdr.errors import ConfigError
from dmdr.models import flux, flux2, sd3, sdxl, zimage
from dmdr.models.families import FAMILIES, family_of_pipeline, family_spec, register_family
from dmdr.planning.specs import plan_hooks, resolve_hook


def test_registry_lists_each_adapter_once_by_name_and_pipeline():
    assert {"sd3": sd3.FAMILY, "zimage": zimage.FAMILY, "sdxl": sdxl.FAMILY, "flux": flux.FAMILY,
            "flux2": flux2.FAMILY}.items() <= FAMILIES.items()
    assert all(spec.name == name for name, spec in FAMILIES.items())
    assert len({f.pipeline_class for f in FAMILIES.values()}) == len(FAMILIES)
    for spec in FAMILIES.values():
        assert family_of_pipeline(spec.pipeline_class) is spec
        assert spec.denoiser_component in ("transformer", "unet")
    assert family_of_pipeline("FluxKontextPipeline") is None


def test_config_checks_family_names_against_the_registry():
    with pytest.raises(ConfigError) as e:
        apply_overrides(TrainConfig(), ["--model.family", "sd4"])
    assert str(e.value) == f"--model.family: 'sd4' is not one of auto, {', '.join(FAMILIES)}"
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown model family 'sd4'"):
        family_spec("sd4")


def test_a_registered_family_is_a_valid_config_value():
    plugin = dataclasses.replace(zimage.FAMILY, name="plugin", pipeline_class="PluginPipeline")
    register_family(plugin)
    try:
        assert apply_overrides(TrainConfig(), ["--model.family", "plugin"]).model.family == "plugin"
        assert family_of_pipeline("PluginPipeline") is plugin
    finally:
        del FAMILIES["plugin"]


def test_planner_hooks_resolve_and_families_without_them_are_named():
    for name in ("sd3", "zimage"):
        hooks = plan_hooks(name)
        assert callable(resolve_hook(hooks.flops)) and callable(resolve_hook(hooks.activations))
    with pytest.raises(ConfigError, match="the planner has no model of family 'sdxl' yet"):
        plan_hooks("sdxl")


def test_export_facts_come_from_the_spec():
    from dmdr.export import InferenceSettings

    def settings(pipeline_class):
        return InferenceSettings(pipeline_class, num_inference_steps=4, shift=3.0, t_min=0.001, resolution=64,
                                 max_sequence_length=16)

    assert (settings("StableDiffusion3Pipeline").guidance_scale, settings("ZImagePipeline").guidance_scale) == (1.0, 0)
    sdxl_settings = settings("StableDiffusionXLPipeline")
    assert sdxl_settings.epsilon and sdxl_settings.denoiser_component == "unet"
    assert sdxl_settings.scheduler_class == "LCMScheduler"
    flux = InferenceSettings("FluxPipeline", 4, 3.16, 0.001, 64, 16, generator_guidance=3.0)  # the embedding
    assert (flux.guidance_scale, settings("Flux2KleinPipeline").guidance_scale) == (3.0, 1.0)
    unknown = settings("SomeOtherPipeline")  # read as a flow transformer pipeline, CFG off at 0
    assert (unknown.epsilon, unknown.denoiser_component, unknown.guidance_scale) == (False, "transformer", 0.0)

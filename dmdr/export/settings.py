"""How to call an exported pipeline so that it runs dmdr's few-step sampler (:class:`InferenceSettings`), and the
few-step scheduler configs written with it. The reasoning (sigmas, the stop after N steps, no CFG, SDXL's
``LCMScheduler``) is in ``dmdr/export/README.md``.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dmdr.config import TrainConfig
from dmdr.errors import ConfigError, ModelLoadError
from dmdr.models.families import family_of_pipeline
from dmdr.models.family import FamilySpec
from dmdr.parameterization import FlowMatching
from dmdr.schedules import generator_levels

SETTINGS_FILE = "dmdr_inference.json"
SETTINGS_FORMAT = 1
NUM_TRAIN_TIMESTEPS = 1000
"""dmdr's denoisers call the network with ``1000 t``; the scheduler's ``timesteps = num_train_timesteps * s``."""
LCM_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
            "rescale_betas_zero_snr")
"""The teacher scheduler's settings the exported ``LCMScheduler`` keeps (they define ``alphas_cumprod``)."""


class StopAfterSteps:
    """``callback_on_step_end`` that interrupts a diffusers pipeline after ``num_steps`` denoising steps."""

    def __init__(self, num_steps: int):
        self.num_steps = num_steps

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if step + 1 >= self.num_steps:
            pipe._interrupt = True  # the pipeline skips the remaining loop iterations
        return {}


@dataclass(frozen=True)
class InferenceSettings:
    """How to call the exported pipeline so that it runs dmdr's few-step sampler (see the module doc)."""

    pipeline_class: str
    num_inference_steps: int
    shift: float
    """The run's ``dmd.shift``: already applied to the sigmas (the exported scheduler's shift is 1.0)."""
    t_min: float
    resolution: int
    max_sequence_length: int
    timesteps: tuple[float, ...] = ()
    """The run's ``dmd.timesteps`` (fixed model timesteps; SDXL's integers), empty for a shifted schedule."""
    generator_guidance: float = 0.0
    """The run's ``dmd.generator_guidance``: the ``guidance_scale`` of families whose pipeline feeds it to a
    guidance embedding (FLUX.1-dev)."""

    @property
    def family(self) -> FamilySpec | None:
        """The family of :attr:`pipeline_class` (``None``: unknown, read as a flow transformer pipeline)."""
        return family_of_pipeline(self.pipeline_class)

    @property
    def epsilon(self) -> bool:
        """An epsilon-prediction UNet pipeline (``LCMScheduler`` + ``timesteps``) rather than a flow."""
        return self.family is not None and self.family.prediction == "epsilon"

    @property
    def denoiser_component(self) -> str:
        return self.family.denoiser_component if self.family else "transformer"

    @property
    def scheduler_class(self) -> str:
        return "LCMScheduler" if self.epsilon else "FlowMatchEulerDiscreteScheduler"

    @property
    def levels(self) -> list[float]:
        """The N + 1 levels ``t_0 = 1 .. t_N = t_min`` of the training sampler (float32 values)."""
        return generator_levels(self.num_inference_steps, self.shift, self.t_min, self.timesteps,
                                FlowMatching(self.t_min, timestep_scale=NUM_TRAIN_TIMESTEPS)).tolist()

    @property
    def sigmas(self) -> list[float]:
        """The N levels the network is called at; the scheduler appends the terminal 0."""
        return self.levels[:-1]

    @property
    def guidance_scale(self) -> float:
        """The pipeline's ``guidance_scale`` that switches CFG off (dmdr's generator is distilled with CFG), or the
        generator's guidance embedding for a guidance-distilled family."""
        if self.family is not None and self.family.embedded_guidance:
            return self.generator_guidance
        return self.family.no_cfg_guidance if self.family else 0.0

    def pipeline_kwargs(self, exact: bool = True) -> dict[str, Any]:
        """Keyword arguments for the stock pipeline's ``__call__`` (add ``prompt``, ``latents`` / ``generator``).

        ``exact``: N + 1 sigmas ending at ``t_min`` and a stop after N steps (dmdr's sampler to fp32
        rounding); otherwise the N sigmas alone (last step to 0: off by ``t_min * v_last``).
        """
        n = self.num_inference_steps
        if self.epsilon:  # LCMScheduler: the fixed timesteps are the whole schedule, its last step is exact
            return {"num_inference_steps": n, "timesteps": [int(t) for t in self.timesteps],
                    "guidance_scale": self.guidance_scale, "height": self.resolution, "width": self.resolution}
        kwargs: dict[str, Any] = {
            "num_inference_steps": n, "guidance_scale": self.guidance_scale, "height": self.resolution,
            "width": self.resolution, "max_sequence_length": self.max_sequence_length,
        }
        if exact:
            kwargs.update(sigmas=self.levels, callback_on_step_end=StopAfterSteps(n))
        else:
            kwargs["sigmas"] = self.sigmas
        return kwargs

    def to_json(self) -> dict[str, Any]:
        data = {"format": SETTINGS_FORMAT, **asdict(self), "timesteps": list(self.timesteps),
                "guidance_scale": self.guidance_scale}
        if self.epsilon:
            return {**data, "scheduler": {"class": self.scheduler_class}}
        return {**data, "sigmas": self.sigmas,
                "exact": {"sigmas": self.levels, "stop_after_steps": self.num_inference_steps},
                "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", "shift": 1.0,
                              "use_dynamic_shifting": False}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InferenceSettings:
        try:
            return cls(str(data["pipeline_class"]), int(data["num_inference_steps"]), float(data["shift"]),
                       float(data["t_min"]), int(data["resolution"]), int(data["max_sequence_length"]),
                       tuple(float(t) for t in data.get("timesteps", ())),
                       float(data.get("generator_guidance", 0.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{SETTINGS_FILE} lacks or mangles {e}; re-export the pipeline") from None

    @classmethod
    def from_config(cls, cfg: TrainConfig, pipeline_class: str) -> InferenceSettings:
        d = cfg.dmd
        settings = cls(pipeline_class, d.num_steps, d.shift, d.t_min, cfg.model.resolution,
                       cfg.model.max_sequence_length, tuple(d.timesteps))
        if settings.family is not None and settings.family.embedded_guidance:
            settings = dataclasses.replace(settings, generator_guidance=d.generator_guidance)
        if settings.epsilon and len(settings.timesteps) != d.num_steps:
            raise ConfigError(f"the run has no dmd.timesteps: a {pipeline_class} export needs the fixed integer "
                              "timesteps its generator was trained at (e.g. 999,749,499,249)")
        if settings.epsilon and d.sampler != "sde" and d.num_steps > 1:
            warnings.warn(f"dmd.sampler={d.sampler}: the exported LCMScheduler renoises with fresh noise (the sde "
                          "sampler), so its multi-step samples differ from the run's sample images", stacklevel=2)
        if not settings.epsilon and d.sampler != "ode":
            raise ConfigError(f"dmd.sampler={d.sampler}: the exported FlowMatchEulerDiscreteScheduler runs the ode "
                              "sampler only; sample this run with tools/sample.py --run")
        return settings

    @classmethod
    def read(cls, folder: str | Path) -> InferenceSettings:
        """The settings saved in an exported pipeline folder."""
        file = Path(folder) / SETTINGS_FILE
        try:
            return cls.from_json(json.loads(file.read_text()))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{file} is missing or unreadable ({e}): not a folder written by "
                                 "tools/convert_to_diffusers.py") from None


def base_scheduler_sigmas(settings: InferenceSettings, teacher: dict[str, Any] | None) -> dict[str, Any] | None:
    """Sigmas for the base pipeline's OWN scheduler that give the run's few-step levels, so a LoRA release needs no
    scheduler swap: the base's ``FlowMatchEulerDiscreteScheduler`` shifts any sigmas it is given,
    ``t = s u / (1 + (s - 1) u)``, so it gets the unshifted ``u = t / (s - (s - 1) t)``.

    ``None`` when that is not possible: an epsilon family (``LCMScheduler``), or a teacher scheduler that shifts by
    resolution (``use_dynamic_shifting``), stretches (``shift_terminal``) or remaps (karras / exponential / beta) the
    sigmas; the export's own ``scheduler/`` is then the way.
    """
    t = teacher or {}
    if settings.epsilon or t.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
        return None
    if any(t.get(k) for k in ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                              "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")):
        return None
    s = float(t.get("shift", 1.0))

    def unshift(level: float) -> float:
        return level / (s - (s - 1.0) * level)

    levels = [unshift(x) for x in settings.levels]
    return {"shift": s, "sigmas": levels[:-1],
            "exact": {"sigmas": levels, "stop_after_steps": settings.num_inference_steps}}


def lcm_scheduler_config(teacher: dict[str, Any] | None) -> dict[str, Any]:
    """The exported ``LCMScheduler`` config: the teacher's betas (so ``alphas_cumprod`` is the training table)."""
    return {k: v for k, v in (teacher or {}).items() if k in LCM_KEYS}


def scheduler_config(teacher: dict[str, Any] | None) -> dict[str, Any]:
    """The exported ``FlowMatchEulerDiscreteScheduler`` config: the teacher's, with sigmas passed through as given."""
    config = {k: v for k, v in (teacher or {}).items() if not k.startswith("_")}
    config.update(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0, use_dynamic_shifting=False, shift_terminal=None,
                  invert_sigmas=False, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                  stochastic_sampling=False)
    return config



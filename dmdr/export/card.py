"""The model card (``README.md``) of an export: front matter, the exact diffusers calls, training, evaluation.

What it holds and where each part comes from: ``dmdr/export/README.md``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from dmdr.config import TrainConfig
from dmdr.devices import DTYPES
from dmdr.export.settings import InferenceSettings, base_scheduler_sigmas
from dmdr.models.families import family_of_pipeline

log = logging.getLogger("dmdr")

EVAL_FILE = Path("eval") / "results.json"
LICENSE_FIELDS = ("license", "license_name", "license_link")
FORMS = ("pipeline", "lora", "single-file")


def base_card(base: str | Path) -> dict[str, Any]:
    """The front matter of the base model's ``README.md`` (empty when there is none or it does not parse)."""
    file = Path(base) / "README.md"
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", text, flags=re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as e:
        log.warning("the front matter of %s does not parse (%s); the model card gets no licence from it", file, e)
        return {}
    return data if isinstance(data, dict) else {}


def copy_licence(base: str | Path, folder: Path) -> Path | None:
    """Copy the licence file the base model's card links (``license_link``, a path inside ``base``) into ``folder``."""
    link = base_card(base).get("license_link")
    if not isinstance(link, str) or "://" in link:
        return None
    source = (Path(base) / link).resolve()
    if not source.is_file() or Path(base).resolve() not in source.parents:
        return None
    target = folder / source.name
    shutil.copyfile(source, target)
    return target


def base_model_id(base: str | Path) -> str:
    """The hub id of a base folder in the hub cache (``models--org--name/snapshots/<rev>``), else ``""``."""
    for part in reversed(Path(base).resolve().parts):
        if part.startswith("models--") and part.count("--") >= 2:
            return "/".join(part.split("--")[1:])
    return ""


def read_eval(run: str | Path) -> list[dict[str, Any]]:
    """Metrics of ``<run>/eval/results.json`` as ``[{"name", "mean", "std"?, "n"?}]``; ``[]`` if absent or unreadable.

    Accepted schemas (metric name -> mean, optional std and sample count):

    * ``tools/eval.py``'s ``{"models": [{"name", "metrics": {"hps": {"mean", "std", "ci95", "n"}}}, ...], ...}``
      (with several models each metric is prefixed by the model's name);
    * ``{"metrics": {"hps": {"mean": 0.31, "std": 0.02, "n": 1000}, ...}, ...}`` (other top-level keys ignored);
    * ``{"hps": {"mean": 0.31, "std": 0.02}, "clip": 0.27, ...}`` (a bare number is a mean);
    * ``[{"name": "hps", "mean": 0.31, "std": 0.02}, ...]`` (``metric`` also names it).
    """
    file = Path(run) / EVAL_FILE
    if not file.is_file():
        return []
    try:
        data = json.loads(file.read_text())
        if isinstance(data, dict) and isinstance(data.get("models"), list):  # tools/eval.py's report
            models = [m for m in data["models"] if isinstance(m, dict) and isinstance(m.get("metrics"), dict)]
            out = []
            for m in models:
                for row in _metric_rows(m["metrics"]):
                    if len(models) > 1:
                        row["name"] = f"{m.get('name', '?')}: {row['name']}"
                    out.append(row)
            return out
        if isinstance(data, dict) and isinstance(data.get("metrics"), dict | list):
            data = data["metrics"]
        return _metric_rows(data)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        log.warning("cannot read the evaluation results %s (%s); the model card has no evaluation section", file, e)
        return []


def _metric_rows(data: Any) -> list[dict[str, Any]]:
    items = (data.items() if isinstance(data, dict)
             else [(d.get("name", d.get("metric")), d) for d in data if isinstance(d, dict)])
    out = []
    for name, value in items:
        entry = value if isinstance(value, dict) else {"mean": value}
        if name is None or not isinstance(entry.get("mean"), int | float) or isinstance(entry["mean"], bool):
            continue
        row: dict[str, Any] = {"name": str(name), "mean": float(entry["mean"])}
        for extra in ("std", "n"):
            if isinstance(entry.get(extra), int | float):
                row[extra] = entry[extra]
        out.append(row)
    return out


def render(form: str, settings: InferenceSettings, provenance: dict[str, Any], cfg: TrainConfig, base: str | Path,
           files: dict[str, str], base_id: str = "", evaluation: list[dict[str, Any]] | None = None,
           teacher_scheduler: dict[str, Any] | None = None) -> str:
    """The README.md of an export.

    Args:
        form: one of :data:`FORMS`.
        settings: the export's few-step settings.
        provenance: ``dmdr_inference.json``'s ``source``.
        cfg: the run's :class:`dmdr.config.TrainConfig`.
        base: the base (teacher) pipeline folder.
        files: ``lora`` / ``single_file``: the written file's name.
        base_id: the base model's hub id for the calls (default: :func:`base_model_id`, else the local path).
        evaluation: :func:`read_eval`'s rows.
        teacher_scheduler: the base's scheduler config: the LoRA form's call with the base's own scheduler
            (:func:`~dmdr.export.settings.base_scheduler_sigmas`).
    """
    if settings.epsilon:
        return _epsilon_card(settings, provenance)
    card = base_card(base)
    base_id = base_id or base_model_id(base)
    base_ref = base_id or str(base)
    front: dict[str, Any] = {k: card[k] for k in LICENSE_FIELDS if card.get(k)}
    if base_id:
        front["base_model"] = base_id
    front.update(library_name="diffusers", pipeline_tag="text-to-image",
                 tags=["dmdr", "text-to-image", "distillation", "few-step"] + (["lora"] if form == "lora" else []))
    n = settings.num_inference_steps
    licence = (f"Licence: `{front['license']}`"
               + (f" ({front['license_name']})" if front.get("license_name") else "")
               + (f", see {front['license_link']}" if front.get("license_link") else "")
               + ", as the base model's card states; the base model's terms apply to this derivative."
               if front.get("license") else
               "Licence: the base model's card gives none here; its terms apply to this derivative.")
    parts = [
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n",
        f"# dmdr few-step generator ({n} steps, {_FORM_TITLE[form]})\n",
        f"Distilled with dmdr (DMDR: distribution matching distillation + RL) from `{base_ref}`, checkpoint "
        f"{provenance.get('checkpoint', '?')} of the run (generator mode {provenance.get('generator_mode', '?')}; "
        f"{_weights_line(provenance)}). {licence}\n",
        f"Sample with {n} Euler steps at the sigmas below, no classifier-free guidance "
        f"(guidance_scale={settings.guidance_scale}{_EMBEDDED if _embedded(settings) else ''}), "
        f"{settings.resolution}x{settings.resolution} pixels, "
        f"max_sequence_length={settings.max_sequence_length}. The sigmas already include the training shift "
        f"{settings.shift}; the scheduler's shift is 1.0 so that they are used as given. Everything is also in "
        "`dmdr_inference.json`.\n",
        _usage(form, settings, base_ref, files, str(provenance.get("dtype", "fp32")), provenance,
               base_scheduler_sigmas(settings, teacher_scheduler)),
        f"sigmas = {settings.sigmas}\n",
        _exact(settings),
        _training(cfg, provenance),
    ]
    if evaluation:
        parts.append(_evaluation(evaluation))
    return "\n".join(parts)


_FORM_TITLE = {"pipeline": "merged pipeline", "lora": "LoRA for the base pipeline",
               "single-file": "single-file transformer"}


def _epsilon_card(s: InferenceSettings, provenance: dict[str, Any]) -> str:
    """The card of an SDXL-style (epsilon UNet, LCMScheduler at fixed timesteps) merged export."""
    n = s.num_inference_steps
    timesteps = [int(t) for t in s.timesteps]
    return f"""# dmdr few-step generator ({n} step{"s" if n > 1 else ""})

Distilled with dmdr (DMDR) from {provenance.get("teacher", "the teacher")}, checkpoint
{provenance.get("checkpoint", "?")} (generator mode {provenance.get("generator_mode", "?")};
{_weights_line(provenance)}).
Sample with the bundled LCMScheduler at the fixed timesteps {timesteps}, no classifier-free guidance
(guidance_scale={s.guidance_scale}), {s.resolution}x{s.resolution} pixels. Each step predicts the clean image and
renoises it with fresh noise to the next timestep (dmdr's sampler); a seeded `generator` gives dmdr's sample.
Everything is also in `dmdr_inference.json`.

```python
import torch
from diffusers import {s.pipeline_class}

pipe = {s.pipeline_class}.from_pretrained("path/to/this/folder")
image = pipe("a photo of a cat", num_inference_steps={n}, timesteps={timesteps}, guidance_scale={s.guidance_scale},
             height={s.resolution}, width={s.resolution}, generator=torch.Generator().manual_seed(0)).images[0]
```

The SDXL VAE overflows in fp16: keep `pipe.vae` in fp32 (the pipeline upcasts it when its config says
`force_upcast`) or use the fp16-fix VAE.
"""


_EMBEDDED = ": the value of the guidance embedding the generator was trained at, not a CFG scale"


def _embedded(settings: InferenceSettings) -> bool:
    """A guidance-distilled family (FLUX.1-dev): the pipeline's ``guidance_scale`` is an input embedding."""
    fam = family_of_pipeline(settings.pipeline_class)
    return fam is not None and fam.embedded_guidance


def _weights_line(provenance: dict[str, Any]) -> str:
    weights = provenance.get("weights")
    if weights == "ema":
        return f"EMA weights, optim.ema_decay = {provenance.get('ema_decay', '?')}"
    if weights == "trained":
        return "trained weights, not an EMA"
    return "weights as trained"


def _call(s: InferenceSettings) -> str:
    return (f'image = pipe(prompt="a photo of a cat", num_inference_steps={s.num_inference_steps}, '
            f'sigmas=settings["sigmas"],\n             guidance_scale={s.guidance_scale}, height={s.resolution}, '
            f"width={s.resolution}, max_sequence_length={s.max_sequence_length}).images[0]")




def _user_adapters(provenance: dict[str, Any], lora_line: str) -> str:
    """Re-turbo: a LoRA release is relative to the base plus the teacher's adapters; the lines loading them all."""
    from dmdr.models.adapters import AdapterSpec

    specs = [AdapterSpec.parse(a) for a in provenance.get("teacher_adapters", [])]
    if not specs:
        return lora_line
    names = [f"user{i}" for i in range(len(specs))]
    lines = [f'pipe.load_lora_weights("{sp.path}", adapter_name="{n}")' for sp, n in zip(specs, names)]
    lines.append(lora_line.rstrip("\n").rstrip(")") + ', adapter_name="few_step")')
    weights = [sp.scale for sp in specs] + [1.0]
    lines.append(f"pipe.set_adapters({names + ['few_step']}, adapter_weights={weights})")
    return "\n".join(lines) + "\n"


def _base_scheduler_lora(s: InferenceSettings, base_ref: str, files: dict[str, str], td: str,
                         provenance: dict[str, Any], base: dict[str, Any]) -> str:
    """The LoRA form on the stock base pipeline with the base's own scheduler: ``load_lora_weights`` is the only
    extra line (the sigmas are the training levels un-shifted by the base scheduler's shift)."""
    here, cls = "path/to/this/folder", s.pipeline_class
    weight = "" if files["lora"] == "pytorch_lora_weights.safetensors" else f', weight_name="{files["lora"]}"'
    load = _user_adapters(provenance, f'pipe.load_lora_weights("{here}"{weight})\n')
    adapters = ("It is relative to the base plus the adapters the run's teacher had (`model.teacher_adapters`): "
                "load those too, at the same scales.\n\n" if provenance.get("teacher_adapters") else "")
    return (f"With the base pipeline's own scheduler (shift {base['shift']:g}) the sigmas below are the training "
            "levels before that shift, so loading the LoRA is the only extra line:\n\n"
            f"{adapters}```python\nimport json\n\nimport torch\nfrom diffusers import {cls}\n\n"
            f'pipe = {cls}.from_pretrained("{base_ref}", {td})\n{load}'
            f'settings = json.load(open("{here}/dmdr_inference.json"))\n'
            f'image = pipe("a photo of a cat", num_inference_steps={s.num_inference_steps}, '
            f'sigmas=settings["base_scheduler"]["sigmas"],\n             guidance_scale={s.guidance_scale}, '
            f"height={s.resolution}, width={s.resolution}, max_sequence_length={s.max_sequence_length}).images[0]\n"
            f"```\n\nbase-scheduler sigmas = {base['sigmas']} (exact, with the stop after "
            f"{s.num_inference_steps} steps below: `settings[\"base_scheduler\"][\"exact\"][\"sigmas\"]` = "
            f"{base['exact']['sigmas']})\n\nOr swap in this folder's few-step scheduler (shift 1.0) and pass the "
            "training levels as they are:\n\n")


def _usage(form: str, s: InferenceSettings, base_ref: str, files: dict[str, str], dtype: str,
           provenance: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> str:
    here = "path/to/this/folder"
    cls = s.pipeline_class
    td = f"dtype={DTYPES.get(dtype, torch.float32)}"  # diffusers 0.42 deprecates torch_dtype
    settings = f'settings = json.load(open("{here}/dmdr_inference.json"))\n'
    provenance = provenance or {}

    def lora_lines(folder: str) -> str:
        scheduler = f'FlowMatchEulerDiscreteScheduler.from_pretrained("{folder}", subfolder="scheduler")'
        return f'pipe.load_lora_weights("{folder}")\npipe.scheduler = {scheduler}\n'

    if form == "pipeline":
        return ("A complete diffusers pipeline (generator merged into the transformer, few-step scheduler):\n\n"
                f"```python\nimport json\n\nimport torch\nfrom diffusers import {cls}\n\n"
                f'pipe = {cls}.from_pretrained("{here}", {td})\n{settings}{_call(s)}\n```\n\n'
                "LoRA-trained runs are also released as a LoRA for the stock base pipeline "
                "(`tools/convert_to_diffusers.py --lora`), called the same way after\n\n"
                "```python\nfrom diffusers import FlowMatchEulerDiscreteScheduler\n\n"
                f'pipe = {cls}.from_pretrained("{base_ref}", {td})\n{lora_lines("path/to/lora/folder")}```\n')
    merged = ("The merged form of the same generator (`tools/convert_to_diffusers.py` without `--lora` / "
              "`--single-file`) is a full pipeline folder, called the same way:\n\n```python\n"
              f'pipe = {cls}.from_pretrained("path/to/merged/folder", {td})\n{_call(s)}\n```\n')
    head = f"```python\nimport json\n\nimport torch\nfrom diffusers import FlowMatchEulerDiscreteScheduler, {cls}"
    if form == "lora":
        kohya = provenance.get("lora_format") == "kohya"
        what = ("in kohya's / ComfyUI's layout (keys `lora_unet_<module>.lora_down/lora_up.weight` and `.alpha` = "
                "rank, the scale alpha/rank folded into lora_up; FLUX's modules are BFL's, q/k/v fused; diffusers "
                "reads this layout for the families it has a kohya converter for, Z-Image and FLUX among them: for "
                "SD3 load the diffusers form, "
                "`tools/convert_to_diffusers.py --lora`)" if kohya else
                "in diffusers' format (keys `transformer.<module>.lora_A/lora_B.weight`, the scale alpha/rank folded "
                "into lora_B, so it loads at scale 1.0)")
        weight = f', weight_name="{files["lora"]}"' if kohya else ""
        swap = _user_adapters(provenance, f'pipe.load_lora_weights("{here}"{weight})\n')
        scheduler = ('pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained('
                     f'"{here}", subfolder="scheduler")\n')
        first = (_base_scheduler_lora(s, base_ref, files, td, provenance, base) if base else
                 "Load it onto the stock base pipeline and use the few-step scheduler of this folder (the base's own "
                 "scheduler would shift the sigmas again):\n\n")
        return (f"`{files['lora']}`: the generator's LoRA {what}. {first}"
                f'{head}\n\npipe = {cls}.from_pretrained("{base_ref}", {td})\n{swap}{scheduler}{settings}'
                f"{_call(s)}\n```\n\n{merged}")
    fam = family_of_pipeline(cls)
    model_class = (fam.single_file_class if fam else None) or "<the transformer class>"
    return (f"`{files['single_file']}`: the distilled transformer as one safetensors file with diffusers' key "
            "names (UIs that load diffusers-keyed diffusion models take it as it is). In diffusers, give the base "
            "folder as `config` (diffusers infers the architecture only from the original checkpoint layouts):\n\n"
            f"{head}, {model_class}\n\n"
            f'transformer = {model_class}.from_single_file(\n    "{here}/{files["single_file"]}",\n'
            f'    config="{base_ref}", subfolder="transformer", {td})\n'
            f'pipe = {cls}.from_pretrained("{base_ref}", transformer=transformer, {td})\n'
            f'pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained("{here}", subfolder="scheduler")\n'
            f"{settings}{_call(s)}\n```\n\n{merged}")


def _exact(s: InferenceSettings) -> str:
    n = s.num_inference_steps
    return f"""The scheduler appends a terminal sigma 0, while the training sampler ends at t_min = {s.t_min}: the
call above differs from it by t_min * v in the last step only. To reproduce the training sampler
exactly, pass the N + 1 levels `settings["exact"]["sigmas"]` = {s.levels} and stop after {n} steps:

```python
def stop(pipe, i, t, kwargs):
    if i + 1 >= {n}:
        pipe._interrupt = True
    return {{}}

image = pipe(..., sigmas=settings["exact"]["sigmas"], callback_on_step_end=stop).images[0]
```
"""


def _training(cfg: TrainConfig, provenance: dict[str, Any]) -> str:
    m, d, rl, o = cfg.model, cfg.dmd, cfg.rl, cfg.optim
    mode = (f"LoRA, rank {m.generator_lora_rank}, alpha {m.generator_lora_alpha:g}" if m.generator_mode == "lora"
            else "full fine-tune")
    rewards = ("none" if rl.method == "none" or not rl.rewards else
               ", ".join(f"{r} (weight {w:g})" for r, w in zip(rl.rewards, rl.weights)) + f", margin {rl.margin:g}")
    dyn = cfg.dynamic
    on = {True: "on", False: "off"}
    decay = (f"decayed over {dyn.decay_steps} steps" if dyn.schedule == "cosine"
             else "held constant: the -Dynamic ablation")
    rows = [
        ("checkpoint", f"{provenance.get('checkpoint', '?')} of train.max_steps = {cfg.train.max_steps} "
                       "(generator steps)"),
        ("generator", mode),
        ("few-step sampler", f"{d.num_steps} steps, shift {d.shift:g}, t_min {d.t_min:g}"),
        ("DMD", f"real-score guidance {d.guidance:g}, critic steps per generator step {d.ratio}"),
        ("cold start", f"{rl.start_step} generator steps of DMD before RL (DynaDG {on[dyn.dynadg]}, "
                       f"DynaRS {on[dyn.dynars]}, {decay})"),
        ("RL", f"{rl.method}; rewards: {rewards}"),
        ("learning rates", f"generator {o.generator_lr:g} / critic {o.critic_lr:g}; RL stage "
                           f"{o.rl_generator_lr:g} / {o.rl_critic_lr:g}"),
        ("batch size per rank", f"{cfg.data.batch_size} (RL stage {cfg.data.rl_batch_size or cfg.data.batch_size})"),
        ("EMA", f"decay {o.ema_decay:g}" if o.ema_decay > 0 else "off"),
        ("exported weights", f"{provenance.get('weights', '?')}, {provenance.get('dtype', '?')}"),
    ]
    if m.teacher_adapters:
        rows.append(("teacher", "the base plus LoRAs merged at load (`model.teacher_adapters`, path:scale): "
                                + ", ".join(f"`{a}`" for a in m.teacher_adapters)))
    if m.init_generator:
        rows.append(("generator init", f"`{m.init_generator}` (`model.init_generator`)"))
    if "lora_extraction" in provenance:
        x = provenance["lora_extraction"]
        rows.append(("LoRA extraction", f"rank {x['rank']} SVD of the full fine-tune's weight change: relative "
                                        f"Frobenius error {x['relative_error']:.3g} over {x['layers']} linears; "
                                        f"{x['left_out']} non-linear parameters changed and are not in the LoRA "
                                        f"(relative change {x['left_out_relative_change']:.3g})"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"## Training\n\n| | |\n|---|---|\n{table}\n"


def _evaluation(rows: list[dict[str, Any]]) -> str:
    lines = [f"| {r['name']} | {r['mean']:.4g} | {_fmt(r.get('std'))} | {r.get('n', '')} |" for r in rows]
    return ("## Evaluation\n\nFrom the run's `eval/results.json` (`tools/eval.py`):\n\n"
            "| metric | mean | std | n |\n|---|---|---|---|\n" + "\n".join(lines) + "\n")


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.3g}"

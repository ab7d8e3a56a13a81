"""Export a dmdr run's generator as a complete diffusers pipeline folder.

    python tools/convert_to_diffusers.py --run runs/sd35 [--step 4000 | latest] --out exports/sd35-4step \\
        [--lora [--lora-rank R] | --single-file] [--weights auto|ema|trained] [--dtype bf16|fp16|fp32] \\
        [--model-path /models/sd3.5-large] [--base-id stabilityai/stable-diffusion-3.5-large] [--overwrite]

Reads ``<run>/config.json`` and the checkpoint, loads the teacher folder (``model.path``, or
``--model-path`` when it moved), rebuilds the generator as training did (LoRA mode: the ``generator``
adapter merged into the transformer at scale 1.0; full mode: the full copy) and writes the teacher's
other components as they are, the distilled transformer (SDXL: ``unet``), a few-step
``FlowMatchEulerDiscreteScheduler`` (SDXL: an ``LCMScheduler`` for ``timesteps=[...]``) and
``dmdr_inference.json`` + ``README.md`` with the call that reproduces dmdr's sampler (see
:mod:`dmdr.export`). The critic LoRA is not exported. ``--weights``: ``ema`` exports the generator's
exponential moving average (runs with ``optim.ema_decay > 0``), ``trained`` the weights as the optimizer
left them, ``auto`` (default) the EMA when the checkpoint holds one; ``dmdr_inference.json``'s
``source.weights`` records which. Load the result with the stock pipeline::

    pipe = StableDiffusion3Pipeline.from_pretrained("exports/sd35-4step")
    settings = json.load(open("exports/sd35-4step/dmdr_inference.json"))
    image = pipe(prompt, num_inference_steps=4, sigmas=settings["sigmas"], guidance_scale=1.0).images[0]

    pipe = StableDiffusionXLPipeline.from_pretrained("exports/sdxl-4step")  # SDXL: fixed integer timesteps
    image = pipe(prompt, num_inference_steps=4, timesteps=[999, 749, 499, 249], guidance_scale=0).images[0]

Other forms (:mod:`dmdr.export.release`): ``--lora`` writes only the generator adapter of a LoRA-trained run as
``pytorch_lora_weights.safetensors`` in diffusers' format, for ``pipe.load_lora_weights(out)`` on the
stock base pipeline (plus the few-step ``scheduler/``); on a full fine-tune it needs ``--lora-rank R``,
which extracts a rank-R LoRA by SVD of the weight change and reports its reconstruction error.
``--single-file`` writes the merged transformer as one safetensors file (diffusers keys). Every form has
``dmdr_inference.json`` and a model card (:mod:`dmdr.export.card`: licence from the base model's card,
training config, ``<run>/eval/results.json`` numbers when present). SDXL runs export as merged pipelines only.

Bad input (missing run, no or corrupt checkpoint, teacher folder gone) prints one ``error:`` line and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from dmdr import export
from dmdr.cli import run_tool
from dmdr.cli.checkpoint_args import add_checkpoint_arguments
from dmdr.devices import DTYPES
from dmdr.errors import ConfigError
from dmdr.export import card as model_card
from dmdr.export import release
from dmdr.models import GENERATOR
from dmdr.models.loading import read_model_index
from dmdr.preflight import raise_problems
from dmdr.preflight.tools import export_problems

log = logging.getLogger("dmdr")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the training run folder (train.output_dir)")
    parser.add_argument("--out", required=True, help="folder to write the export to")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--lora", action="store_true",
                      help="write the generator LoRA for pipe.load_lora_weights on the base pipeline, not a merged "
                           "pipeline")
    form.add_argument("--single-file", action="store_true",
                      help="write the merged transformer as one safetensors file (for UIs), not a pipeline folder")
    parser.add_argument("--lora-format", choices=release.LORA_FORMATS, default="diffusers",
                        help="--lora key layout: diffusers (pytorch_lora_weights.safetensors, default) or kohya "
                             "(lora_unet_<module>.lora_down/lora_up/alpha, as kohya's scripts and ComfyUI write; the "
                             "file is <out name>.safetensors)")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="--lora on a full fine-tune: extract a LoRA of this rank by SVD of the weight change")
    add_checkpoint_arguments(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the exported weights (default: the run's model.dtype)")
    parser.add_argument("--model-path", default="", help="the teacher folder, if it moved since training")
    parser.add_argument("--base-id", default="",
                        help="hub id of the base model for the model card (default: from a hub-cache path, else "
                             "the local folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    return parser.parse_args(argv)


def check_form(args: argparse.Namespace, generator_mode: str, run: str) -> str:
    """The export form (``pipeline``, ``lora``, ``single-file``); a LoRA request a run cannot give is one line."""
    if args.lora_rank < 0:
        raise ConfigError(f"--lora-rank {args.lora_rank}: give a rank >= 1")
    if args.lora_format != "diffusers" and not args.lora:
        raise ConfigError(f"--lora-format {args.lora_format} goes with --lora")
    if args.lora_rank and not args.lora:
        raise ConfigError("--lora-rank goes with --lora (it extracts a LoRA from a full fine-tune)")
    if args.lora and generator_mode != "lora" and not args.lora_rank:
        raise ConfigError(f"--lora: run {run} is a full fine-tune (model.generator_mode={generator_mode}) and has no "
                          "generator LoRA; pass --lora-rank R to extract a rank-R LoRA by SVD, or drop --lora")
    if args.lora_rank and generator_mode == "lora":
        raise ConfigError(f"--lora-rank: run {run} trained a LoRA; its adapter is exported as it is, drop --lora-rank")
    return "lora" if args.lora else "single-file" if args.single_file else "pipeline"


def generator_lora_layers(cfg, args: argparse.Namespace, backbone, roles, provenance: dict) -> dict:
    """The generator's LoRA layers ``(A, scaled B)``: the trained adapter, or one extracted from a full fine-tune."""
    m = cfg.model
    if m.generator_mode == "lora":
        provenance["lora"] = {"rank": m.generator_lora_rank, "alpha": m.generator_lora_alpha,
                              "scale_folded_into_lora_B": m.generator_lora_alpha / m.generator_lora_rank}
        return release.generator_lora(roles.generator.net, GENERATOR)
    extraction = release.extract_lora(roles.generator.net, release.base_parameters(backbone.teacher.net),
                                      args.lora_rank)
    provenance["lora_extraction"] = extraction.summary()
    provenance["lora"] = {"rank": args.lora_rank, "scale_folded_into_lora_B": 1.0}
    log.info("extracted a rank-%d LoRA of %d linears: relative Frobenius error %.4g; %d changed non-linear "
             "parameters left out (relative change %.4g)", args.lora_rank, len(extraction.layers),
             extraction.relative_error, len(extraction.left_out), extraction.left_out_relative)
    return extraction.layers


def convert(args: argparse.Namespace) -> str:
    """Do the export; returns the output folder."""
    raise_problems(export_problems(args))  # every bad path in one message, before anything loads
    cfg = export.read_run_config(args.run, args.model_path)
    form = check_form(args, cfg.model.generator_mode, args.run)
    checkpoint = export.resolve_checkpoint(args.run, args.step)
    export.check_output(args.out, args.overwrite)
    out_dtype = DTYPES[args.dtype or cfg.model.dtype]
    lora = cfg.model.generator_mode == "lora"
    # LoRA: merge into fp32 base weights (the teacher's stored values, upcast) and round once at the end.
    # Full: the checkpoint overwrites every weight of the copy, the teacher's dtype does not matter (except as
    # the base of an SVD extraction, also taken in fp32).
    backbone, roles, weights = export.load_generator(cfg, checkpoint, device="cpu",
                                                     dtype=torch.float32 if lora or form == "lora" else None,
                                                     load_text_encoder=False, weights=args.weights)
    folder = read_model_index(cfg.model.path)
    settings = export.InferenceSettings.from_config(cfg, folder.pipeline_class)
    if settings.epsilon and form != "pipeline":
        raise ConfigError(f"--{form}: {folder.pipeline_class} runs export as merged pipelines only (no LoRA or "
                          "single-file form for UNet families yet); drop the flag")
    provenance = {"run": str(args.run), "checkpoint": checkpoint.name, "teacher": cfg.model.path,
                  "family": backbone.family, "generator_mode": cfg.model.generator_mode, "form": form,
                  "weights": weights, "dtype": args.dtype or cfg.model.dtype,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if weights == "ema":
        provenance["ema_decay"] = cfg.optim.ema_decay
    if cfg.model.teacher_adapters:  # re-turbo: the teacher was the base plus these (merged into a merged export)
        provenance["teacher_adapters"] = list(cfg.model.teacher_adapters)
    if cfg.model.init_generator:
        provenance["init_generator"] = cfg.model.init_generator
    header = {"dmdr.base": str(args.base_id or cfg.model.path), "dmdr.checkpoint": checkpoint.name,
              "dmdr.weights": weights}
    files: dict[str, str] = {}
    transformer = state = None
    if form == "lora":
        files["lora"] = release.lora_file_name(args.lora_format, args.out)
        provenance["lora_format"] = args.lora_format
        to_state = release.kohya_state_dict if args.lora_format == "kohya" else release.lora_state_dict
        state = to_state(generator_lora_layers(cfg, args, backbone, roles, provenance), backbone.family, out_dtype)
    else:
        transformer = export.export_transformer(roles, out_dtype)
    if form == "single-file":
        files["single_file"] = f"{Path(args.out).name}.safetensors"
    provenance["files"] = files
    scheduler = backbone.extras.get("scheduler_config")
    readme = model_card.render(form, settings, provenance, cfg, cfg.model.path, files, base_id=args.base_id,
                               evaluation=model_card.read_eval(args.run), teacher_scheduler=scheduler)
    if form == "pipeline":
        return str(export.write_pipeline(folder.path, args.out, transformer, settings, scheduler, provenance, readme,
                                         overwrite=args.overwrite))

    def fill(tmp: Path) -> None:
        if form == "lora":
            release.write_lora(tmp, state, header, name=files["lora"])
        else:
            release.write_single_file(tmp / files["single_file"], transformer, header)
        export.write_common(tmp, settings, scheduler, provenance, readme, folder.path)

    out = export.write_folder(args.out, fill, overwrite=args.overwrite)
    return str(out)


def main(argv: list[str] | None = None) -> int:
    return run_tool(parse, lambda args: f"wrote {convert(args)}", argv)


if __name__ == "__main__":
    sys.exit(main())

"""Export a dmdr run's generator as a complete diffusers pipeline folder.

    python tools/convert_to_diffusers.py --run runs/sd35 [--step 4000 | latest] --out exports/sd35-4step \\
        [--weights auto|ema|trained] [--dtype bf16|fp16|fp32] [--model-path /models/sd3.5-large] [--overwrite]

Reads ``<run>/config.json`` and the checkpoint, loads the teacher folder (``model.path``, or
``--model-path`` when it moved), rebuilds the generator as training did (LoRA mode: the ``generator``
adapter merged into the transformer at scale 1.0; full mode: the full copy) and writes the teacher's
other components as they are, the distilled transformer, a few-step ``FlowMatchEulerDiscreteScheduler``
and ``dmdr_inference.json`` + ``README.md`` with the call that reproduces dmdr's sampler (see
:mod:`dmdr.export`). The critic LoRA is not exported. ``--weights``: ``ema`` exports the generator's
exponential moving average (runs with ``optim.ema_decay > 0``), ``trained`` the weights as the optimizer
left them, ``auto`` (default) the EMA when the checkpoint holds one; ``dmdr_inference.json``'s
``source.weights`` records which. Load the result with the stock pipeline::

    pipe = StableDiffusion3Pipeline.from_pretrained("exports/sd35-4step")
    settings = json.load(open("exports/sd35-4step/dmdr_inference.json"))
    image = pipe(prompt, num_inference_steps=4, sigmas=settings["sigmas"], guidance_scale=1.0).images[0]

Bad input (missing run, no or corrupt checkpoint, teacher folder gone) prints one ``error:`` line and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

# Run as a script, this folder is sys.path[0], and its profile.py would shadow the standard library's
# `profile` (which torch.distributed.checkpoint imports through cProfile).
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import torch  # noqa: E402

from dmdr.errors import UserError  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the training run folder (train.output_dir)")
    parser.add_argument("--step", default="latest", help="generator step of the checkpoint, or 'latest' (default)")
    parser.add_argument("--out", required=True, help="folder to write the diffusers pipeline to")
    parser.add_argument("--weights", choices=("auto", "ema", "trained"), default="auto",
                        help="the generator's EMA (runs with optim.ema_decay > 0), the trained weights, or auto: "
                             "the EMA when the checkpoint holds one (default)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the exported transformer (default: the run's model.dtype)")
    parser.add_argument("--model-path", default="", help="the teacher folder, if it moved since training")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    return parser.parse_args(argv)


def convert(args: argparse.Namespace) -> str:
    """Do the export; returns the output folder."""
    from dmdr import export
    from dmdr.models.loading import read_model_index
    from dmdr.preflight import raise_problems
    from dmdr.preflight.tools import export_problems

    raise_problems(export_problems(args))  # every bad path in one message, before anything loads
    cfg = export.read_run_config(args.run, args.model_path)
    checkpoint = export.resolve_checkpoint(args.run, args.step)
    export.check_output(args.out, args.overwrite)
    out_dtype = DTYPES[args.dtype or cfg.model.dtype]
    lora = cfg.model.generator_mode == "lora"
    # LoRA: merge into fp32 base weights (the teacher's stored values, upcast) and round once at the end.
    # Full: the checkpoint overwrites every weight of the copy, the teacher's dtype does not matter.
    backbone, roles, weights = export.load_generator(cfg, checkpoint, device="cpu",
                                                     dtype=torch.float32 if lora else None, load_text_encoder=False,
                                                     weights=args.weights)
    transformer = export.export_transformer(roles, out_dtype)
    folder = read_model_index(cfg.model.path)
    settings = export.InferenceSettings.from_config(cfg, folder.pipeline_class)
    provenance = {"run": str(args.run), "checkpoint": checkpoint.name, "teacher": cfg.model.path,
                  "generator_mode": cfg.model.generator_mode, "weights": weights,
                  "dtype": args.dtype or cfg.model.dtype, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if weights == "ema":
        provenance["ema_decay"] = cfg.optim.ema_decay
    out = export.write_pipeline(folder.path, args.out, transformer, settings,
                                backbone.extras.get("scheduler_config"), provenance, overwrite=args.overwrite)
    return str(out)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s dmdr %(levelname)s %(message)s")
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        out = convert(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

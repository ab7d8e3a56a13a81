"""Few-step samples from a dmdr checkpoint (dmdr's own sampler) or from an exported diffusers folder.

    python tools/sample.py --run runs/sd35 [--step 4000 | latest] [--weights auto|ema|trained] \\
        --prompts "a cat" "a dog" --out grid.png [--seed 0]
    python tools/sample.py --run runs/sd35 --prompt-file prompts.txt --out samples/grid.png
    python tools/sample.py --pipeline exports/sd35-4step --prompts "a cat" --out grid.png [--approx]

``--run``: the generator is rebuilt as training built it and sampled by the function the run's sample
grids came from (:func:`dmdr.checkpoint_sampling.sample_checkpoint`; the run's ``dmd.sampler``: N-step Euler
on the shifted schedule for SD3 / Z-Image, x0-then-renoise at the fixed integer timesteps for SDXL; no CFG,
noise from ``--seed``); ``--weights`` as in ``tools/convert_to_diffusers.py`` (default ``auto``: the generator's
EMA when the checkpoint holds one). ``--pipeline``: the stock diffusers pipeline of a folder written by
``tools/convert_to_diffusers.py`` (a ``--lora`` or ``--single-file`` export is loaded onto its base pipeline,
:func:`dmdr.export.load_release`), called with its ``dmdr_inference.json`` settings (the exact
reproduction of the training sampler; ``--approx`` uses the plain N sigmas whose last step goes to 0)
on the same noise, so both modes give the same images for the same seed.

Writes the grid to ``--out`` and each image next to it as ``<stem>-000.png``, ``<stem>-001.png``, ...
Bad input prints one ``error:`` line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

from dmdr.checkpoint_sampling import sample_checkpoint
from dmdr.cli import run_tool
from dmdr.cli.checkpoint_args import add_checkpoint_arguments
from dmdr.devices import pick_device
from dmdr.errors import ConfigError
from dmdr.export import InferenceSettings, load_release
from dmdr.models.vae import AutoencoderKLCodec
from dmdr.preflight import raise_problems
from dmdr.preflight.tools import sample_problems


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a training run folder (train.output_dir)")
    source.add_argument("--pipeline", help="a folder written by tools/convert_to_diffusers.py")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompts", nargs="+", help="one or more prompts")
    prompts.add_argument("--prompt-file", help="a text file, one prompt a line")
    parser.add_argument("--out", required=True, help="the grid image (.png); single images go next to it")
    parser.add_argument("--model-path", default="",
                        help="--run: the teacher folder, if it moved since training; --pipeline of a --lora or "
                             "--single-file export: the base pipeline folder (default: the run's teacher)")
    add_checkpoint_arguments(parser, applies="--run: ")
    parser.add_argument("--seed", type=int, default=1234, help="noise seed (default: the trainer's, 1234)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--nrow", type=int, default=4, help="images per grid row")
    parser.add_argument("--approx", action="store_true",
                        help="--pipeline: plain N sigmas (last step to 0, not t_min), no step-end callback")
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts:
        prompts = list(args.prompts)
    else:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--prompt-file {args.prompt_file}: cannot read it ({e})") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("no prompts given (--prompts, or a --prompt-file with one prompt a line)")
    return prompts


def sample_run(args: argparse.Namespace, prompts: list[str], device: torch.device) -> Tensor:
    """The checkpoint's generator, sampled as the run sampled its grids: ``(B, 3, H, W)`` in [0, 1]."""
    return sample_checkpoint(args.run, prompts, step=args.step, weights=args.weights, model_path=args.model_path,
                             seed=args.seed, device=device)


def sample_pipeline(args: argparse.Namespace, prompts: list[str], device: torch.device) -> Tensor:
    """The stock pipeline of an exported folder with its saved settings, on the trainer's noise."""
    if not Path(args.pipeline).is_dir():
        raise ConfigError(f"--pipeline {args.pipeline} is not a folder (give one written by "
                          "tools/convert_to_diffusers.py)")
    settings = InferenceSettings.read(args.pipeline)
    pipe = load_release(args.pipeline, args.model_path)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    fam = settings.family
    codec = (fam.make_codec if fam is not None and fam.make_codec else AutoencoderKLCodec)(pipe.vae)
    side = settings.resolution // codec.scale_factor
    g = torch.Generator(device=device).manual_seed(args.seed)  # the noise of dmdr.generate.sample_images
    noise = torch.randn((len(prompts), codec.latent_channels, side, side), generator=g, device=device)
    if fam is not None and fam.pipeline_latents is not None:
        noise = fam.pipeline_latents(noise)
    kwargs = settings.pipeline_kwargs(exact=not args.approx)
    if settings.epsilon:  # LCMScheduler's per-step noise continues the stream (dmdr's sde sampler)
        kwargs["generator"] = g
    with torch.no_grad():  # a copy of the list: ZImagePipeline rewrites the prompts it is given in place
        out = pipe(prompt=list(prompts), latents=noise, output_type="pt", **kwargs)
    return out.images.float()


def save(images: Tensor, out: Path, nrow: int) -> list[Path]:
    """The grid at ``out`` and each image as ``<stem>-NNN.png`` beside it; returns every path written."""
    from torchvision.utils import make_grid, save_image

    out.parent.mkdir(parents=True, exist_ok=True)
    images = images.detach().float().clamp(0, 1).cpu()
    save_image(make_grid(images, nrow=nrow), out)
    paths = [out]
    for i, image in enumerate(images):
        paths.append(out.with_name(f"{out.stem}-{i:03d}.png"))
        save_image(image, paths[-1])
    return paths


def sample(args: argparse.Namespace) -> str:
    """Sample and save; returns the line the tool prints."""
    raise_problems(sample_problems(args))  # every bad path in one message, before anything loads
    prompts = read_prompts(args)
    device = pick_device(args.device)
    images = sample_run(args, prompts, device) if args.run else sample_pipeline(args, prompts, device)
    paths = save(images, Path(args.out), args.nrow)
    return f"wrote {paths[0]} and {len(paths) - 1} single images"


def main(argv: list[str] | None = None) -> int:
    return run_tool(parse, sample, argv)


if __name__ == "__main__":
    sys.exit(main())

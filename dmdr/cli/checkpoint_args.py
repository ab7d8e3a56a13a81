"""The arguments of the tools that read a run's checkpoint (convert_to_diffusers, sample): which one, which weights."""

from __future__ import annotations

import argparse

from dmdr.export.generator import WEIGHTS


def add_checkpoint_arguments(parser: argparse.ArgumentParser, applies: str = "") -> None:
    """``--step`` and ``--weights``: which checkpoint of ``--run``, and which of its generator weights.
    ``applies``: what the help says first when they apply to one mode only (``"--run: "``)."""
    parser.add_argument("--step", default="latest",
                        help=f"{applies}generator step of the checkpoint, or 'latest' (default)")
    parser.add_argument("--weights", choices=WEIGHTS, default="auto",
                        help=f"{applies}the generator's EMA (runs with optim.ema_decay > 0), the trained weights, "
                             "or auto: the EMA when the checkpoint holds one (default)")

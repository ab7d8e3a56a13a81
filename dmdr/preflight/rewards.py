"""Preflight of the RL stage's rewards: their checkpoint files and folders, by header, without building a model.

Run only when the RL stage starts within ``train.max_steps`` (:func:`rl_reached`). A reward that loads
a model has an entry in :data:`REWARD_CHECKS`; the others (analytic, the worlds') are built to check
their names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dmdr.errors import ConfigError
from dmdr.models.folder import TOKENIZER_FILES
from dmdr.preflight.core import Problem, RunContext, register_check
from dmdr.preflight.files import weight_file_problem
from dmdr.preflight.run_checks import _weight_problems
from dmdr.rewards import build_reward


def rl_reached(cfg: Any) -> bool:
    """Whether the RL stage starts within ``train.max_steps`` (so its rewards must load)."""
    return cfg.rl.method != "none" and cfg.rl.start_step < cfg.train.max_steps


def _path_problem(setting: str, path: str, what: str, folder: bool) -> Problem | None:
    if not path:
        return Problem(setting, "", f"not set; point it at {what} (or drop the reward from --rl.rewards)")
    p = Path(path).expanduser()
    if not p.exists():
        return Problem(setting, path, f"does not exist (expected {what})")
    if folder and not p.is_dir():
        return Problem(setting, path, f"is a file, not a folder (expected {what})")
    if not folder and not p.is_file():
        return Problem(setting, path, f"is a folder, not a file (expected {what})")
    return None


def _folder_weights(setting: str, path: str, names: tuple[str, ...], what: str) -> list[Problem]:
    p = Path(path).expanduser()
    found = [p / n for n in names if (p / n).is_file()]
    if not found:
        return [Problem(setting, path, f"has none of {', '.join(names)} (expected {what})")]
    reason = weight_file_problem(found[0])
    return [Problem(setting, path, reason)] if reason else []


def hps_problems(rl: Any) -> list[Problem]:
    what = "a local HPSv2.1 checkpoint file, e.g. HPS_v2.1_compressed.pt"
    if (bad := _path_problem("rl.hps_checkpoint", rl.hps_checkpoint, what, folder=False)) is not None:
        return [bad]
    problems = []
    if reason := weight_file_problem(Path(rl.hps_checkpoint).expanduser()):
        problems.append(Problem("rl.hps_checkpoint", rl.hps_checkpoint, f"{reason} (expected {what})"))
    try:
        import open_clip
    except ImportError:
        return [*problems, Problem("rl.rewards", "hps", "needs open_clip: pip install open-clip-torch")]
    if rl.hps_arch not in open_clip.list_models():
        problems.append(Problem("rl.hps_arch", rl.hps_arch, "open_clip has no such model config; use ViT-H-14"))
    return problems


def clip_problems(rl: Any) -> list[Problem]:
    from open_clip.factory import LOCAL_DIR_PREFIX  # noqa: F401 - the reward loads through this schema

    what = "a local open_clip folder (open_clip_config.json + open_clip_pytorch_model.bin/.safetensors)"
    if (bad := _path_problem("rl.clip_model", rl.clip_model, what, folder=True)) is not None:
        return [bad]
    problems = []
    config = Path(rl.clip_model).expanduser() / "open_clip_config.json"
    try:
        if "model_cfg" not in json.loads(config.read_text()):
            problems.append(Problem("rl.clip_model", rl.clip_model, "open_clip_config.json has no model_cfg"))
    except (OSError, ValueError) as e:
        problems.append(Problem("rl.clip_model", rl.clip_model, f"open_clip_config.json is missing or not JSON "
                                                                 f"({e}); expected {what}"))
    names = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
             "open_clip_pytorch_model.pth")
    return problems + _folder_weights("rl.clip_model", rl.clip_model, names, what)


def pickscore_problems(rl: Any) -> list[Problem]:
    what = "a local PickScore folder (CLIPModel save_pretrained layout with its tokenizer)"
    if (bad := _path_problem("rl.pickscore_model", rl.pickscore_model, what, folder=True)) is not None:
        return [bad]
    p = Path(rl.pickscore_model).expanduser()
    problems = []
    if not (p / "config.json").is_file():
        problems.append(Problem("rl.pickscore_model", rl.pickscore_model, f"has no config.json (expected {what})"))
    if not any((p / n).is_file() for n in TOKENIZER_FILES):
        problems.append(Problem("rl.pickscore_model", rl.pickscore_model, f"has no tokenizer files (expected {what})"))
    if (p / "model.safetensors.index.json").is_file() or (p / "pytorch_model.bin.index.json").is_file():
        return problems + _weight_problems(p, "rl.pickscore_model", rl.pickscore_model)
    return problems + _folder_weights("rl.pickscore_model", rl.pickscore_model,
                                      ("model.safetensors", "pytorch_model.bin"), what)


REWARD_CHECKS = {"hps": hps_problems, "clip": clip_problems, "pickscore": pickscore_problems}
"""Reward name -> its file checks (``rl`` section -> problems). A reward that loads a model must have an
entry (preflight builds the others, e.g. the analytic ones, to check their names)."""


@register_check
def check_rewards(ctx: RunContext) -> list[Problem]:
    """The RL stage's rewards, when ``rl.start_step`` falls within ``train.max_steps``."""
    if not rl_reached(ctx.cfg):
        return []
    problems = []
    for name in ctx.cfg.rl.rewards:
        if name in REWARD_CHECKS:
            try:
                problems += REWARD_CHECKS[name](ctx.cfg.rl)
            except ImportError as e:
                problems.append(Problem("rl.rewards", name, f"cannot be checked: {e}; install its package"))
            continue
        try:  # the rewards without files (analytic, the worlds') are cheap to build; unknown names fail here
            build_reward(name, ctx.cfg.rl, "cpu")
        except ConfigError as e:
            problems.append(Problem("rl.rewards", name, str(e).removeprefix("--rl.rewards: ")))
    return problems

"""The paper's two ablations in miniature on the shapes world: which runs, how each is trained and scored.

``benchmarks/paper_tables.py`` is the command; this module holds the experiment, :mod:`.tables` the tables.

**Table 4** (the dynamic cold start): four cold starts of ``cold_steps`` generator steps from the committed
teacher, with DynaDG and DynaRS decaying over all of them (the paper's cold start is 2000 iterations and it
reports 1000 and 2000; here each arm is scored at half and at all of its steps):

* ``vanilla DMD``: neither (uniform renoise levels, frozen real score);
* ``+DynaDG``: the critic LoRA in the real score at a cosine-decayed scale;
* ``+DynaRS``: both (the full dynamic cold start, the paper's cumulative row);
* ``-Dynamic``: both, held at their step-0 values throughout (``--dynamic.schedule constant``).

**Table 5** (RL and DMD): from the ``+DynaRS`` cold start of the same seed, ``rl_steps`` more steps each of
``w/ only Distill.`` (``--rl.method none``, at the RL arms' batch), and for ReFL, DPO and GRPO ``w/ only RL``
(``--dmd.weight 0``; one critic step per generator step, since no score is used; with the method's own regulariser
where it has one that needs no images, :data:`ONLY_RL_REGULARISER`) and ``w/ Distill. + RL``. Each is scored every
``curve_every`` steps (the reward-hacking view) and at its end; ``init`` is the cold start itself.

Every run is ``recipes/shapes_dmdr.py`` in one process (per-rank batch as the recipe, so a run here has half the
demo's global batch) with ``--train.seed`` = the seed; a job trains in a subprocess (its log in
``<run>/train.log``), scores its checkpoints in the calling process and writes ``<run>/result.json``. A
job whose ``result.json`` matches its spec is not run again, so an interrupted benchmark picks up where it
stopped (a run cut mid-training resumes from its own latest checkpoint).

Scoring: every checkpoint is loaded as training built it (:func:`dmdr.export.load_generator`) and sampled with
the student's few-step sampler on the held-out prompts (all 172 by default), with the same ``noise_seeds`` draws
of noise for every model; a checkpoint's score is the mean over those draws, and the spread in the tables is over
training seeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
RECIPE = REPO / "recipes" / "shapes_dmdr.py"
KEEP_ALL = "1000000"
"""``--checkpoint.keep_last`` of a benchmark run: every checkpoint stays until it is scored (then pruned)."""


@dataclass(frozen=True)
class Arm:
    """One row of a table: a name (the paper's), a key (folder name) and its training overrides."""

    key: str
    label: str
    overrides: tuple[str, ...] = ()
    method: str = ""
    """Table 5: the RL algorithm of the row (``refl`` / ``dpo`` / ``grpo``), empty for init and only-distill."""
    rl_only: bool = False


PAPER_DYNARS_END = ("--dynamic.end_alpha", "1", "--dynamic.end_beta", "1")
"""Table 4's +DynaRS decays to uniform levels as the paper's does (the recipe keeps them at Beta(4, 1.5) after the
cold start, ``dynamic.end_alpha/end_beta``): the ablation stays the paper's, and Table 5's runs, which continue from
this arm's checkpoint with the recipe's settings, renoise at the recipe's levels."""
TABLE4 = (
    Arm("vanilla", "vanilla DMD", ("--dynamic.dynadg", "false", "--dynamic.dynars", "false")),
    Arm("dynadg", "+DynaDG", ("--dynamic.dynars", "false")),
    Arm("dynars", "+DynaRS", PAPER_DYNARS_END),
    Arm("static", "-Dynamic", ("--dynamic.schedule", "constant")),
)
INIT = "dynars"
"""The Table 4 arm whose cold start is Table 5's init (the full dynamic cold start)."""

METHODS = {"refl": "ReFL", "dpo": "DPO", "grpo": "GRPO"}
ONLY_RL_REGULARISER = {"refl": (), "dpo": (), "grpo": ("--rl.grpo_kl_weight", "0.04")}
"""The paper's only-RL rows keep "the regularization originally used in these methods": GRPO gets Flow-GRPO's KL
term (beta 0.04, Flow-GRPO's GenEval setting); DPO's is its reference term, always there; ReFL's pretraining
loss needs real images, which DMDR never uses, so only-RL ReFL has none."""
TABLE5 = (
    Arm("distill", "w/ only Distill.", ("--rl.method", "none", "--data.rl_batch_for_distill", "true")),
    *(arm for m, name in METHODS.items() for arm in (
        Arm(f"{m}_only", f"w/ only RL ({name})",
            ("--rl.method", m, "--dmd.weight", "0", "--dmd.ratio", "1", *ONLY_RL_REGULARISER[m]), method=m,
            rl_only=True),
        Arm(m, f"w/ Distill. + RL ({name})", ("--rl.method", m), method=m))),
)


@dataclass
class Job:
    """One training run (or the teacher's reference rows) and the checkpoints it scores."""

    name: str
    """``t4/<arm>/seed<s>``, ``t5/<arm>/seed<s>`` or ``reference``."""
    run_dir: str
    argv: list[str] = field(default_factory=list)
    """The recipe's command-line overrides (empty for ``reference``)."""
    start: str = ""
    """The checkpoint this run continues from (Table 5: the init's), empty for a fresh start."""
    score_steps: list[int] = field(default_factory=list)
    keep_steps: list[int] = field(default_factory=list)
    """Checkpoints kept after scoring (the last one, and the init that Table 5 starts from)."""
    after: str = ""
    """The job that must finish first (Table 5's runs wait for their init)."""
    cost: float = 0.0
    """Expected seconds (one core), from :data:`COST`."""
    scoring: dict[str, Any] = field(default_factory=dict)
    """What the checkpoints are scored on: ``prompts`` (0: every held-out prompt) and ``noise_seeds``."""

    def spec_hash(self) -> str:
        spec = {k: v for k, v in asdict(self).items() if k not in ("cost", "after")}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


COST = {"startup": 12.0, "cold": 1.2, "none": 1.15, "refl": 0.65, "dpo": 0.95, "grpo": 0.72, "refl_only": 0.15,
        "dpo_only": 0.45, "grpo_only": 0.3, "score": 1.5, "score_image": 0.012, "reference_image": 0.16}
"""Seconds on one core of this project's 2-core CI machine (idle, measured by a full run): per process start, per
generator step at the recipe's batch (cold start; Table 5 by arm), per scored checkpoint plus per scored image, per
image of the teacher's rows (25-step CFG and 2-step). The up-front estimate of the wall time; the progress line
rescales it by the measured speed."""


@dataclass(frozen=True)
class Settings:
    """What a benchmark run trains and scores (``benchmarks/paper_tables.py``'s options)."""

    out: str
    teacher: str
    tables: tuple[int, ...] = (4, 5)
    seeds: int = 3
    cold_steps: int = 60
    rl_steps: int = 60
    curve_every: int = 10
    prompts: int = 0
    """Held-out prompts every checkpoint is scored on (0: all of them)."""
    noise_seeds: int = 2
    """Noise draws per prompt (the same for every model); a checkpoint's score is their mean."""
    quick: bool = False
    weights: str = "auto"
    """Which generator weights a checkpoint is scored with (:data:`dmdr.export.WEIGHTS`): ``auto`` the EMA when the
    run keeps one (``optim.ema_decay > 0``), else the trained weights."""
    overrides: tuple[str, ...] = ()
    jobs: int = 1
    """Runs at a time (reported; it changes no number)."""


def _common_argv(s: Settings, prompts: Path, run_dir: Path, seed: int) -> list[str]:
    argv = ["--model.path", s.teacher, "--data.sources", str(prompts), "--train.output_dir", str(run_dir),
            "--train.seed", str(seed), "--dynamic.decay_steps", str(s.cold_steps), "--rl.start_step", str(s.cold_steps),
            "--checkpoint.keep_last", KEEP_ALL, "--log.sample_interval", "0", "--log.progress_bar", "false",
            "--log.tensorboard", "false", "--log.interval", "1" if s.quick else "5"]
    if s.quick:
        argv += ["--dmd.ratio", "2"]
    return argv


def plan_jobs(s: Settings) -> list[Job]:
    """Every job of the requested tables, in an order where each job's ``after`` comes first."""
    out, prompts = Path(s.out), Path(s.out) / "prompts.txt"
    scoring = {"prompts": s.prompts, "noise_seeds": s.noise_seeds, "weights": s.weights}
    images = len(scored_prompts(s.prompts)) * s.noise_seeds
    score = COST["score"] + COST["score_image"] * images
    jobs = [Job("reference", str(out / "reference"), scoring=scoring, cost=COST["reference_image"] * images)]
    c, half = s.cold_steps, max(1, s.cold_steps // 2)
    arms4 = TABLE4 if 4 in s.tables else tuple(a for a in TABLE4 if a.key == INIT)
    for seed in range(s.seeds):
        for arm in arms4:
            run_dir = out / "t4" / arm.key / f"seed{seed}"
            argv = [*_common_argv(s, prompts, run_dir, seed), "--train.max_steps", str(c),
                    "--checkpoint.interval", str(half), *arm.overrides, *s.overrides]
            steps = sorted({half, c})
            jobs.append(Job(f"t4/{arm.key}/seed{seed}", str(run_dir), argv, score_steps=steps, keep_steps=[c],
                            scoring=scoring, cost=COST["startup"] + COST["cold"] * c + score * len(steps)))
        if 5 not in s.tables:
            continue
        init = out / "t4" / INIT / f"seed{seed}"
        every = max(1, min(s.curve_every, s.rl_steps))
        steps = sorted({*range(c + every, c + s.rl_steps + 1, every), c + s.rl_steps})
        for arm in TABLE5:
            run_dir = out / "t5" / arm.key / f"seed{seed}"
            argv = [*_common_argv(s, prompts, run_dir, seed), "--train.max_steps", str(c + s.rl_steps),
                    "--checkpoint.interval", str(every), *arm.overrides, *s.overrides]
            per_step = COST[arm.key if arm.method else "none"]
            jobs.append(Job(f"t5/{arm.key}/seed{seed}", str(run_dir), argv,
                            start=str(init / "checkpoints" / f"step-{c}"), score_steps=steps, keep_steps=[steps[-1]],
                            after=f"t4/{INIT}/seed{seed}", scoring=scoring,
                            cost=COST["startup"] + per_step * s.rl_steps + score * len(steps)))
    return jobs


def scored_prompts(n: int) -> list[str]:
    """The held-out prompts a checkpoint is scored on: ``n`` of them spread over the split, or all for 0."""
    from dmdr.worlds.shapes.evaluation import heldout_prompts
    from dmdr.worlds.shapes.scene import split_prompts

    return heldout_prompts(n) if n > 0 else split_prompts("heldout")


def expected_wall(jobs: list[Job], workers: int) -> float:
    """Seconds the jobs take on ``workers`` cores by :data:`COST` (list scheduling in plan order, deps respected)."""
    free = [0.0] * max(1, workers)
    done: dict[str, float] = {}
    for job in jobs:
        i = min(range(len(free)), key=free.__getitem__)
        start = max(free[i], done.get(job.after, 0.0))
        free[i] = done[job.name] = start + job.cost
    return max(free)


# ------------------------------------------------------------------------------------------------- running
def _result_path(job: Job) -> Path:
    return Path(job.run_dir) / "result.json"


def cached_result(job: Job) -> dict | None:
    """The job's ``result.json`` if it was written for this very spec, else None."""
    try:
        result = json.loads(_result_path(job).read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("spec") == job.spec_hash() else None


class RecipeRunFailed(RuntimeError):
    """A recipe subprocess exited non-zero: its exit ``code`` and the ``last_line`` of its log ``log``."""

    def __init__(self, code: int, last_line: str, log: Path):
        super().__init__(f"training failed (exit {code}): {last_line} (log: {log})")
        self.code, self.last_line, self.log = code, last_line, log


def run_recipe_logged(run_dir: Path, argv: list[str], threads: int) -> float:
    """The shapes recipe with ``argv`` in a subprocess on ``threads`` threads, its output appended to
    ``<run_dir>/train.log`` after the command line; its wall seconds, or :class:`RecipeRunFailed`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(run_dir / "train.log", "a") as log:
        log.write(f"$ {sys.executable} {RECIPE} {' '.join(argv)}\n")
        log.flush()
        done = subprocess.run([sys.executable, str(RECIPE), *argv], stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = (run_dir / "train.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RecipeRunFailed(done.returncode, tail[0], run_dir / "train.log")
    return time.perf_counter() - start


def _train(job: Job, threads: int) -> float:
    """Run the recipe for ``job`` in a subprocess; returns its wall seconds. One line naming the log on failure."""
    run_dir = Path(job.run_dir)
    argv = list(job.argv)
    if job.start and not (run_dir / "checkpoints" / "latest").exists():
        argv += ["--checkpoint.resume", job.start]  # a fresh branch; a cut one resumes from its own latest
    try:
        return run_recipe_logged(run_dir, argv, threads)
    except RecipeRunFailed as e:
        raise RuntimeError(f"{job.name}: {e}") from None


def _score_reference(job: Job, teacher: str) -> list[dict]:
    """The teacher's rows: its multi-step CFG sampler and the student's few-step sampler (no CFG)."""
    import torch

    from dmdr.models import load_backbone
    from dmdr.recipes.shapes_dmdr import shapes_dmdr
    from dmdr.worlds.shapes.evaluation import Sampler, evaluate_model
    from dmdr.worlds.shapes.pipeline import MAX_SEQUENCE_LENGTH
    from dmdr.worlds.shapes.scene import IMAGE_SIZE

    cfg = shapes_dmdr()
    n, shift, w0 = cfg.dmd.num_steps, cfg.dmd.shift, cfg.dmd.guidance
    backbone = load_backbone(teacher, dtype=torch.float32, device="cpu", max_sequence_length=MAX_SEQUENCE_LENGTH)
    prompts = scored_prompts(job.scoring["prompts"])
    rows = []
    for label, sampler in ((f"teacher 25-step CFG {w0:g}", Sampler("teacher", 25, w0, 1.0)),
                           (f"teacher {n}-step", Sampler("few_step", n, 1.0, shift))):
        row = evaluate_model(backbone, backbone.teacher, sampler, prompts, list(range(job.scoring["noise_seeds"])),
                             IMAGE_SIZE)
        rows.append({"label": label, "nfe": row["nfe"], "scores": {k: v["mean"] for k, v in row["scores"].items()},
                     "per_noise_seed": row["per_seed"], "wall_s": row["wall_s"]})
    return rows


def score_checkpoint(run_dir: str | Path, step: int, prompts: int, noise_seeds: int = 1,
                     weights: str = "auto") -> dict[str, float]:
    """ShapeEval, fidelity and reward of ``<run_dir>/checkpoints/step-<step>``'s generator (few-step sampler).

    Each key is the mean over ``noise_seeds`` draws of noise (seeds 0, 1, ...; the same for every model) on
    :func:`scored_prompts` ``(prompts)``. ``weights``: the EMA or the trained weights (``auto``: the EMA when the
    checkpoint holds one); the sampler is the run's own (``dmd.sampler``).
    """
    import torch

    from dmdr.export import load_generator, read_run_config, resolve_checkpoint
    from dmdr.worlds.shapes.evaluation import Sampler, evaluate_model

    cfg = read_run_config(run_dir)
    loaded = load_generator(cfg, resolve_checkpoint(run_dir, step), device="cpu", dtype=torch.float32,
                            weights=weights)
    sampler = Sampler("few_step", cfg.dmd.num_steps, 1.0, cfg.dmd.shift, cfg.dmd.t_min, cfg.dmd.sampler)
    row = evaluate_model(loaded.backbone, loaded.roles.generator_fn, sampler, scored_prompts(prompts),
                         list(range(noise_seeds)), cfg.model.resolution)
    return {k: v["mean"] for k, v in row["scores"].items()}


def _training_curve(run_dir: Path) -> list[dict[str, float]]:
    """The logged per-step values the plot and the table check use (reward on the training batch, schedules)."""
    keys = ("reward/shapes", "schedule/lora_scale_real", "schedule/dynars_mean", "loss/dmd", "loss/rl")
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        rows.append({"step": record["step"], **{k: record[k] for k in keys if k in record}})
    return rows


def _prune(job: Job) -> None:
    """Delete the scored checkpoints nobody needs any more (each is ~30 MB)."""
    root = Path(job.run_dir) / "checkpoints"
    keep = {f"step-{k}" for k in job.keep_steps}
    for folder in root.glob("step-*"):
        if folder.name not in keep and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def _quiet_loaders() -> None:
    """No per-model "Loading weights" bars from the scoring loads (dozens of them, interleaved across workers)."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def run_job(job: Job, teacher: str, threads: int = 1) -> dict:
    """Train (unless cached) and score one job; writes and returns ``<run>/result.json``'s content."""
    import torch

    cached = cached_result(job)
    if cached is not None:
        return {**cached, "cached": True}
    torch.set_num_threads(threads)
    _quiet_loaders()
    from dmdr.provenance import source_commit

    result: dict[str, Any] = {"name": job.name, "spec": job.spec_hash(), "commit": source_commit()}
    if job.name == "reference":
        start = time.perf_counter()
        result["rows"] = _score_reference(job, teacher)
        result["score_s"] = time.perf_counter() - start
    else:
        result["train_s"] = _train(job, threads)
        start = time.perf_counter()
        result["scores"] = {str(k): score_checkpoint(job.run_dir, k, job.scoring["prompts"],
                                                     job.scoring["noise_seeds"], job.scoring.get("weights", "auto"))
                            for k in job.score_steps}
        result["score_s"] = time.perf_counter() - start
        result["curve"] = _training_curve(Path(job.run_dir))
        result["config"] = json.loads((Path(job.run_dir) / "config.json").read_text())
        _prune(job)
    Path(job.run_dir).mkdir(parents=True, exist_ok=True)
    tmp = _result_path(job).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(_result_path(job))
    return result


__all__ = ["Arm", "TABLE4", "TABLE5", "INIT", "METHODS", "ONLY_RL_REGULARISER", "Job", "Settings", "COST",
           "plan_jobs", "scored_prompts", "expected_wall", "cached_result", "run_job", "score_checkpoint"]

"""The checks a training run gets (registered in :data:`dmdr.preflight.CHECKS`), and their building blocks.

The reward checks live in :mod:`dmdr.preflight.rewards` (registered after these).

Order matters only through ``ctx.facts``: :func:`check_model` records the family and the denoiser's
parameter count that :func:`check_output` needs for its free-disk estimate. The building blocks
(:func:`model_problems`, :func:`source_problems`, :func:`checkpoint_problems`, ...) take plain
arguments so that the tools check their own paths with them (:mod:`dmdr.preflight.tools`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dmdr.data import EmbeddingCache
from dmdr.data.readers import Cleaner, read_split
from dmdr.data.sources import plan_source
from dmdr.distributed.checkpoint import CheckpointManager, verify_checkpoint
from dmdr.distributed.env import registered_backend
from dmdr.distributed.mesh import resolve_dp
from dmdr.errors import ConfigError, DataError, ModelLoadError, UserError
from dmdr.models.loading import LoadOptions, detect_family, read_model_index
from dmdr.models.lora import _matches
from dmdr.models.weights import safetensors_files
from dmdr.preflight.core import Problem, RunContext, problem_from, register_check
from dmdr.preflight.files import free_bytes, header_numel, safetensors_header, weight_file_problem, writable_problem

FIRST_RECORDS = 1000
"""Records of a source read, at most, looking for one good prompt."""
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# --------------------------------------------------------------------------------------------- model
def _weight_problems(folder: Path, setting: str, value: str) -> list[Problem]:
    """Each weight file of a component folder (and each shard an ``*.index.json`` lists) readable by header."""
    problems = []
    for index in sorted(folder.glob("*.index.json")):
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(Problem(setting, value, f"{index} is not a valid weight index ({e})"))
            continue
        problems += [Problem(setting, value, f"{index} lists {s}, which is missing; the download is incomplete")
                     for s in shards if not (folder / s).is_file()]
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in _WEIGHT_SUFFIXES and (reason := weight_file_problem(f)):
            problems.append(Problem(setting, value, f"{folder.name}/{reason}"))
    return problems


def _lora_size(headers: list[dict[str, Any]], targets: tuple[str, ...], rank: int) -> tuple[int, int]:
    """``(parameters, tensors)`` of a rank-``rank`` LoRA on every 2-D ``<module>.weight`` matching ``targets``."""
    numel = tensors = 0
    for header in headers:
        for name, info in header.items():
            shape = info.get("shape", []) if isinstance(info, dict) else []
            if name.endswith(".weight") and len(shape) == 2 and _matches(name[: -len(".weight")], targets):
                numel += rank * (int(shape[0]) + int(shape[1]))
                tensors += 2  # lora_A, lora_B
    return numel, tensors


def _split_header(headers: list[dict[str, Any]]) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((parameters, tensors), (buffer elements, buffers))``: names not ending in weight/bias are buffers."""
    params = [0, 0]
    buffers = [0, 0]
    for header in headers:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = header_numel({name: info})
            side = params if name.rsplit(".", 1)[-1] in ("weight", "bias") else buffers
            side[0] += numel
            side[1] += 1
    return (params[0], params[1]), (buffers[0], buffers[1])


def model_problems(path: str, family: str = "auto", *, setting: str = "model.path",
                   family_setting: str = "model.family", text_encoder: bool = True, denoiser: bool = True,
                   sharded: bool = False, facts: dict[str, Any] | None = None) -> list[Problem]:
    """Every problem of a model folder for what will be loaded from it, without loading anything.

    Args:
        path: the diffusers pipeline folder.
        family: the requested family (``auto`` or a registered name).
        text_encoder: the text encoders and tokenizers will be loaded.
        denoiser: the transformer and VAE will be loaded (``False``: text components only).
        sharded: the denoiser is built on meta and read from safetensors shards (world size > 1).
        facts: filled with ``family``, ``pipeline_class``, ``folder`` and, from the weight headers,
            ``denoiser_headers`` / ``denoiser_numel``.
    """
    if not str(path):
        return [Problem(setting, "", "not set; point it at a local diffusers pipeline folder (model_index.json "
                                     "at its top)")]
    try:
        folder = read_model_index(path)
        fam = detect_family(folder, "auto")
    except ModelLoadError as e:
        return [Problem(setting, str(path), str(e))]
    if family != "auto" and family != fam.name:
        return [Problem(family_setting, family, f"{folder.path} is a {folder.pipeline_class} folder, i.e. "
                                                f"{fam.name}; set it to {fam.name} or auto")]
    import torch

    options = LoadOptions(dtype=torch.float32, device=torch.device("cpu"), load_text_encoder=text_encoder,
                          t_min=0.0, max_sequence_length=1, defer_denoiser=sharded)
    try:
        names = fam.required_components(folder, options) if denoiser else fam.text_components(folder, options)
    except ModelLoadError as e:
        return [Problem(setting, str(path), str(e))]
    problems = []
    for name in names:
        try:
            folder.check(name)
        except ModelLoadError as e:
            problems.append(Problem(setting, str(path), str(e)))
            continue
        _, cls = folder.component_class(name)
        if "Tokenizer" not in cls and "Scheduler" not in cls:
            problems += _weight_problems(folder.path / name, setting, str(path))
    if facts is not None:
        facts.update(family=fam.name, pipeline_class=folder.pipeline_class, folder=str(folder.path),
                     lora_targets=fam.lora_targets)
    if not denoiser or problems:
        return problems
    try:
        files = safetensors_files(folder.path / fam.denoiser_component)
    except ModelLoadError as e:
        if sharded:  # the sharded loader reads each rank's rows from safetensors only
            problems.append(problem_from(e, setting, str(path)))
        files = []
    if facts is not None and files:
        headers = [safetensors_header(f) for f in files]
        facts.update(denoiser_headers=headers, denoiser_numel=sum(header_numel(h) for h in headers))
    return problems


def text_encoders_needed(cfg: Any) -> bool:
    """Whether the run loads the text encoders (no embedding cache, or one that falls back to encoding)."""
    return not cfg.data.embedding_cache or cfg.data.cache_miss == "encode"


@register_check
def check_model(ctx: RunContext) -> list[Problem]:
    """The teacher folder: family, every component the run loads, weight headers; sharded runs need safetensors."""
    m = ctx.cfg.model
    return model_problems(m.path, m.family, text_encoder=text_encoders_needed(ctx.cfg), sharded=ctx.world_size > 1,
                          facts=ctx.facts)


@register_check
def check_adapters(ctx: RunContext) -> list[Problem]:
    """Re-turbo: each ``model.teacher_adapters`` LoRA and ``model.init_generator`` read against the teacher's
    layers (its weight headers): another family's adapter, mismatched ranks, keys that match no layer."""
    from dmdr.returbo import ADAPTERS_SETTING, INIT_SETTING, adapter_specs, denoiser_shapes, read_adapters, read_init

    m = ctx.cfg.model
    if not m.teacher_adapters and not m.init_generator:
        return []
    try:
        family = detect_family(read_model_index(m.path), m.family)
        shapes = denoiser_shapes(m.path, family)
    except UserError:
        return []  # check_model reports the teacher folder
    problems = []
    for spec in adapter_specs(ctx.cfg):
        try:
            read_adapters([spec], family, shapes)
        except UserError as err:  # the line already reads "--model.teacher_adapters <file>: <what is wrong>"
            problems.append(Problem("", fix=_named(str(err), ADAPTERS_SETTING)))
    try:
        read_init(ctx.cfg, family, shapes)
    except UserError as err:
        problems.append(Problem("", fix=_named(str(err), INIT_SETTING)))
    return problems


def _named(line: str, setting: str) -> str:
    return line if line.startswith(f"--{setting}") else f"--{setting}: {line}"


# --------------------------------------------------------------------------------------------- data
def source_problems(data: Any, readers: int, setting: str = "data.sources") -> list[Problem]:
    """Every prompt source resolves, its shards open, and at least one record of it is a good prompt."""
    if not data.sources:
        return [Problem(setting, (), "not set; give paths, globs or fsspec URLs of .txt/.jsonl/.parquet prompt "
                                     "files")]
    clean = Cleaner(data.max_prompt_chars, data.long_prompts)
    problems = []
    for spec in data.sources:
        try:
            plan = plan_source(spec, fmt=data.format, field=data.field, readers=readers, clean=clean)
            split = plan.splits[0]
            reasons: dict[str, int] = {}
            good = False
            for n, (_, prompt, reason) in enumerate(read_split(plan.shards[split.shard], split, None,
                                                               field=data.field, clean=clean)):
                if prompt is not None:
                    good = True
                    break
                reasons[str(reason)] = reasons.get(str(reason), 0) + 1
                if n + 1 >= FIRST_RECORDS:
                    break
        except DataError as e:
            problems.append(Problem(setting, spec, str(e)))
            continue
        if not good:
            why = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "no records"
            problems.append(Problem(setting, spec, f"no good prompt in the first records of "
                                                   f"{plan.shards[split.shard].path} ({why}); check --data.field "
                                                   f"{data.field!r} and --data.format"))
    return problems


@register_check
def check_data(ctx: RunContext) -> list[Problem]:
    """Prompt sources (one good record each, planned for this job's readers) and the embedding cache."""
    d = ctx.cfg.data
    problems = source_problems(d, readers=ctx.world_size * max(1, d.num_workers))
    if d.embedding_cache:
        problems += cache_problems(d.embedding_cache)
    return problems


def cache_problems(path: str, setting: str = "data.embedding_cache") -> list[Problem]:
    """An embedding cache folder: its indexes and negative readable, the shards the indexes name present."""
    folder = Path(path).expanduser()
    tool = "write it with tools/cache_text_embeddings.py"
    if not folder.is_dir():
        return [Problem(setting, path, f"{folder} is not a folder; {tool}")]
    indexes = sorted(folder.glob("index-*.safetensors"))
    if not indexes:
        return [Problem(setting, path, f"{folder} has no index-*.safetensors (incomplete or not a cache); {tool}")]
    problems = []
    for f in [*indexes, folder / "negative.safetensors"]:
        try:
            header = safetensors_header(f)
        except (OSError, ValueError) as e:
            problems.append(Problem(setting, path, f"{f.name}: {e}; {tool}"))
            continue
        if f.name.startswith("index-"):
            shards = json.loads(header.get("__metadata__", {}).get("shards", "[]"))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                problems.append(Problem(setting, path, f"{f.name} names {len(missing)} missing shard(s), e.g. "
                                                       f"{missing[0]}; {tool}"))
    return problems


# --------------------------------------------------------------------------------------------- job, output
@register_check
def check_job(ctx: RunContext) -> list[Problem]:
    """The device exists, and ``dp_replicate x dp_shard`` fills the world size."""
    import torch

    problems = []
    device = ctx.cfg.train.device
    extra = registered_backend()  # an out-of-tree backend registered in this process (PrivateUse1)
    if device not in ("auto", "cpu", "cuda") and device != extra:
        problems.append(Problem("train.device", device, "not one of auto, cpu, cuda" + (f", {extra}" if extra else "")))
    elif device == "cuda" and not torch.cuda.is_available():
        problems.append(Problem("train.device", device, "CUDA is not available here; use --train.device cpu"))
    try:
        ctx.facts["mesh"] = resolve_dp(ctx.cfg.parallel, ctx.world_size)
    except ConfigError as e:
        problems.append(Problem("", fix=str(e)))  # the message names both mesh settings
    return problems


PER_TENSOR_BYTES = 1900
"""DCP's bytes per saved tensor beyond its data: serialization (~1.6 KB) and ``.metadata`` (~0.3 KB); torch 2.14,
measured on the tiny models' checkpoints (it dominates only there)."""


def checkpoint_bytes(cfg: Any, facts: dict[str, Any]) -> int | None:
    """Estimated bytes of one checkpoint, from the denoiser's weight headers (None without them).

    Trainable parameters in fp32 with AdamW's two moments (12 bytes each; + 4 for the EMA), the
    denoiser's persistent buffers (e.g. SD3's ``pos_embed``, saved with the model state) at
    ``model.dtype``, and :data:`PER_TENSOR_BYTES` per tensor. LoRA mode trains the two adapters (their
    sizes from the LoRA targets' weight shapes); full mode the whole fp32 generator copy and the critic.
    """
    headers = facts.get("denoiser_headers")
    if not headers:
        return None
    m = cfg.model
    targets = tuple(m.lora_targets) or facts.get("lora_targets", ())
    (params, param_tensors), (buffers, buffer_tensors) = _split_header(headers)
    critic = _lora_size(headers, targets, m.critic_lora_rank)
    copies = 1  # the teacher's buffers go with the critic's (trainable-only) model state
    if m.generator_mode == "lora":
        generator = _lora_size(headers, targets, m.generator_lora_rank)
    else:
        generator, copies = (params, param_tensors), 2
    numel, tensors = generator[0] + critic[0], generator[1] + critic[1]
    ema = generator if cfg.optim.ema_decay > 0 else (0, 0)
    buffer_bytes = copies * buffers * (4 if m.dtype == "fp32" else 2)
    data = 12 * numel + 4 * ema[0] + buffer_bytes
    return data + PER_TENSOR_BYTES * (4 * tensors + ema[1] + copies * buffer_tensors)


@register_check
def check_output(ctx: RunContext) -> list[Problem]:
    """``train.output_dir`` can be created and written, with free space for one checkpoint."""
    out = ctx.cfg.train.output_dir
    if reason := writable_problem(out):
        return [Problem("train.output_dir", out, reason)]
    need = checkpoint_bytes(ctx.cfg, ctx.facts)
    ctx.facts["checkpoint_bytes"] = need
    free = free_bytes(out)
    ctx.facts["free_bytes"] = free
    if need is not None and free < need:
        return [Problem("train.output_dir", out, f"{free / 1e9:.2f} GB free, one checkpoint needs about "
                                                 f"{need / 1e9:.2f} GB; free space or choose another folder")]
    return []


def checkpoint_problems(path: str | Path, setting: str) -> list[Problem]:
    """A checkpoint folder is complete: marker present, every file at its recorded size (no CRC read)."""
    if not Path(path).is_dir():
        return [Problem(setting, str(path), "is not a checkpoint folder (give <output_dir>/checkpoints/step-<N>)")]
    reason = verify_checkpoint(path)
    return [Problem(setting, str(path), reason)] if reason else []


@register_check
def check_resume(ctx: RunContext) -> list[Problem]:
    """An explicit ``checkpoint.resume`` folder is complete; ``auto`` records which one it would take."""
    resume = ctx.cfg.checkpoint.resume
    if resume == "never":
        return []
    if resume != "auto":
        problems = checkpoint_problems(resume, "checkpoint.resume")
        if not problems:
            ctx.facts["resume"] = str(resume)
        return problems
    try:
        found = CheckpointManager(ctx.cfg.train.output_dir).checkpoints()
    except (OSError, UserError):
        return []
    reasons = [(p, verify_checkpoint(p)) for p in found]
    ctx.facts["resume"] = next((str(p) for p, reason in reasons if reason is None), None)
    if reasons and ctx.facts["resume"] is None:  # a fresh start would overwrite the run: only when asked
        newest, reason = reasons[0]
        return [Problem("checkpoint.resume", "auto", f"none of the {len(found)} checkpoint(s) in {newest.parent} is "
                        f"usable (newest, {newest.name}: {reason}); resume an older copy with --checkpoint.resume "
                        "<folder>, or start over in this folder with --checkpoint.resume never")]
    return []


@register_check
def check_sample_prompts(ctx: RunContext) -> list[Problem]:
    """Without text encoders (embedding cache, ``cache_miss`` not ``encode``) the sample prompts must be cached."""
    cfg = ctx.cfg
    if text_encoders_needed(cfg) or not cfg.log.sample_interval or not cfg.log.sample_prompts:
        return []

    try:
        cache = EmbeddingCache(cfg.data.embedding_cache)
    except UserError:
        return []  # check_data names the cache's own problem
    missing = [p for p in cfg.log.sample_prompts if not cache.contains(p)]
    if not missing:
        return []
    return [Problem("log.sample_prompts", missing[0], f"{len(missing)} sample prompt(s) are not in the embedding "
                                                      "cache and no text encoder is loaded; add them to the cache "
                                                      "or set --log.sample_interval 0")]


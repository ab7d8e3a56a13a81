"""Console logging of every dmdr entry point: rank 0 talks, the other ranks warn, known noise is filtered.

:func:`setup_logging` (called by the recipe launcher and the tools):

* **Ranks.** Rank 0 logs INFO and up; every other rank WARNING and up, its lines prefixed ``[rank R]`` (under
  torchrun eight ranks no longer print eight copies of every line; a warning on one rank still shows).
* **Names.** Each line carries its logger's name (``dmdr.trainer``, ``diffusers.models...``). Libraries that log
  on the root logger (open_clip calls ``logging.info``) are named after their package, not shown as dmdr's.
  diffusers' and transformers' own handlers are replaced by propagation to this one, and Python ``warnings``
  are routed here too, so one filter sees every message.
* **Known third-party messages** (:data:`KNOWN`): each is silenced where it is noise for a dmdr run, or replaced
  the first time by one line explaining what it means here (and dropped after). Each has a test
  (tests/cli/test_logs.py).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


@dataclass(frozen=True)
class Known:
    """A third-party message: ``pattern`` (a regex searched in the message), and ``explain`` (None: silence it;
    else the one line logged in its place the first time, the original's first line after it in brackets)."""

    name: str
    pattern: str
    explain: str | None = None


KNOWN: tuple[Known, ...] = (
    # dmdr picks the attention backend through diffusers' dispatcher on purpose and logs its choice in one line
    # ("attention backend: ..."); the API-stability notice is for diffusers' users, printed once per model.
    Known("diffusers-attention-backend", r"Attention backends are an experimental feature"),
    # A dmdr LoRA release holds the transformer's adapter only, by design; load_lora_weights asks for the text
    # encoders' too and suggests opening an issue when there are none.
    Known("lora-no-text-encoder-keys", r"No LoRA keys associated to \w+ found with the prefix=.*open an issue"),
    # The SD3 pipelines decode the tokens cut from each prompt; when only padding was cut the list is empty
    # strings (['', '']): nothing of the prompt was lost.
    Known("truncated-padding-only", r"was truncated because .*: \[(?:'\s*'(?:, )?)+\]\s*$"),
    # A real cut: explained once (the trainer counts its own cuts in data/truncated).
    Known("truncated-prompt", r"was truncated because",
          "a prompt is longer than a text encoder takes; its tail is cut (the pipeline's own limit, e.g. CLIP's 77 "
          "tokens; dmdr's training cuts are counted in data/truncated); shown once"),
    # Loading a single-file release, diffusers casts the transformer with ``to(dtype)`` and lists the modules that
    # should have stayed in float32: for dmdr's families the list is empty, so nothing was cast that matters.
    Known("single-file-fp32-modules-none", r"modules in \w+ that should be kept in float32: \[\]"),
    Known("single-file-fp32-modules", r"modules in \w+ that should be kept in float32",
          "the single-file transformer was cast to the release's dtype with to(); diffusers names modules it keeps "
          "in float32 when loaded with torch_dtype instead (load it with --dtype fp32 to compare); shown once"),
)


class KnownMessages(logging.Filter):
    """Drops or explains the :data:`KNOWN` messages (a handler filter: it sees every logger's records)."""

    def __init__(self, known: tuple[Known, ...] = KNOWN):
        super().__init__()
        self.known = [(k, re.compile(k.pattern, re.S)) for k in known]
        self.explained: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the library's problem; let logging report it
            return True
        for known, pattern in self.known:
            if not pattern.search(message):
                continue
            if known.explain is None or known.name in self.explained:
                return False
            self.explained.add(known.name)
            first = message.strip().splitlines()[0] if message.strip() else ""
            record.msg, record.args = f"{known.explain} [{first[:160]}]", None
            return True
        return True


class PackageNames(logging.Filter):
    """Names root-logger records after the package that emitted them (open_clip's ``logging.info`` lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "root":
            record.name = package_of(record.pathname)
        return True


def package_of(path: str) -> str:
    """The top-level package of a source file (``.../site-packages/open_clip/factory.py`` -> ``open_clip``)."""
    parts = Path(path).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            i = parts.index(marker)
            if i + 1 < len(parts):
                return Path(parts[i + 1]).stem
    return Path(path).stem or "root"


class RankPrefix(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank and not getattr(record, "_dmdr_ranked", False):
            record.msg, record.args = f"[rank {self.rank}] {record.getMessage()}", None
            record._dmdr_ranked = True
        return True


def current_rank() -> int:
    """This process's global rank under torchrun / SLURM (0 outside a job)."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def setup_logging(rank: int | None = None, level: int = logging.INFO, stream=None) -> logging.Handler | None:
    """Configure the console for a dmdr process (a second call replaces the first's handler).

    Like :func:`logging.basicConfig` it leaves a process whose logging someone else configured alone (an
    application embedding dmdr, pytest): then it returns None, unless ``stream`` asks for a handler anyway.
    """
    rank = current_rank() if rank is None else rank
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_dmdr", False)]
    if stream is None and len(ours) < len(root.handlers):
        return None
    for h in ours:
        root.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler._dmdr = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(FORMAT))
    for f in (PackageNames(), KnownMessages(), RankPrefix(rank)):
        handler.addFilter(f)
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
    _route_libraries()
    logging.captureWarnings(True)  # Python warnings (once per location, as by default) through the filter above
    return handler


def _route_libraries() -> None:
    """diffusers and transformers print through their own handler; send them through ours instead."""
    for name in ("diffusers", "transformers"):
        module = sys.modules.get(f"{name}.utils.logging")
        if module is None:
            try:
                module = __import__(f"{name}.utils.logging", fromlist=["_"])
            except ImportError:
                continue
        try:
            module.disable_default_handler()
            module.enable_propagation()
        except AttributeError:
            continue

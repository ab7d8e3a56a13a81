"""The guard: probe every ``guard.interval`` generator steps, judge the signals, warn / stop / roll back.

Timeline: the *baseline* probe runs at ``guard.start_step`` (default ``rl.start_step``: hacking starts with
the RL branch; or at the first step after it, for a run branched from a checkpoint written there) and a probe
every ``guard.interval`` steps after it. A probe that breaks no rule *passes* and the
trainer writes a checkpoint at its step (the rollback target). One that trips:

* ``warn``: logs each trip with its evidence (``<output_dir>/guard.jsonl``, the log, ``guard/trips``);
* ``stop``: the trainer checkpoints, and the run ends with one line and exit 4;
* ``rollback``: the checkpoints after the last passing probe are deleted (that branch's metric rows are kept
  in ``metrics-rolled-back-<n>.jsonl``), that checkpoint is loaded, ``guard.rollback_target`` (generator
  learning rates, or the rewards' weights) is multiplied by ``guard.rollback_factor ** n`` and training goes
  on; the restored step is saved again with the new guard state. After ``guard.max_rollbacks`` rollbacks
  a trip stops the run.

Resumable: the guard's state (baseline, recent probes, trips, rollbacks, the last passing step, the
accumulated training signals) is an entry of the checkpoint. A kill -9 after a rollback resumes from the
re-saved restored step with the lowered setting; one during a rollback resumes from an earlier checkpoint
(the trip's, the target's, or the target's previous copy when the kill fell inside its re-save:
:meth:`~dmdr.distributed.CheckpointManager.restore_replaced`) and replays to the same trip and the same
rollback, probes and training being deterministic. Both end bit for bit as the uninterrupted run
(``tests/e2e/test_guard_actions.py``, SIGKILL at five points).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmdr.errors import UserError
from dmdr.guard.probe import run_probe
from dmdr.guard.rules import evaluate
from dmdr.guard.scorers import ProbeScorers
from dmdr.observability import reduce_over_ranks

log = logging.getLogger("dmdr")

EVENTS_FILE = "guard.jsonl"


class GuardStopped(UserError):
    """The guard stopped the run (``guard.action stop``, or a trip after the last allowed rollback)."""


@dataclass
class Verdict:
    """What the trainer does after a step: log the probe row, checkpoint a passing probe, stop, or go on."""

    probed: bool = False
    passed: bool = False
    stop: bool = False
    rolled_back: bool = False


NOTHING = Verdict()


def _fresh_state() -> dict[str, Any]:
    return {"baseline": None, "history": [], "trips": 0, "rollbacks": 0, "last_passed": -1,
            "acc": {"reward": 0.0, "reward_n": 0, "dmd_grad": 0.0, "dmd_grad_n": 0}, "skipped_at_probe": 0,
            "stop_reason": None}


class Guard:
    """The guard of one run; a ``Stateful`` entry of the checkpoint (``optional``: older checkpoints lack it).

    Args:
        cfg: the run's :class:`~dmdr.config.TrainConfig` (its ``guard`` section; ``optim`` is lowered in place
            by an ``lr`` rollback).
        trainer: the :class:`~dmdr.trainer.DMDRTrainer`.
        checkpoints: the run's :class:`~dmdr.distributed.CheckpointManager` (rollback loads from it).
        output_dir: where ``guard.jsonl`` goes (rank 0).
        scorers: the probe's CLIP / aesthetic / LPIPS models (:mod:`dmdr.guard.scorers`); None: loaded here from
            ``guard.clip_model`` etc. (:func:`dmdr.build.build_run` loads them before the models, so a bad path
            fails fast).
    """

    optional = True

    def __init__(self, cfg: Any, trainer: Any, checkpoints: Any, output_dir: str | Path | None = None,
                 scorers: ProbeScorers | None = None):
        self.cfg = cfg
        self.g = cfg.guard
        self.trainer = trainer
        self.checkpoints = checkpoints
        self.output_dir = Path(output_dir or cfg.train.output_dir)
        self.start = self.g.start_step if self.g.start_step >= 0 else cfg.rl.start_step
        self.prompts = list(self.g.prompts or cfg.log.sample_prompts)
        if not self.prompts:
            raise UserError("--guard.action needs probe prompts: set --guard.prompts or --log.sample_prompts")
        self._base_lr = (cfg.optim.generator_lr, cfg.optim.rl_generator_lr)
        self._base_weights = [w for _, w in trainer.engine.rewards]
        self.scorers = scorers if scorers is not None else ProbeScorers.from_config(self.g, trainer.device)
        self.state = _fresh_state()

    # ------------------------------------------------------------------ Stateful
    def state_dict(self) -> dict[str, Any]:
        return {"json": json.dumps(self.state)}  # plain data, whatever its nesting (DCP stores the string)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {**_fresh_state(), **json.loads(state["json"])}
        self._apply_scale()
        self._protect()

    def _protect(self) -> None:
        """Keep the rollback target out of ``checkpoint.keep_last``'s pruning."""
        last = self.state["last_passed"]
        self.checkpoints.protected = {last} if last >= 0 else set()

    # ------------------------------------------------------------------ helpers
    @property
    def is_main(self) -> bool:
        d = self.trainer.dist
        return d is None or d.is_main

    @property
    def scale(self) -> float:
        return self.g.rollback_factor ** self.state["rollbacks"]

    def _apply_scale(self) -> None:
        """The lowered setting after ``rollbacks`` rollbacks, from the launch's own values (idempotent)."""
        s = self.scale
        if self.g.rollback_target == "lr":
            self.cfg.optim.generator_lr, self.cfg.optim.rl_generator_lr = (v * s for v in self._base_lr)
        else:
            engine = self.trainer.engine
            engine.rewards = [(r, w * s) for (r, _), w in zip(engine.rewards, self._base_weights)]

    def due(self, k: int) -> bool:
        """A probe step: ``start_step`` and every ``interval`` after it; and the first step at or after
        ``start_step`` without a baseline (a branch started from a checkpoint written at ``start_step``)."""
        if k < self.start:
            return False
        return (k - self.start) % self.g.interval == 0 or self.state["baseline"] is None

    def _accumulate(self, metrics: dict[str, float]) -> None:
        acc = self.state["acc"]
        if "loss/rl" in metrics:
            names = {r.name: w for r, w in self.trainer.engine.rewards}
            if all(f"reward/{n}" in metrics for n in names):
                acc["reward"] += sum(w * metrics[f"reward/{n}"] for n, w in names.items())
                acc["reward_n"] += 1
        if "dmd/grad_abs_mean" in metrics:
            acc["dmd_grad"] += metrics["dmd/grad_abs_mean"]
            acc["dmd_grad_n"] += 1

    def _training_signals(self) -> dict[str, float]:
        """Means since the last probe, averaged over ranks (collective), on a fixed key set."""
        acc = self.state["acc"]
        sums = {"reward": acc["reward"], "reward_n": float(acc["reward_n"]), "dmd_grad": acc["dmd_grad"],
                "dmd_grad_n": float(acc["dmd_grad_n"])}
        sums = reduce_over_ranks(sums, self.trainer.dist, "sum")
        skipped = self.trainer.engine.counters.skipped_steps - self.state["skipped_at_probe"]
        out = {"train/skipped_since_probe": float(skipped)}
        if sums["reward_n"]:
            out["train/reward"] = sums["reward"] / sums["reward_n"]
        if sums["dmd_grad_n"]:
            out["train/dmd_grad"] = sums["dmd_grad"] / sums["dmd_grad_n"]
        return out

    def _agreed(self, value: Any) -> Any:
        d = self.trainer.dist
        return d.broadcast_object(value) if d is not None else value

    def _event(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with (self.output_dir / EVENTS_FILE).open("a") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ the hook
    def after_step(self, trainer: Any, k: int, metrics: dict[str, float], logger: Any,
                   checkpoint: Any = None) -> Verdict:
        """Called by the trainer after every generator step (on every rank); adds the probe's signals to
        ``metrics`` on probe steps."""
        self._accumulate(metrics)
        if not self.due(k):
            return NOTHING
        signals, images = run_probe(trainer, self.prompts, self.g.seeds, self.scorers)
        signals.update(self._training_signals())
        if "train/reward" in signals and "probe/reward" in signals:
            signals["probe/reward_gap"] = signals["train/reward"] - signals["probe/reward"]
        signals = self._agreed(signals)  # rank 0's numbers decide for everyone
        st = self.state
        st["acc"] = _fresh_state()["acc"]
        st["skipped_at_probe"] = trainer.engine.counters.skipped_steps
        first = st["baseline"] is None
        if first:
            st["baseline"] = signals
        st["history"] = ([*st["history"], signals])[-(self.g.trend_window + 1):]
        trips = [] if first else evaluate(signals, st["baseline"], st["history"], self.g)
        st["trips"] += len(trips)
        metrics.update(signals)
        metrics.update({"guard/trips": float(st["trips"]), "guard/rollbacks": float(st["rollbacks"]),
                        "guard/scale": self.scale})
        logger.log_images(k, "probe", images, nrow=len(self.prompts))
        if not trips:
            st["last_passed"] = k
            self._protect()
            return Verdict(probed=True, passed=True)
        evidence: dict[str, dict[str, float]] = {}
        for t in trips:  # one rule may trip on several signals (the diversity measures)
            evidence.setdefault(t.rule, {}).update(t.evidence)
        text = "; ".join(t.message for t in trips)
        action = self.g.action
        if action == "rollback" and (st["rollbacks"] >= self.g.max_rollbacks or st["last_passed"] < 0):
            action = "stop"
            text += (f" (after {st['rollbacks']} rollback(s), the most guard.max_rollbacks allows)"
                     if st["last_passed"] >= 0 else " (no probe has passed yet: nothing to roll back to)")
        self._event({"step": k, "time": time.time(), "action": action, "trips": [t.rule for t in trips],
                     "message": text, "evidence": evidence, "rollbacks": st["rollbacks"]})
        if self.is_main:
            log.warning("guard tripped at generator step %d (%s): %s", k, action, text)
        if action == "warn":
            return Verdict(probed=True)
        if action == "stop":
            st["stop_reason"] = (f"the guard stopped the run at generator step {k}: {text}; the checkpoint of step "
                                 f"{k} is written (evidence: {self.output_dir / EVENTS_FILE})")
            return Verdict(probed=True, stop=True)
        logger.log(k, metrics)  # the trip's row goes with the discarded branch's rows
        self.rollback(trainer, k, logger, checkpoint)
        return Verdict(probed=True, rolled_back=True)

    def rollback(self, trainer: Any, k: int, logger: Any, checkpoint: Any) -> None:
        """Restore the last passing probe's checkpoint, lower the setting, re-save it (see the module doc)."""
        st = self.state
        target = st["last_passed"]
        keep = {**st, "rollbacks": st["rollbacks"] + 1, "history": st["history"][:-1], "acc": _fresh_state()["acc"]}
        self.checkpoints.wait()
        self.checkpoints.discard_after(target)
        self.checkpoints.load(trainer.app_state(), self.checkpoints.step_dir(target))
        self.state = keep
        self.state["skipped_at_probe"] = trainer.engine.counters.skipped_steps
        self._apply_scale()
        trainer.restart_iteration()
        aside = logger.set_aside_after(target, f"metrics-rolled-back-{self.state['rollbacks']}.jsonl")
        what = "generator learning rates" if self.g.rollback_target == "lr" else "reward weights"
        if self.is_main:
            log.warning("guard rollback %d/%d: generator step %d -> %d (the last passing probe), %s x%g; the "
                        "discarded steps' metrics: %s", self.state["rollbacks"], self.g.max_rollbacks, k, target,
                        what, self.scale, aside)
        if checkpoint is not None:
            checkpoint(target, final=True)

    @property
    def stop_reason(self) -> str | None:
        return self.state.get("stop_reason")

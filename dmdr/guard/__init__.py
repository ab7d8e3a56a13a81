"""Guard-rails: a health probe, rules on real-model signals, and actions (warn, stop, rollback).

* :mod:`dmdr.guard.signals`: image statistics (saturation, colourfulness, clipped pixels, seed diversity).
* :mod:`dmdr.guard.probe`: the student's samples of fixed prompts and noise, scored.
* :mod:`dmdr.guard.rules`: thresholds and trends, with their defaults.
* :mod:`dmdr.guard.guard`: the :class:`Guard` the trainer calls after each step (``--guard.action``).
"""

from dmdr.guard.guard import EVENTS_FILE, Guard, GuardStopped, Verdict
from dmdr.guard.rules import Trip, evaluate

__all__ = ["EVENTS_FILE", "Guard", "GuardStopped", "Trip", "Verdict", "evaluate"]

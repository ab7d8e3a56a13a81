"""The guard's action tests share these: the tiny recipe with a rollback guard, and a trip injected at the first
probe after the baseline (which rules trip is tested in tests/guard; here only what the actions do)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.tiny_helpers import tiny_config


def guard_config(assets: dict[str, str], out: Path, **kw: Any):
    """Probes at 2 (baseline), 4 (the injected trip), 6, 8; checkpoints every 3 steps and at passing probes, so a
    rollback from 4 to 2 has a later checkpoint (3) to discard."""
    settings = {"guard__action": "rollback", "guard__interval": 2, "guard__start_step": 2,
                "checkpoint__interval": 3, "rl__start_step": 2, **kw}
    return tiny_config(assets, out, **settings)


def install_trip_once(mp: Any) -> list:
    """With ``mp`` (a ``pytest.MonkeyPatch``): the first probe after the baseline trips while no rollback happened
    yet; every other probe passes. Returns the list of the Guards made (the newest last)."""
    import dmdr.guard.guard as guard_module
    from dmdr.guard import Guard, Trip

    guards: list = []
    init = Guard.__init__

    def capture(self, *args, **kwargs):
        init(self, *args, **kwargs)
        guards.append(self)

    def fake(latest, baseline, history, cfg):
        g = guards[-1]
        if g.state["rollbacks"] == 0 and len(history) == 2:
            return [Trip("saturation", "saturation: injected", {"probe/saturation": latest["probe/saturation"]})]
        return []

    mp.setattr(Guard, "__init__", capture)
    mp.setattr(guard_module, "evaluate", fake)
    return guards

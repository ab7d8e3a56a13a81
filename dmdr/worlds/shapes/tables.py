"""Tables 4 and 5 from the jobs' results: mean +- std over seeds, the paper's orderings checked, the hacking plot.

Input: ``results`` maps a job name (:func:`dmdr.worlds.shapes.ablations.plan_jobs`) to its ``result.json``.
Every ordering the report states is computed here from the numbers, next to what the paper's table shows
for the same ordering; a difference smaller than the two rows' seed spread (``sqrt(std_a^2 + std_b^2)``) is
called "within seed noise", whichever way it points.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dmdr.worlds.shapes.ablations import INIT, METHODS, TABLE4, TABLE5, Settings
from dmdr.worlds.shapes.evaluation import mean_std, seed_spread

PAPER_TABLE4 = {  # CLIP Score / HP Score at 1000 and 2000 iterations (SD3.5-Large)
    "vanilla": {"clip@1": 31.5608, "hps@1": 27.0051, "clip@2": 32.5492, "hps@2": 28.4541},
    "dynadg": {"clip@1": 32.7905, "hps@1": 27.5723, "clip@2": 33.5045, "hps@2": 29.0363},
    "dynars": {"clip@1": 33.1657, "hps@1": 27.8276, "clip@2": 33.6432, "hps@2": 29.1157},
    "static": {"clip@1": 32.6562, "hps@1": 27.2641, "clip@2": 33.0245, "hps@2": 28.8459},
}
PAPER_TABLE5 = {  # CLIP Score / Aesthetic / PickScore / HP Score after 2K cold-start iterations and RL
    "init": (33.6432, 5.6124, 21.0489, 29.1157),
    "distill": (33.6738, 5.6248, 21.6376, 29.1389),
    "refl_only": (33.1897, 5.8841, 22.3008, 31.2714),
    "refl": (34.6249, 6.1813, 22.7578, 32.8979),
    "dpo_only": (33.9554, 5.7893, 21.7643, 29.5819),
    "dpo": (33.9632, 5.9710, 21.9865, 30.5994),
    "grpo_only": (33.9095, 5.7876, 21.7956, 29.4429),
    "grpo": (34.0055, 5.8256, 22.0120, 30.6248),
}
PAPER_METRICS5 = ("CLIP", "Aesthetic", "PickScore", "HPS")
SHOWN = ("overall", "count", "position", "exact", "fidelity", "reward")
"""The columns of the markdown tables (every key of :data:`~dmdr.worlds.shapes.report.KEYS` is in the JSON)."""


def _stat(values: list[float]) -> dict[str, float]:
    """Mean and sample std of ``values`` (NaNs dropped), as :func:`~dmdr.worlds.shapes.evaluation.mean_std`."""
    return mean_std([{"v": v} for v in values])["v"]


def _runs(results: dict[str, dict], table: int, key: str) -> list[dict]:
    return [r for name, r in sorted(results.items()) if name.startswith(f"t{table}/{key}/")]


def _row(label: str, key: str, runs: list[dict], step: int, overrides: tuple[str, ...] = (),
         extra: dict | None = None) -> dict:
    """A table row: mean/std over the seeds' scores at ``step``; ``overrides`` are the arm's own training flags."""
    per_seed = [r["scores"][str(step)] for r in runs]
    return {"label": label, "key": key, "step": step, "seeds": len(runs),
            "scores": mean_std(per_seed), "per_seed": per_seed,
            "wall_s": _stat([r.get("train_s", 0.0) + r.get("score_s", 0.0) for r in runs]),
            "overrides": list(overrides), "config": runs[0].get("config", {}) if runs else {}, **(extra or {})}


def _schedule(runs: list[dict]) -> dict[str, Any]:
    """The cold-start schedules as the runs logged them (first and last logged step): the arm did what it says."""
    curve = runs[0]["curve"] if runs else []
    if not curve:
        return {}
    first, last = curve[0], curve[-1]
    return {"lora_scale_real": [first.get("schedule/lora_scale_real"), last.get("schedule/lora_scale_real")],
            "dynars_mean": [first.get("schedule/dynars_mean"), last.get("schedule/dynars_mean")],
            "steps": [first["step"], last["step"]]}


def table4(results: dict[str, dict], s: Settings) -> list[dict]:
    c, half = s.cold_steps, max(1, s.cold_steps // 2)
    rows = []
    for arm in TABLE4:
        runs = _runs(results, 4, arm.key)
        if runs:
            at = {str(k): _row(arm.label, arm.key, runs, k, arm.overrides) for k in sorted({half, c})}
            rows.append({"label": arm.label, "key": arm.key, "at": at, "schedule": _schedule(runs),
                         "paper": PAPER_TABLE4[arm.key]})
    return rows


def table5(results: dict[str, dict], s: Settings) -> list[dict]:
    c, end = s.cold_steps, s.cold_steps + s.rl_steps
    init = _runs(results, 4, INIT)
    init_arm = next(a for a in TABLE4 if a.key == INIT)
    rows = [_row("init", "init", init, c, init_arm.overrides,
                 {"paper": dict(zip(PAPER_METRICS5, PAPER_TABLE5["init"]))})]
    for arm in TABLE5:
        runs = _runs(results, 5, arm.key)
        if runs:
            rows.append(_row(arm.label, arm.key, runs, end, arm.overrides,
                             {"paper": dict(zip(PAPER_METRICS5, PAPER_TABLE5[arm.key]))}))
    return rows


def curves(results: dict[str, dict], s: Settings) -> dict[str, dict]:
    """Per Table 5 arm: held-out scores (mean/std over seeds) at each scored step, the init at RL step 0."""
    init = {str(s.cold_steps): [r["scores"][str(s.cold_steps)] for r in _runs(results, 4, INIT)]}
    out = {}
    for arm in TABLE5:
        runs = _runs(results, 5, arm.key)
        if not runs:
            continue
        by_step = {**init, **{k: [r["scores"][k] for r in runs] for k in runs[0]["scores"]}}
        steps = sorted(by_step, key=int)
        train = [[p for p in r["curve"] if "reward/shapes" in p] for r in runs]
        out[arm.key] = {
            "label": arm.label, "method": arm.method, "rl_only": arm.rl_only,
            "rl_step": [int(k) - s.cold_steps for k in steps],
            **{key: [_stat([x[key] for x in by_step[k]]) for k in steps] for key in ("reward", "overall",
                                                                                         "fidelity", "count")},
            "train_reward": {"rl_step": [p["step"] - s.cold_steps for p in train[0]],
                             "mean": [_stat([t[i]["reward/shapes"] for t in train if i < len(t)])["mean"]
                                      for i in range(len(train[0]))]},
        }
    return out


# ------------------------------------------------------------------------------------------------- orderings
def _cmp(a: dict, b: dict, key: str = "overall") -> tuple[bool, bool, str]:
    """``(a > b, clear, numbers)``: clear when the gap exceeds the two rows' combined seed spread (None: one seed)."""
    ma, sa = a["scores"][key]["mean"], a["scores"][key]["std"]
    mb, sb = b["scores"][key]["mean"], b["scores"][key]["std"]
    gap = ma - mb
    clear = None if min(a["seeds"], b["seeds"]) < 2 else abs(gap) > seed_spread(a, b, key)
    return gap > 0, clear, f"{ma:.3f} ± {sa:.3f} vs {mb:.3f} ± {sb:.3f}"


def _claim(table: int, text: str, here: tuple[bool, bool, str], paper_holds: bool, paper: str) -> dict:
    holds, clear, numbers = here
    return {"table": table, "claim": text, "holds": holds, "clear": clear, "numbers": numbers,
            "paper_holds": paper_holds, "paper": paper}


def claims4(rows: list[dict], s: Settings) -> list[dict]:
    by = {r["key"]: r for r in rows}
    out = []
    pairs = (("dynadg", "vanilla", "+DynaDG beats vanilla DMD"), ("dynars", "dynadg", "+DynaRS beats +DynaDG"),
             ("static", "vanilla", "-Dynamic beats vanilla DMD"), ("dynars", "static", "+DynaRS beats -Dynamic"))
    for at, tag in ((max(1, s.cold_steps // 2), "@1"), (s.cold_steps, "@2")):
        for a, b, text in pairs:
            if a in by and b in by:
                pa, pb = PAPER_TABLE4[a], PAPER_TABLE4[b]
                paper_holds = pa["clip" + tag] > pb["clip" + tag] and pa["hps" + tag] > pb["hps" + tag]
                paper = (f"CLIP {pa['clip' + tag]:.2f} vs {pb['clip' + tag]:.2f}, "
                         f"HPS {pa['hps' + tag]:.2f} vs {pb['hps' + tag]:.2f}")
                out.append(_claim(4, f"{text} on ShapeEval at {at} steps",
                                  _cmp(by[a]["at"][str(at)], by[b]["at"][str(at)]), paper_holds, paper))
    return out


def claims5(rows: list[dict]) -> list[dict]:
    by = {r["key"]: r for r in rows}
    out = []

    def paper_cmp(a: str, b: str) -> tuple[bool, str]:
        pa, pb = PAPER_TABLE5[a], PAPER_TABLE5[b]
        wins = sum(x > y for x, y in zip(pa, pb))
        return wins == len(pa), f"higher on {wins} of {len(pa)} metrics (HPS {pa[3]:.2f} vs {pb[3]:.2f})"

    if "distill" in by:
        out.append(_claim(5, "only Distill. moves ShapeEval up from the init", _cmp(by["distill"], by["init"]),
                          *paper_cmp("distill", "init")))
    for m, name in METHODS.items():
        if m not in by:
            continue
        if "distill" in by:
            out.append(_claim(5, f"Distill. + RL ({name}) beats only Distill. on ShapeEval",
                              _cmp(by[m], by["distill"]), *paper_cmp(m, "distill")))
        if f"{m}_only" in by:
            out.append(_claim(5, f"Distill. + RL ({name}) beats only RL ({name}) on ShapeEval",
                              _cmp(by[m], by[f"{m}_only"]), *paper_cmp(m, f"{m}_only")))
            out.append(_claim(5, f"Distill. + RL ({name}) keeps a higher fidelity than only RL ({name})",
                              _cmp(by[m], by[f"{m}_only"], "fidelity"), True,
                              "Fig. 10: only RL hacks the reward, distill + RL does not"))
    if all(m in by for m in METHODS):
        se = {m: by[m]["scores"]["overall"]["mean"] for m in METHODS}
        best = all(se["refl"] > v for m, v in se.items() if m != "refl")
        out.append(_claim(5, "ReFL is the best RL branch with distillation (ShapeEval)",
                          (best, None, ", ".join(f"{METHODS[m]} {by[m]['scores']['overall']['mean']:.3f}"
                                                            for m in METHODS)),
                          True, "HPS ReFL 32.90, DPO 30.60, GRPO 30.62"))
    return out


# ------------------------------------------------------------------------------------------------- markdown
def _cell(stat: dict, seeds: int) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if seeds > 1 else f"{stat['mean']:.3f}"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def markdown_reference(reference: list[dict]) -> str:
    """The teacher's rows (one deterministic evaluation, no seeds): the gap and the ceiling the tables sit in."""
    lines = ["| teacher sampler | NFE | " + " | ".join("ShapeEval" if k == "overall" else k for k in SHOWN) + " |",
             "|---|---|" + "---|" * len(SHOWN)]
    for ref in reference:
        cells = " | ".join(f"{ref['scores'][k]:.3f}" for k in SHOWN)
        lines.append(f"| {ref['label']} | {ref['nfe']} | {cells} |")
    return "\n".join(lines)


def markdown4(rows: list[dict], s: Settings) -> str:
    steps = sorted({max(1, s.cold_steps // 2), s.cold_steps})
    head = "| method | " + " | ".join(f"{k} @{t}" for t in steps for k in ("ShapeEval", "fidelity", "reward"))
    lines = [head + " | s_r first → last | DynaRS mean first → last | paper CLIP / HPS @1000, @2000 |",
             "|---|" + "---|" * (3 * len(steps) + 3)]
    for r in rows:
        cells = [_cell(r["at"][str(t)]["scores"][k], r["at"][str(t)]["seeds"])
                 for t in steps for k in ("overall", "fidelity", "reward")]
        sch, p = r["schedule"], r["paper"]
        sr, dm = sch.get("lora_scale_real", [None, None]), sch.get("dynars_mean", [None, None])
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {_fmt(sr[0])} → {_fmt(sr[1])} | "
                     f"{_fmt(dm[0])} → {_fmt(dm[1])} | {p['clip@1']:.2f} / {p['hps@1']:.2f}, "
                     f"{p['clip@2']:.2f} / {p['hps@2']:.2f} |")
    return "\n".join(lines)


def markdown5(rows: list[dict]) -> str:
    lines = ["| method | " + " | ".join("ShapeEval" if k == "overall" else k for k in SHOWN) +
             " | paper CLIP / Aes / Pick / HPS |", "|---|" + "---|" * (len(SHOWN) + 1)]
    for r in rows:
        paper = " / ".join(f"{v:.2f}" for v in r["paper"].values())
        cells = " | ".join(_cell(r["scores"][k], r["seeds"]) for k in SHOWN)
        lines.append(f"| {r['label']} | {cells} | {paper} |")
    return "\n".join(lines)


def markdown_claims(claims: list[dict]) -> str:
    lines = ["| table | ordering | here | numbers (mean ± std over seeds) | paper |", "|---|---|---|---|---|"]
    for c in claims:
        note = {None: "", True: " (clear)", False: " (within seed noise)"}[c["clear"]]
        here = ("holds" if c["holds"] else "**does not hold**") + note
        paper = ("holds" if c["paper_holds"] else "does not hold") + f": {c['paper']}"
        lines.append(f"| {c['table']} | {c['claim']} | {here} | {c['numbers']} | {paper} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- plot
def plot_hacking(curve: dict[str, dict], path: str | Path) -> Path:
    """The reward-hacking view: held-out reward, ShapeEval, fidelity and the training-batch reward over RL steps.

    One colour per RL method; solid: distill + RL, dashed: only RL; grey: only distill. Bands: +- std over seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"refl": "tab:blue", "dpo": "tab:orange", "grpo": "tab:green", "": "tab:gray"}
    panels = (("reward", "world reward (held-out prompts)"), ("overall", "ShapeEval overall (held-out)"),
              ("fidelity", "fidelity (held-out)"), ("train_reward", "reward on the training batch (logged)"))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for ax, (key, title) in zip(axes.flat, panels):
        for c in curve.values():
            style = {"color": colours[c["method"]], "linestyle": "--" if c["rl_only"] else "-", "label": c["label"]}
            if key == "train_reward":
                if c["train_reward"]["rl_step"]:
                    ax.plot(c["train_reward"]["rl_step"], c["train_reward"]["mean"], **style)
                continue
            mean = [p["mean"] for p in c[key]]
            std = [p["std"] for p in c[key]]
            ax.plot(c["rl_step"], mean, marker="o", markersize=3, **style)
            ax.fill_between(c["rl_step"], [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                            color=style["color"], alpha=0.12, linewidth=0)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("generator steps after the cold start")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Table 5 runs: only RL (dashed) vs distill + RL (solid), mean ± std over seeds", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["PAPER_TABLE4", "PAPER_TABLE5", "table4", "table5", "curves", "claims4", "claims5", "markdown4",
           "markdown5", "markdown_reference", "markdown_claims", "plot_hacking"]

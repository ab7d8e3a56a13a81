"""The demo report's claims: "reaches" is issue 23's 0.03 bar, "beats the teacher" must clear the seed spread."""

from dmdr.worlds.shapes.report import claims


def _row(overall: float, std: float = 0.0, reward: float = 0.5, fidelity: float = 0.97) -> dict:
    return {"scores": {"overall": {"mean": overall, "std": std}, "reward": {"mean": reward, "std": 0.0},
                       "fidelity": {"mean": fidelity, "std": 0.0}}}


def _verdicts(teacher: float, dmd: float, dmdr: float, spread: float) -> dict[str, bool]:
    rows = {"T": _row(teacher, spread), "t": _row(0.05), "D": _row(dmd), "R": _row(dmdr, reward=0.9),
            "F": _row(dmdr, reward=0.99, fidelity=0.88)}
    return {c.split(" (")[0]: h for c, h, _ in claims(rows, "T", "t", "D", "R", "F")}


def test_reach_is_within_three_hundredths():
    assert _verdicts(0.36, 0.331, 0.3, 0.0)["DMD few-step reaches the multi-step teacher"]
    assert not _verdicts(0.36, 0.329, 0.3, 0.0)["DMD few-step reaches the multi-step teacher"]


def test_beating_the_teacher_must_clear_the_spread():
    key = "DMDR beats the multi-step CFG teacher on ShapeEval"
    assert _verdicts(0.36, 0.3, 0.37, 0.005)[key]
    assert not _verdicts(0.36, 0.3, 0.37, 0.02)[key]  # a 0.01 lead inside a 0.02 spread is not a win


def test_beating_dmd_alone_must_clear_the_spread_too():
    key = "DMDR beats DMD alone on ShapeEval"
    rows = {"T": _row(0.36), "t": _row(0.05), "D": _row(0.31, 0.02), "R": _row(0.32, 0.01, reward=0.9),
            "F": _row(0.3, reward=0.99, fidelity=0.88)}
    verdicts = {c.split(" (")[0]: h for c, h, _ in claims(rows, "T", "t", "D", "R", "F")}
    assert not verdicts[key]  # 0.01 ahead inside a 0.02 spread
    rows["R"] = _row(0.34, 0.01, reward=0.9)
    assert {c.split(" (")[0]: h for c, h, _ in claims(rows, "T", "t", "D", "R", "F")}[key]

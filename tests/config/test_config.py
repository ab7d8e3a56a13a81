"""Config overrides: every field reachable, typos and bad values stop with one line naming the field."""

import json

import pytest

from dmdr.config import TrainConfig, all_keys, apply_overrides, from_dict, save_config, to_dict
from dmdr.errors import ConfigError


def test_required_keys_exist():
    keys = set(all_keys(TrainConfig()))
    for k in ("train.output_dir", "train.max_steps", "train.seed", "checkpoint.interval", "model.path"):
        assert k in keys


def test_overrides_of_every_type():
    cfg = apply_overrides(TrainConfig(), [
        "--optim.generator_lr", "5e-7", "--train.max_steps=12", "--dmd.backward_simulation", "sde",
        "--rl.rewards", "hps,clip,pickscore", "--rl.weights", "0.1,0.1,0.2", "--dynamic.dynadg", "false",
        "--optim.betas", "0.8,0.99", "--model.path", "/x/y",
    ])
    assert cfg.optim.generator_lr == 5e-7 and cfg.train.max_steps == 12
    assert cfg.dmd.backward_simulation == "sde"
    assert cfg.rl.rewards == ("hps", "clip", "pickscore") and cfg.rl.weights == (0.1, 0.1, 0.2)
    assert cfg.dynamic.dynadg is False and cfg.optim.betas == (0.8, 0.99) and cfg.model.path == "/x/y"


@pytest.mark.parametrize("argv,needle", [
    (["--optim.lr", "1e-6"], "did you mean --optim.generator_lr"),
    (["--optimm.generator_lr", "1e-6"], "--optim.generator_lr"),
    (["--train.max_step", "3"], "--train.max_steps"),
    (["--dmd.backward_simulation", "euler"], "ode, sde"),
    (["--train.max_steps", "ten"], "not a valid int"),
    (["--train.max_steps", "2.5"], "not a valid int"),
    (["--dynamic.dynadg", "maybe"], "boolean"),
    (["--train.max_steps", "0"], "--train.max_steps: must be >= 1"),
    (["--rl.weights", "0.3"], "--rl.weights"),
    (["--data.rl_batch_size", "-1"], "--data.rl_batch_size: must be >= 0"),
    (["--dmd.weight", "-0.5"], "--dmd.weight: must be >= 0"),
    (["--train.seed"], "needs a value"),
    (["positional"], "unexpected argument"),
])
def test_bad_overrides_name_the_field(argv, needle):
    with pytest.raises(ConfigError) as err:
        apply_overrides(TrainConfig(), argv)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_round_trip_through_json(tmp_path):
    cfg = apply_overrides(TrainConfig(), ["--train.seed", "7", "--data.sources", "a.txt,b.jsonl",
                                          "--data.weights", "1,3"])
    cfg.log.sample_prompts = ("a cat, sitting", "a dog")
    path = save_config(cfg, tmp_path)
    again = from_dict(json.loads(path.read_text()))
    assert to_dict(again) == to_dict(cfg)
    assert again.log.sample_prompts == ("a cat, sitting", "a dog")


def test_collecting_mode_reports_every_bad_override():
    """With ``problems`` (preflight), every bad argument and failed check is collected; good ones still apply."""
    argv = ["--optim.lr", "1e-6", "--train.max_steps", "abc", "--dmd.ratio", "0", "--data.batch_size", "0",
            "--model.path", "/x", "stray", "--train.seed"]
    with pytest.raises(ConfigError, match="unknown config key --optim.lr"):
        apply_overrides(TrainConfig(), list(argv))  # without it: the first problem only
    problems: list[tuple[str, str]] = []
    cfg = apply_overrides(TrainConfig(), argv, problems=problems)
    assert [key for key, _ in problems] == ["optim.lr", "train.max_steps", "", "train.seed", "dmd.ratio",
                                            "data.batch_size"]
    assert problems[1][1] == "--train.max_steps: 'abc' is not a valid int"
    assert problems[4][1] == "--dmd.ratio: must be >= 1"
    assert cfg.model.path == "/x" and cfg.train.max_steps == TrainConfig().train.max_steps

"""A recipe's ``--help`` shows every field's docstring, and the config parser's choices hold (README)."""

from __future__ import annotations

from dataclasses import dataclass

from dmdr.config import TrainConfig, all_keys, field_docs
from dmdr.launch import _help, main
from dmdr.recipes.tiny_dmdr import tiny_dmdr


def test_help_shows_each_fields_docstring(capsys):
    assert main(tiny_dmdr, ["--help"]) == 0
    out = capsys.readouterr().out
    assert "  --model.path " in out
    assert "Local diffusers-format folder of the teacher" in out  # ModelConfig.path's docstring
    assert "Micro-batches per step" in out  # train.grad_accum's
    assert "train: The run: its folder, length, seed, device and step shape." in out  # a section's own line
    # every key is listed, in config order
    positions = [out.index(f"  --{k} ") for k in all_keys(tiny_dmdr())]
    assert positions == sorted(positions)


def test_docstrings_are_read_from_the_source():
    docs = field_docs(type(TrainConfig().dmd))
    assert docs["ratio"] == "Critic (fake score) updates per generator update."
    assert field_docs(_Plain) == {"documented": "What it does, on two lines."}


@dataclass
class _Plain:
    bare: int = 1
    documented: int = 2
    """What it does,
    on two lines."""


def test_most_fields_have_one():
    cfg = TrainConfig()
    keys = all_keys(cfg)
    documented = [k for k in keys if k.partition(".")[2] in field_docs(type(getattr(cfg, k.partition(".")[0])))]
    assert len(documented) >= 0.75 * len(keys), sorted(set(keys) - set(documented))


def test_help_text_wraps_long_docstrings():
    docs = [line for line in _help(tiny_dmdr).splitlines() if line.startswith(" " * 6)]
    assert docs and max(len(line) for line in docs) <= 110

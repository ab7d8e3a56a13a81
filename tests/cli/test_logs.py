"""dmdr's console (dmdr/logs.py): rank 0 talks, other ranks warn, names are the emitters', known noise filtered;
one-line errors once per node under torchrun; the plain step line without a terminal."""

from __future__ import annotations

import io
import logging

import pytest

from dmdr.errors import ConfigError, DataError
from dmdr.logs import package_of, setup_logging
from dmdr.observability import ProgressBar, step_line


@pytest.fixture
def console():
    """``setup_logging`` into a string, undone afterwards (the root logger is global)."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    streams = []

    def make(rank: int) -> io.StringIO:
        stream = io.StringIO()
        streams.append(setup_logging(rank, stream=stream))
        return stream

    yield make
    for h in streams:
        root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)
    for name in ("diffusers", "transformers"):  # back to the libraries' own handlers for the other tests
        module = __import__(f"{name}.utils.logging", fromlist=["_"])
        module.enable_default_handler()
        module.disable_propagation()


def test_rank0_logs_info_other_ranks_only_warnings_with_their_rank(console):
    out = console(0)
    logging.getLogger("dmdr.trainer").info("hello from rank 0")
    assert "dmdr.trainer INFO hello from rank 0" in out.getvalue()
    out = console(3)
    logging.getLogger("dmdr.trainer").info("chatter")
    logging.getLogger("dmdr.trainer").warning("something odd")
    text = out.getvalue()
    assert "chatter" not in text and "dmdr.trainer WARNING [rank 3] something odd" in text


def test_root_logger_lines_are_named_after_their_package(console):
    out = console(0)
    record = logging.LogRecord("root", logging.INFO, "/venv/lib/python3.11/site-packages/open_clip/factory.py", 339,
                               "Loaded model config and preprocess from: %s", ("/models/clip",), None)
    logging.getLogger().handle(record)
    assert "open_clip INFO Loaded model config" in out.getvalue() and " dmdr " not in out.getvalue()
    assert package_of("/x/site-packages/open_clip/factory.py") == "open_clip"


def test_diffusers_attention_backend_notice_is_silenced(console):
    out = console(0)
    from diffusers.models import modeling_utils

    modeling_utils.logger.warning("Attention backends are an experimental feature and the API may be subject to "
                                  "change.")
    modeling_utils.logger.warning("an unrelated diffusers warning")
    text = out.getvalue()
    assert "experimental" not in text and "an unrelated diffusers warning" in text


def test_lora_release_without_text_encoder_keys_is_silenced(console):
    out = console(0)
    from diffusers.loaders import lora_base

    lora_base.logger.warning(
        "No LoRA keys associated to CLIPTextModelWithProjection found with the prefix='text_encoder'. This is safe "
        "to ignore if LoRA state dict didn't originally have any CLIPTextModelWithProjection related params. You can "
        "also try specifying `prefix=None` to resolve the warning. Otherwise, open an issue if you think it's "
        "unexpected: https://github.com/huggingface/diffusers/issues/new")
    assert out.getvalue() == ""


def test_padding_only_truncation_is_silenced_a_real_cut_explained_once(console):
    out = console(0)
    from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3 as sd3

    sd3.logger.warning("The following part of your input was truncated because CLIP can only handle sequences up to"
                       " 77 tokens: ['', '']")
    assert out.getvalue() == ""
    for _ in range(2):
        sd3.logger.warning("The following part of your input was truncated because `max_sequence_length` is set to "
                           " 256 tokens: ['a very long tail']")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "its tail is cut" in lines[0] and "a very long tail" in lines[0]


def test_single_file_float32_cast_note_is_silenced_when_nothing_is_listed(console):
    out = console(0)
    from diffusers.models import modeling_utils

    # what loading tools/convert_to_diffusers.py --single-file of an SD3 run printed (issue 29)
    modeling_utils.logger.warning(
        "There are modules in SD3Transformer2DModel that should be kept in float32: []. Casting directly with `to()` "
        "can lead to inconsistent results; set `torch_dtype` in `from_pretrained()` instead.")
    assert out.getvalue() == ""
    for _ in range(2):
        modeling_utils.logger.warning("There are modules in FooModel that should be kept in float32: ['norm_out']. "
                                      "Casting directly with `to()` can lead to inconsistent results")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "single-file transformer" in lines[0] and "norm_out" in lines[0]


def test_python_warnings_go_through_the_same_filter(console):
    import warnings

    out = console(0)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(True)
        warnings.warn("Attention backends are an experimental feature", UserWarning, stacklevel=1)
        warnings.warn("a real problem", UserWarning, stacklevel=1)
    text = out.getvalue()
    assert "experimental" not in text and "a real problem" in text


def test_user_errors_print_once_per_node(monkeypatch, capsys):
    from dmdr.launch import main

    def broken():
        raise ConfigError("--model.path: a bad folder")

    for rank, local, printed in ((0, 0, True), (1, 1, False), (9, 0, True)):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(local))
        monkeypatch.setenv("WORLD_SIZE", "16")
        assert main(broken, []) == 2
        err = capsys.readouterr().err
        assert (err.count("error: --model.path: a bad folder") == 1) is printed, (rank, err)
        if printed and rank:
            assert err.startswith(f"[rank {rank}] error:")

    def bad_shard():
        err = DataError("/data/shard-7.jsonl: line 3 is not JSON")
        err.rank_local = True  # as the trainer marks this rank's own bad data
        raise err

    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert main(bad_shard, []) == 2
    assert capsys.readouterr().err.strip() == "[rank 5] error: /data/shard-7.jsonl: line 3 is not JSON"


def test_without_a_terminal_no_bar_and_a_plain_step_line():
    assert not ProgressBar(10, 0, enabled=True, stream=io.StringIO()).shown
    line = step_line(120, 4000, {"loss/dmd": 0.0123, "loss/fake": 0.087, "perf/step_time": 1.84})
    assert line.startswith("step 120/4000 (3.0%) | dmd 0.0123 fake 0.087 | 1.84 s/step | ETA 1h58m")

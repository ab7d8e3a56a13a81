"""What every family's text encoder shares, whatever its encoders (CLIP, T5, Qwen3, Qwen2.5-VL).

A family's encoder (:class:`~dmdr.models.base.TextEncoder`) subclasses :class:`FrozenPromptEncoder` and writes
only its pipeline's encoding (``encode``); moving the frozen modules, the cached negative, the tokenizing with
the truncation count and the "valid tokens first" packing are here. :func:`load_frozen_text_encoder` is the
loaders' common tail: the folder's text components, built into the family's encoder, frozen, on the device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from dmdr.models.base import Conditioning
from dmdr.models.folder import LoadOptions, ModelFolder, freeze

log = logging.getLogger("dmdr")

Encoder = TypeVar("Encoder", bound="FrozenPromptEncoder")


class FrozenPromptEncoder:
    """Frozen text encoder module(s) behind ``encode(prompts) -> Conditioning``; subclasses write ``encode``.

    Attributes:
        truncated: prompts whose tokens were cut to the encoder's length so far (the run summary reports it).
    """

    negative_prompt = ""
    """The pipeline's default negative prompt (encoded once by :meth:`negative`)."""

    def __init__(self, *modules: nn.Module | None):
        self._modules = [m for m in modules if m is not None]
        self.truncated = 0
        self._negative: Conditioning | None = None

    @property
    def device(self) -> torch.device:
        return self._modules[0].device

    def modules(self) -> list[nn.Module]:
        return list(self._modules)

    def to(self: Encoder, device: torch.device | str) -> Encoder:
        for m in self._modules:
            m.to(device)
        self._negative = None  # cached on the old device
        return self

    def encode(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def unconditional(self) -> Conditioning:
        """The conditioning CFG's negative branch uses (SDXL overrides it: zeros)."""
        return self.encode([self.negative_prompt])

    def negative(self) -> Conditioning:
        """:meth:`unconditional`, batch 1, computed once per device."""
        if self._negative is None:
            self._negative = self.unconditional()
        return self._negative

    def tokenize(self, tokenizer: Any, texts: list[str], max_length: int, *, padding: bool | str = "max_length",
                 count_as: str | None = None, shown_length: int | None = None) -> Any:
        """``tokenizer(texts)`` cut to ``max_length`` tokens, as tensors.

        ``count_as`` (the tokens' name in the log line, ``T5``): prompts longer than ``max_length`` add to
        :attr:`truncated`; ``shown_length``: the length the log line names when it is not ``max_length``.
        """
        inputs = tokenizer(texts, padding=padding, max_length=max_length, truncation=True, return_tensors="pt")
        if count_as is not None:
            cut = sum(len(x) > max_length for x in tokenizer(texts).input_ids)
            if cut:
                self.truncated += cut
                log.debug("%d prompt(s) truncated to %d %s tokens", cut, shown_length or max_length, count_as)
        return inputs


def chat_prompt(tokenizer: Any, prompt: str, thinking: bool) -> str:
    """``prompt`` as one user message through a Qwen3 chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=thinking)


def valid_tokens_first(hidden: Tensor, keep: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """The ``keep``-ed tokens of each sample, moved to its front, zeros after: ``((B, length, D), (B, length))``.

    ``hidden`` ``(B, L, D)``, ``keep`` ``(B, L)`` bool; the second tensor is the prefix mask of the kept tokens.
    Where they stand in ``hidden`` (the tokenizer's padding side, a template's dropped head) does not matter.
    """
    prefix = torch.arange(length, device=keep.device)[None, :] < keep.sum(dim=1, keepdim=True)
    embeds = hidden.new_zeros(hidden.shape[0], length, hidden.shape[-1])
    embeds[prefix] = hidden[keep]
    return embeds, prefix


def load_frozen_text_encoder(folder: ModelFolder, options: LoadOptions, names: Sequence[str],
                             build: Callable[..., Encoder]) -> Encoder:
    """``build(**components)`` of ``folder``'s components ``names`` (in ``options.dtype``), frozen, on
    ``options.device``; nothing else of the folder is read."""
    encoder = build(**{n: folder.load(n, options.dtype) for n in names})
    freeze(*encoder.modules())
    return encoder.to(options.device)

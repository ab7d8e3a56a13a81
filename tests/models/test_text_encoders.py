"""The text-encoder parts every family shares (dmdr/models/text.py), against per-sample loops."""

from __future__ import annotations

import torch
from torch import nn

from dmdr.models.text import FrozenPromptEncoder, valid_tokens_first


def test_valid_tokens_first_moves_each_samples_kept_tokens_to_its_front():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 4, generator=gen)
    keep = torch.tensor([[0, 0, 1, 1, 1, 0, 0],   # padded on both sides
                         [1, 1, 1, 1, 1, 1, 1],   # nothing dropped
                         [0, 0, 0, 0, 0, 0, 0]],  # nothing kept
                        dtype=torch.bool)
    embeds, prefix = valid_tokens_first(hidden, keep, 7)
    for b in range(3):
        kept = hidden[b][keep[b]]
        n = len(kept)
        assert prefix[b].tolist() == [True] * n + [False] * (7 - n)
        assert torch.equal(embeds[b, :n], kept) and not embeds[b, n:].any()
    narrow, narrow_mask = valid_tokens_first(hidden[[0, 2]], keep[[0, 2]], 3)  # the longest kept run's width
    assert torch.equal(narrow, embeds[[0, 2], :3]) and torch.equal(narrow_mask, prefix[[0, 2], :3])


class _Tokens:
    """A tokenizer whose tokens are the prompt's words (padding and truncation as the HF call's arguments say)."""

    def __call__(self, texts, padding=False, max_length=None, truncation=False, return_tensors=None):
        ids = [[len(w) for w in t.split()] for t in texts]
        if truncation:
            ids = [x[:max_length] for x in ids]
        if padding:
            width = max_length if padding == "max_length" else max(len(x) for x in ids)
            ids = [x + [0] * (width - len(x)) for x in ids]
        out = type("Encoded", (), {})()
        out.input_ids = torch.tensor(ids) if return_tensors else ids
        return out


class _Linear(nn.Linear):
    @property
    def device(self) -> torch.device:  # as transformers' models have
        return self.weight.device


class _Encoder(FrozenPromptEncoder):
    def __init__(self):
        self.linear = _Linear(1, 1)
        super().__init__(self.linear, None)
        self.calls = 0

    def encode(self, prompts):
        self.calls += 1
        ids = self.tokenize(_Tokens(), prompts, 3, count_as="word")
        return {"prompt_embeds": ids.input_ids.float()}


def test_tokenize_counts_cut_prompts_and_negative_is_cached_per_device():
    enc = _Encoder()
    assert enc.modules() == [enc.linear] and enc.device == torch.device("cpu")
    out = enc.encode(["a b c d", "a b", "a b c"])
    assert out["prompt_embeds"].shape == (3, 3) and enc.truncated == 1  # only the 4-word prompt is cut
    first = enc.negative()
    assert enc.negative() is first and enc.calls == 2  # encoded once
    enc.to("cpu")
    assert enc.negative() is not first and enc.calls == 3  # moved: encoded again on the new device
    assert torch.equal(enc.negative()["prompt_embeds"], torch.zeros(1, 3))  # "" is the default negative

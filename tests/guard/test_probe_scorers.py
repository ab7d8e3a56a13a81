"""The probe's model-based signals (CLIP score, CLIP-embedding and LPIPS diversity across seeds, LAION aesthetic) on
tiny random models loaded from local files as real ones are, against float64 recomputations written out pair by
pair; latent and cosine diversity against hand-computed values; bad paths are one line naming the --guard flag."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from dmdr.config import GuardConfig, TrainConfig, apply_overrides
from dmdr.errors import ConfigError, ModelLoadError
from dmdr.guard.scorers import ProbeScorers
from dmdr.guard.signals import cosine_diversity, seed_diversity

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
PROMPTS = ["a red fox in the snow", "a bowl of ramen", "a lighthouse at dusk"]
SEEDS = 2


def _images(seed: int = 0, side: int = 40) -> torch.Tensor:
    return torch.rand(SEEDS * len(PROMPTS), 3, side, side, generator=torch.Generator().manual_seed(seed))


def _pre(images, size, mean, std):
    x = F.interpolate(images.double(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    return (x - m) / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)


def test_latent_diversity_is_the_mean_pairwise_rms_over_latent_elements():
    seeds, prompts = 3, 2
    x = torch.randn(seeds * prompts, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    ref = []
    for a, b in itertools.combinations(range(seeds), 2):
        for p in range(prompts):
            u, v = x[a * prompts + p].flatten().tolist(), x[b * prompts + p].flatten().tolist()
            ref.append(math.sqrt(sum((s - t) ** 2 for s, t in zip(u, v)) / len(u)))
    assert seed_diversity(x, seeds) == pytest.approx(sum(ref) / len(ref), abs=1e-6)


def test_cosine_diversity_is_one_minus_cosine_per_prompt_and_seed_pair():
    seeds, prompts = 3, 2
    f = torch.randn(seeds * prompts, 5, generator=torch.Generator().manual_seed(1))
    ref = []
    for a, b in itertools.combinations(range(seeds), 2):
        for p in range(prompts):
            u, v = f[a * prompts + p].tolist(), f[b * prompts + p].tolist()
            dot = sum(s * t for s, t in zip(u, v))
            ref.append(1 - dot / math.sqrt(sum(s * s for s in u) * sum(t * t for t in v)))
    assert cosine_diversity(f, seeds) == pytest.approx(sum(ref) / len(ref), abs=1e-6)
    same = f[:prompts].repeat(seeds, 1) * 3.0  # every seed the same direction: no diversity
    assert cosine_diversity(same, seeds) == pytest.approx(0.0, abs=1e-6)


def test_clip_score_clip_diversity_and_aesthetic_match_float64_recomputations(clip_folder, tiny_arch,
                                                                                aesthetic_head_file):
    import open_clip

    folder, model = clip_folder
    head_path, head = aesthetic_head_file
    g = GuardConfig(clip_model=str(folder), aesthetic_head=str(head_path))
    scorers = ProbeScorers.from_config(g, CPU)
    images = _images()
    prompts = PROMPTS * SEEDS
    got = scorers.signals(images, prompts, SEEDS)
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():  # the folder's preprocess: 32 px, mean 0.5, std 0.25
        emb = ref.encode_image(_pre(images, 32, (0.5,) * 3, (0.25,) * 3))
        txt = ref.encode_text(open_clip.get_tokenizer(tiny_arch)(prompts))
        aesthetic = copy.deepcopy(head).double()(emb / emb.norm(dim=-1, keepdim=True)).mean().item()
    cos = [F.cosine_similarity(emb[i], txt[i], dim=0).item() for i in range(len(prompts))]
    clip_score = sum(100 * max(c, 0.0) for c in cos) / len(cos)
    pairs = [1 - F.cosine_similarity(emb[p], emb[len(PROMPTS) + p], dim=0).item() for p in range(len(PROMPTS))]
    assert got["probe/clip_score"] == pytest.approx(clip_score, abs=1e-4)
    assert got["probe/diversity_clip"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-5)
    assert got["probe/aesthetic"] == pytest.approx(aesthetic, abs=1e-5)
    assert min(pairs) > 1e-4 and "probe/diversity_lpips" not in got


def test_lpips_diversity_is_the_per_prompt_mean_pairwise_lpips(lpips_file):
    path, model = lpips_file
    scorers = ProbeScorers.from_config(GuardConfig(lpips_weights=str(path)), CPU)
    images = _images(seed=2, side=64)
    got = scorers.signals(images, PROMPTS * SEEDS, SEEDS)
    with torch.no_grad():
        per_prompt = [model(images[p:p + 1], images[len(PROMPTS) + p:len(PROMPTS) + p + 1], normalize=True).item()
                      for p in range(len(PROMPTS))]
    assert set(got) == {"probe/diversity_lpips"} and min(per_prompt) > 0
    assert got["probe/diversity_lpips"] == pytest.approx(sum(per_prompt) / len(per_prompt), rel=1e-5)


def test_bad_scorer_paths_are_one_line_naming_the_guard_flag(tmp_path, clip_folder, aesthetic_head_file):
    with pytest.raises(ConfigError, match=r"^--guard\.clip_model: .*does not exist"):
        ProbeScorers.from_config(GuardConfig(clip_model=str(tmp_path / "nope")), CPU)
    from dmdr.evaluation.aesthetic import aesthetic_head

    wide = tmp_path / "wide-head.pth"  # a head for 24-d embeddings on a 16-d CLIP
    torch.save(aesthetic_head([24, 8, 8, 8, 4, 1]).state_dict(), wide)
    with pytest.raises(ModelLoadError, match=r"^--guard\.aesthetic_head .*takes 24-d embeddings.* gives 16-d") as e:
        ProbeScorers.from_config(GuardConfig(clip_model=str(clip_folder[0]), aesthetic_head=str(wide)), CPU)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^--guard\.aesthetic_head: needs --guard\.clip_model"):
        apply_overrides(TrainConfig(), ["--guard.aesthetic_head", str(aesthetic_head_file[0])])

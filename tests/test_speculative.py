"""Speculative decoding gives plain greedy decoding's tokens, whatever the drafts, batched or not."""

import pytest
import torch

from vlmkit.config import LanguageConfig
from vlmkit.models.language import LanguageModel
from vlmkit.models.speculative import Drafter, EarlyExitDrafter, NGramDrafter, parse_speculative
from vlmkit.models.vlm import VisionLanguageModel


def tiny_lm(seed: int = 0, **overrides) -> LanguageModel:
    torch.manual_seed(seed)
    cfg = {"vocab_size": 64, "hidden_size": 32, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
           "intermediate_size": 64, **overrides}
    lm = LanguageModel(LanguageConfig(**cfg)).eval()
    for p in lm.parameters():  # larger weights than the init's: sharper, less repetitive random predictions
        p.data.mul_(8.0)
    return lm


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7], [10, 11, 12, 10, 11, 12, 10], [20, 21, 22, 23, 24, 25, 26, 27, 28, 20, 21]]


class Oracle(Drafter):
    """Proposes the true greedy continuation (every draft kept), or always-wrong tokens (none kept)."""

    def __init__(self, truth: list[list[int]], wrong: bool = False, tokens: int = 4):
        super().__init__(tokens)
        self.truth, self.wrong, self.prompt_lens = truth, wrong, None

    def propose(self, lm, cache, mask, last, history, limit):
        if self.prompt_lens is None:
            self.prompt_lens = [len(h) - 1 for h in history]
        rows = []
        for b, h in enumerate(history):
            done = len(h) - self.prompt_lens[b]
            future = self.truth[b][done : done + min(self.tokens, limit)]
            rows.append([(t + 1) % 64 for t in future] if self.wrong else future)
        width = max(map(len, rows))
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # SDPA, and the explicit path
def test_a_chunk_after_the_cache_sees_what_a_full_forward_sees(dtype):
    lm = tiny_lm().to(dtype)
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 3, 4]])
    full = lm(ids).logits
    cache = lm.new_cache(1, 16)
    lm(ids[:, :8], cache=cache)
    chunk = lm(ids[:, 8:], cache=cache).logits
    assert torch.allclose(chunk.float(), full[:, 8:].float(), atol=1e-4 if dtype == torch.float32 else 0.5)
    assert (chunk.argmax(-1) == full[:, 8:].argmax(-1)).all()


@pytest.mark.parametrize("rows", [PROMPTS[:1], PROMPTS])
def test_ngram_and_early_exit_match_plain_greedy(rows):
    lm = tiny_lm()
    ids, mask = left_padded(rows)
    plain = lm.generate(ids, mask, max_new_tokens=24)
    for drafter in (NGramDrafter(tokens=4), NGramDrafter(tokens=2, max_ngram=1), EarlyExitDrafter(layers=1),
                    EarlyExitDrafter(layers=2, tokens=5)):
        assert lm.generate(ids, mask, max_new_tokens=24, speculative=drafter) == plain, drafter.name
        assert drafter.stats.proposed > 0 and drafter.stats.row_rounds >= drafter.stats.rounds > 0


def test_every_round_size_is_exercised():
    """All drafts kept and none kept: both ends of the acceptance range give the plain tokens."""
    lm = tiny_lm(seed=1)
    ids, mask = left_padded(PROMPTS)
    plain = lm.generate(ids, mask, max_new_tokens=16)
    right, wrong = Oracle(plain), Oracle(plain, wrong=True)
    assert lm.generate(ids, mask, max_new_tokens=16, speculative=right) == plain
    # The prefill's token, then 3 rounds of 4 kept drafts + the model's own token.
    assert right.stats.acceptance_rate == 1.0 and right.stats.rounds == 3 and right.stats.tokens_per_round == 5.0
    assert lm.generate(ids, mask, max_new_tokens=16, speculative=wrong) == plain
    assert wrong.stats.accepted == 0 and wrong.stats.rounds == 15 and wrong.stats.tokens_per_round == 1.0


def test_eos_and_finished_rows():
    lm = tiny_lm(seed=2)
    ids, mask = left_padded(PROMPTS)
    free = lm.generate(ids, mask, max_new_tokens=20)
    eos = free[1][5]  # a token row 1 produces: rows stop at different steps
    plain = lm.generate(ids, mask, max_new_tokens=20, eos_token_id=eos)
    assert any(len(r) < 20 for r in plain)
    for drafter in (NGramDrafter(), EarlyExitDrafter(layers=2), Oracle(free)):
        assert lm.generate(ids, mask, max_new_tokens=20, eos_token_id=eos, speculative=drafter) == plain


def test_vlm_with_images_and_cross_attention(make_config, tokenizer):
    for overrides in ({}, {"fusion": "cross_attention"}):
        torch.manual_seed(0)
        model = VisionLanguageModel(make_config(**overrides)).eval()
        n = model.tokens_per_image
        rows = [[5] + [tokenizer.image_id] * n + [7, 8, 9, 7, 8], [6, 6] + [tokenizer.image_id] * n + [9, 9, 9]]
        ids, mask = left_padded(rows)
        pixels = torch.randn(2, 3, 32, 32)
        plain = model.generate(ids, mask, pixel_values=pixels, max_new_tokens=12)
        for drafter in (NGramDrafter(), EarlyExitDrafter(layers=1)):
            assert model.generate(ids, mask, pixel_values=pixels, max_new_tokens=12, speculative=drafter) == plain


def test_ngram_lookup_prefers_the_longest_latest_match():
    drafter = NGramDrafter(tokens=3, max_ngram=2)
    assert drafter.lookup([1, 2, 3, 9, 1, 2, 4, 8, 1, 2], 3) == [4, 8, 1]  # latest "1 2" wins
    assert drafter.lookup([7, 2, 5, 1, 2], 3) == [5, 1, 2]  # "1 2" unseen before: falls back to "2"
    assert drafter.lookup([1, 2, 3], 3) == []
    assert drafter.lookup([7, 7, 7, 7, 7, 7], 3) == [7, 7, 7]  # an earlier "7 7" that has 3 tokens after it
    assert drafter.lookup([1, 2, 5, 1, 2, 6, 1, 2], 3) == [6, 1, 2]
    assert drafter.lookup([4, 1, 2, 1, 2], 3) == [1, 2]  # no occurrence has 3 tokens after it: the most


def test_parse_speculative_and_errors():
    d = parse_speculative("ngram:tokens=8,max_ngram=2")
    assert isinstance(d, NGramDrafter) and d.tokens == 8 and d.max_ngram == 2
    e = parse_speculative("early-exit:layers=2")
    assert isinstance(e, EarlyExitDrafter) and e.layers == 2
    for bad, words in (("medusa", "unknown drafter"), ("ngram:k=3", "not one of"), ("ngram:tokens=x", "integer"),
                       ("early-exit", "layers=N"), ("ngram:tokens=0", "at least 1")):
        with pytest.raises(ValueError, match=words):
            parse_speculative(bad)
    lm = tiny_lm()
    ids, mask = left_padded(PROMPTS[:1])
    with pytest.raises(ValueError, match="greedy"):
        lm.generate(ids, mask, temperature=0.7, speculative=NGramDrafter())
    with pytest.raises(ValueError, match="fewer than"):
        lm.generate(ids, mask, speculative=EarlyExitDrafter(layers=3))

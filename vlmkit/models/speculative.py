"""Speculative greedy decoding: a cheap drafter proposes the next tokens and one forward of the model checks
them all; the drafts up to the first one the model disagrees with are kept, plus the model's own next token.

Decoding one token reads every weight once, so a forward over a few positions costs little more than
over one: each round yields between 1 and `tokens` + 1 tokens for about one step's time. The kept
tokens are the ones plain greedy decoding picks: a draft is kept only when it is the model's argmax
given everything before it. (The checking forward computes several positions in one matmul, so its
logits may differ from single-step decoding in the last bits; only an exact tie between the top two
logits can then pick differently, as batching already can.)

Drafters (`LanguageModel.generate(..., speculative=drafter)`, or `--speculative SPEC` on the commands):

- `NGramDrafter` (`ngram`; prompt lookup decoding, Saxena 2023): finds an earlier occurrence of the
  sequence's last n tokens (n from `max_ngram` down to `min_ngram`) in the prompt and the answer so
  far, the latest one followed by `tokens` tokens, and proposes the tokens that followed it. No second
  model; it pays off when the answer repeats its prompt or itself (extraction, rewriting, lists), and
  costs a wasted check otherwise.
- `EarlyExitDrafter` (`early-exit`; self-speculative, as in LayerSkip / Draft & Verify): the model's
  own first `layers` layers, its final norm and head. The drafts fill those layers' KV cache, which
  the checking forward then overwrites with the same values. Acceptance depends on how well the
  early layers predict the last ones; models not trained for early exit agree rarely.

Batches: every row keeps the same number of tokens per round (the fewest any unfinished row had
accepted), so one cache length serves all rows; rows that had accepted more propose them again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkit.models.kernels import compute_dtype
from vlmkit.models.language import KVCache, LanguageModel, LayerContext, cut_at


@dataclass
class SpeculativeStats:
    """Counts over the checking rounds of every `generate` call since `reset`."""

    rounds: int = 0  # checking forwards
    row_rounds: int = 0  # rounds x unfinished rows in them
    proposed: int = 0  # draft tokens proposed to unfinished rows
    accepted: int = 0  # of those, kept

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens a row gains per checking forward: its kept drafts + the model's own token."""
        return 1 + self.accepted / self.row_rounds if self.row_rounds else 0.0

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "proposed": self.proposed, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "tokens_per_round": self.tokens_per_round}


class Drafter:
    """Proposes up to `tokens` next tokens per round; `generate` is the draft-and-check loop."""

    name = "drafter"

    def __init__(self, tokens: int):
        if tokens < 1:
            raise ValueError(f"a drafter proposes at least 1 token per round, got tokens={tokens}")
        self.tokens = tokens
        self.stats = SpeculativeStats()

    def reset(self) -> None:
        self.stats = SpeculativeStats()

    def propose(self, lm: LanguageModel, cache: KVCache, mask: torch.Tensor, last: torch.Tensor,
                history: list[list[int]], limit: int) -> torch.Tensor:
        """Drafts [B, d] (0 <= d <= `limit`) to follow `last` [B], the newest token (not yet in `cache`).
        `history[b]` is row b's prompt and answer so far, `last` included; `mask` covers the cache."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, lm: LanguageModel, embeds: torch.Tensor, mask: torch.Tensor, prompt_ids: torch.Tensor | None,
                 max_new_tokens: int, eos_token_id: int | None = None,
                 context: LayerContext | None = None) -> list[list[int]]:
        """Greedy decoding of left-padded prompts (`embeds` [B, L, D], `mask` [B, L]) as `LanguageModel.generate`
        does it, with drafts checked `tokens` at a time. `prompt_ids` [B, L] (or None) feed `history`."""
        b, prompt_len, _ = embeds.shape
        if max_new_tokens <= 0:
            return [[] for _ in range(b)]
        cache = lm.new_cache(b, prompt_len + max_new_tokens + self.tokens, dtype=compute_dtype(embeds))
        hidden = lm(inputs_embeds=embeds, attention_mask=mask, cache=cache, context=context,
                    logits=False).hidden_states[:, -1]
        last = lm.lm_head(hidden).float().argmax(-1)
        history = [[] for _ in range(b)] if prompt_ids is None else \
            [row[m.bool()].tolist() for row, m in zip(prompt_ids, mask)]
        for row, token in zip(history, last.tolist()):
            row.append(token)
        out = last[:, None]
        done = last == eos_token_id if eos_token_id is not None else torch.zeros_like(last, dtype=torch.bool)
        while out.shape[1] < max_new_tokens and not bool(done.all()):
            # The round's own token (the model's) is the last one allowed: drafts stop one short of the limit.
            drafts = self.propose(lm, cache, mask, last, history, max_new_tokens - out.shape[1] - 1)
            d = drafts.shape[1]
            feed = torch.cat([last[:, None], drafts], dim=1)
            mask = torch.cat([mask, mask.new_ones(b, d + 1)], dim=1)
            hidden = lm(inputs_embeds=lm.embed_tokens(feed), attention_mask=mask, cache=cache,
                        logits=False).hidden_states
            picks = lm.lm_head(hidden).float().argmax(-1)  # [B, d + 1]: the model's token after each fed one
            agreed = (drafts == picks[:, :d]).long().cumprod(dim=1).sum(dim=1)  # leading drafts it agrees with
            live = ~done
            kept = int(agreed[live].min())
            new = torch.cat([drafts[:, :kept], picks[:, kept : kept + 1]], dim=1)
            cache.rewind(cache.length - (d - kept))  # keep `last` and the kept drafts
            mask = mask[:, : cache.length]
            out = torch.cat([out, new], dim=1)
            last = new[:, -1]
            for row, tokens in zip(history, new.tolist()):
                row.extend(tokens)
            rows = int(live.sum())
            self.stats.rounds += 1
            self.stats.row_rounds += rows
            self.stats.proposed += d * rows
            self.stats.accepted += kept * rows
            if eos_token_id is not None:
                done |= (new == eos_token_id).any(dim=1)
        return [cut_at(row[:max_new_tokens], eos_token_id) for row in out.tolist()]


def _pad_rows(rows: list[list[int]], fill: list[int], device) -> torch.Tensor:
    """Rows of different lengths as [B, max]; short rows are filled with their `fill` token (a guess the
    check simply rejects when wrong)."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [f] * (width - len(r)) for r, f in zip(rows, fill)], dtype=torch.long,
                        device=device).reshape(len(rows), width)


class NGramDrafter(Drafter):
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the last n tokens."""

    name = "ngram"

    def __init__(self, tokens: int = 3, max_ngram: int = 3, min_ngram: int = 1):
        super().__init__(tokens)
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def lookup(self, sequence: list[int], limit: int) -> list[int]:
        """What followed an earlier occurrence of the longest matching suffix: the latest occurrence followed
        by `limit` tokens, else the one followed by the most (near the end, fewer tokens follow)."""
        for n in range(min(self.max_ngram, len(sequence) - 1), self.min_ngram - 1, -1):
            suffix, best = sequence[-n:], []
            for start in range(len(sequence) - n - 1, -1, -1):  # latest first; not the suffix itself
                if sequence[start : start + n] == suffix:
                    follow = sequence[start + n : start + n + limit]
                    if len(follow) == limit:
                        return follow
                    best = max(best, follow, key=len)
            if best:
                return best
        return []

    def propose(self, lm, cache, mask, last, history, limit):
        limit = min(self.tokens, limit)
        rows = [self.lookup(seq, limit) if limit > 0 else [] for seq in history]
        return _pad_rows(rows, last.tolist(), last.device)


class EarlyExitDrafter(Drafter):
    """Self-speculative: the model's first `layers` layers + its final norm and head draft the tokens."""

    name = "early-exit"

    def __init__(self, layers: int, tokens: int = 3):
        super().__init__(tokens)
        if layers < 1:
            raise ValueError(f"early-exit drafting needs layers >= 1, got {layers}")
        self.layers = layers

    def propose(self, lm, cache, mask, last, history, limit):
        if self.layers >= lm.config.num_layers:
            raise ValueError(f"early-exit layers={self.layers} must be fewer than the model's "
                             f"{lm.config.num_layers} layers")
        start, token, drafts = cache.length, last, []
        for _ in range(min(self.tokens, limit)):
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
            hidden = lm(inputs_embeds=lm.embed_tokens(token[:, None]), attention_mask=mask, cache=cache,
                        logits=False, num_layers=self.layers).hidden_states[:, -1]
            token = lm.lm_head(hidden).float().argmax(-1)
            drafts.append(token)
        cache.rewind(start)  # the checking forward writes these positions again, in every layer
        return torch.stack(drafts, dim=1) if drafts else last.new_zeros(len(last), 0)


DRAFTERS = {"ngram": NGramDrafter, "early-exit": EarlyExitDrafter}
_OPTIONS = {"ngram": {"tokens", "max_ngram", "min_ngram"}, "early-exit": {"layers", "tokens"}}


def parse_speculative(spec: str) -> Drafter:
    """A drafter from `NAME[:key=value,...]`: `ngram`, `ngram:tokens=8,max_ngram=2`, `early-exit:layers=8`,
    `early-exit:layers=8,tokens=4` (see the module docstring)."""
    name, _, rest = spec.partition(":")
    if name not in DRAFTERS:
        raise ValueError(f"--speculative {spec!r}: unknown drafter {name!r}; expected one of {sorted(DRAFTERS)} "
                         "(e.g. ngram, ngram:tokens=8, early-exit:layers=8)")
    options: dict[str, int] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in _OPTIONS[name]:
            raise ValueError(f"--speculative {spec!r}: {item!r} is not one of {name}'s options "
                             f"{sorted(_OPTIONS[name])} (key=value)")
        try:
            options[key] = int(value)
        except ValueError:
            raise ValueError(f"--speculative {spec!r}: {key} must be an integer, got {value!r}") from None
    if name == "early-exit" and "layers" not in options:
        raise ValueError(f"--speculative {spec!r}: early-exit needs layers=N (how many layers draft)")
    return DRAFTERS[name](**options)

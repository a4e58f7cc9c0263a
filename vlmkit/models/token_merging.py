"""Token merging (ToMe; Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023).

In each transformer block, between the attention and the MLP, `r` tokens are merged away by
*bipartite soft matching*: the tokens are split alternately into a set A (even positions) and B (odd
positions); each A token is matched to its most similar B token by the cosine similarity of their
attention keys (averaged over the heads: the keys already summarise what a token holds, and cost
nothing extra); the r best-matched A tokens are averaged into their B partners, weighted by how many
patches each token already stands for (its *size*), and dropped. Sizes add up, so the total size is
always the number of input tokens, and attention is made *proportional*: log(size) is added to the
logits of every key, so a token that stands for s patches gets the attention s copies would get.

Prefix tokens (CLS) are never merged: they take no part in the matching and stay first. The token count is
deterministic: a block with t tokens (p of them prefix) removes min(r, (t - p) // 2), as in ToMe;
`merged_token_count` predicts it. With r = 0 nothing is merged and the tower is the plain ViT.

The merged sequence has no patch grid any more (tokens stand for irregular groups of patches, in no
raster order): connectors that read the grid refuse it (see `VisionLanguageModel`).
"""

from __future__ import annotations

import torch


def merged_token_count(num_tokens: int, r: int, num_blocks: int, num_prefix: int = 0) -> int:
    """Tokens left after `num_blocks` blocks that each merge `r` (clipped as `bipartite_merge` clips)."""
    for _ in range(num_blocks):
        num_tokens -= min(r, (num_tokens - num_prefix) // 2)
    return num_tokens


def bipartite_merge(x: torch.Tensor, sizes: torch.Tensor, metric: torch.Tensor, r: int,
                    num_prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge `r` tokens of `x` [B, T, D] by bipartite soft matching on `metric` [B, T, C].

    `sizes` [B, T] are the patches each token stands for. The first `num_prefix` tokens are left out
    of the matching and stay first. Returns the merged tokens [B, T - r', D] (the prefix, then the
    unmerged A tokens in their original order, then the B tokens, each a size-weighted average) and
    their sizes [B, T - r'], with r' = min(r, (T - num_prefix) // 2).
    """
    r = min(r, (x.shape[1] - num_prefix) // 2)
    if r <= 0:
        return x, sizes
    with torch.no_grad():  # the matching is a discrete choice; gradients flow through the averages
        metric = metric[:, num_prefix:]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # [B, |A|, |B|] cosine similarities
        best, partner = scores.max(dim=-1)  # each A token's most similar B token
        order = best.argsort(dim=-1, descending=True)
        merged, kept = order[:, :r], order[:, r:].sort(dim=-1).values  # kept A tokens in their original order
        into = partner.gather(1, merged)
    # Merge size-weighted sums and the sizes in one pass (the size rides along as a last channel).
    total = torch.cat([x * sizes[..., None], sizes[..., None]], dim=-1)
    prefix, patches = total[:, :num_prefix], total[:, num_prefix:]
    src, dst = patches[:, ::2], patches[:, 1::2]
    width = total.shape[-1]
    moved = src.gather(1, merged[..., None].expand(-1, -1, width))
    dst = dst.scatter_add(1, into[..., None].expand(-1, -1, width), moved)
    out = torch.cat([prefix, src.gather(1, kept[..., None].expand(-1, -1, width)), dst], dim=1)
    new_sizes = out[..., -1]
    return (out[..., :-1] / new_sizes[..., None]).to(x.dtype), new_sizes

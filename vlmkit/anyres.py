"""AnyRes (LLaVA-NeXT) geometry: which grid of tiles an image is cut into, where the padding lies, and
how many tokens the image becomes. Pure integer arithmetic, shared by the data layer (which cuts the
tiles) and the model (which packs their tokens), so both agree on every count.

Sizes are ``(height, width)`` in pixels throughout. An image of original size ``(H, W)`` is

1. given the candidate resolution (`select_best_resolution` over ``grid_pinpoints``, each a multiple
   of the tile side ``base``) that keeps the most of its pixels, then wastes the least area;
2. resized to fit that resolution keeping its aspect ratio (`fit_within`), centred on a black canvas
   of that resolution (`paste_offset`) and cut into ``base x base`` tiles, row by row (`tile_grid`);
3. preceded by a thumbnail: the whole image squashed to ``base x base``.

Each tile becomes a ``th x tw`` grid of tokens; the tiles' grids are joined into one large grid, the
rows or columns that show only padding are dropped (`unpadded_region`), and each remaining row ends
with a newline token. So an image costs ``th * tw`` (thumbnail) ``+ rows * (cols + 1)`` tokens
(`anyres_token_count`). Every rounding follows transformers' LLaVA-NeXT (`select_best_resolution`,
`get_patch_output_size`, `unpad_image`), so the counts equal its processor's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Size = tuple[int, int]


def _check_size(size: Sequence[int], what: str = "image size") -> Size:
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise ValueError(f"{what} must be positive (height, width), got {tuple(size)}")
    return h, w


def select_best_resolution(size: Sequence[int], candidates: Sequence[Sequence[int]]) -> Size:
    """The candidate ``(height, width)`` that shows the most of the image's pixels once the image is
    scaled to fit it (never counting more than the original has), ties broken by the least wasted area."""
    height, width = _check_size(size)
    best, best_effective, best_waste = None, 0, math.inf
    for cand_h, cand_w in candidates:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = cand_h * cand_w - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (int(cand_h), int(cand_w)), effective, waste
    if best is None:
        raise ValueError(f"no candidate resolution for an image of {height}x{width}: {list(candidates)}")
    return best


def fit_within(size: Sequence[int], target: Sequence[int]) -> Size:
    """The size the image is resized to inside `target`, keeping its aspect ratio (one side fills)."""
    height, width = _check_size(size)
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def paste_offset(resized: Sequence[int], target: Sequence[int]) -> Size:
    """(top, left) of the resized image on the `target` canvas: centred, odd pixels go to the bottom/right."""
    return (target[0] - resized[0]) // 2, (target[1] - resized[1]) // 2


def tile_grid(size: Sequence[int], grid_pinpoints: Sequence[Sequence[int]], base: int) -> Size:
    """(rows, cols) of ``base``-pixel tiles an image of `size` is cut into."""
    h, w = select_best_resolution(size, grid_pinpoints)
    return h // base, w // base


def num_tiles(size: Sequence[int], grid_pinpoints: Sequence[Sequence[int]], base: int) -> int:
    """Tiles the tower sees for one image: the grid's, plus the thumbnail."""
    rows, cols = tile_grid(size, grid_pinpoints, base)
    return rows * cols + 1


def unpadded_region(size: Sequence[int], grid: Sequence[int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): the part of a `grid` (rows, cols) of tokens covering the padded canvas
    that shows the image of original `size`; the rows (or columns) outside it show only padding."""
    height, width = _check_size(size)
    rows, cols = grid
    if width / height > cols / rows:  # wider than the canvas: padding above and below
        kept = int(round(height * (cols / width), 7))
        pad = (rows - kept) // 2
        return pad, rows - pad, 0, cols
    kept = int(round(width * (rows / height), 7))
    pad = (cols - kept) // 2
    return 0, rows, pad, cols - pad


def anyres_token_count(size: Sequence[int], grid_pinpoints: Sequence[Sequence[int]], base: int,
                       tile_tokens: Sequence[int]) -> int:
    """Tokens of an image of original `size`: the thumbnail's ``th * tw`` plus, for the tiles' joined
    token grid after unpadding, ``rows * (cols + 1)`` (a newline ends each row). `tile_tokens` is the
    (th, tw) token grid one tile becomes."""
    th, tw = tile_tokens
    rows, cols = tile_grid(size, grid_pinpoints, base)
    top, bottom, left, right = unpadded_region(size, (rows * th, cols * tw))
    return th * tw + (bottom - top) * (right - left + 1)


def check_grid_pinpoints(grid_pinpoints: Sequence[Sequence[int]], base: int, where: str = "anyres") -> list[Size]:
    """The pinpoints as (height, width) int pairs, each a positive multiple of `base`; ValueError otherwise."""
    if base < 1:
        raise ValueError(f"{where}.base must be >= 1, got {base}")
    if not grid_pinpoints:
        raise ValueError(f"{where}.grid_pinpoints is empty: give at least one [height, width], e.g. [[{2 * base}, "
                         f"{2 * base}]]")
    out = []
    for point in grid_pinpoints:
        if isinstance(point, (str, bytes)) or len(point) != 2:
            raise ValueError(f"{where}.grid_pinpoints: each entry is [height, width] in pixels, got {point!r}")
        h, w = point
        if any(isinstance(v, bool) or not isinstance(v, int) or v < base or v % base for v in (h, w)):
            raise ValueError(f"{where}.grid_pinpoints: {[h, w]} must be positive multiples of the tile size "
                             f"base={base}")
        out.append((h, w))
    return out

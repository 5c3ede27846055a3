"""Exact-count mask selection.

Every mask in the library is a ``torch.bool`` tensor chosen by one rule: keep exactly ``k`` entries
with the largest score. Ties are broken deterministically by flat index (the lower index wins), so
two processes holding identical scores always hold identical masks. We never use quantile
thresholds: they break the count whenever scores tie and fail on tensors above ~16M elements.

Selection cost matters because Top-KAST may refresh its masks every step. A full ``torch.topk``
over millions of entries sorts far more than needed; instead we find the k-th largest value with a
selection algorithm (``numpy.partition`` on CPU, ``torch.kthvalue`` elsewhere), take every entry
strictly above it, and fill the remaining slots from the entries equal to it in index order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def count_for_density(numel: int, density: float) -> int:
    """Number of entries a tensor of ``numel`` elements keeps at ``density`` (at least one)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return max(1, min(numel, round(density * numel)))


def _topk_flat_numpy(values: np.ndarray, k: int) -> np.ndarray:
    """CPU path: introselect for the threshold, then numpy compares (no sort, no bool sum)."""
    n = values.size
    kth = np.partition(values, n - k)[n - k]
    mask = values > kth
    need = k - int(np.count_nonzero(mask))
    if need > 0:
        ties = np.flatnonzero(values == kth)[:need]
        mask[ties] = True
        need -= ties.size
    if need != 0:
        raise ValueError("scores contain NaN; cannot select a mask")
    return mask


def _topk_flat_torch(flat: Tensor, k: int) -> Tensor:
    """Device path: ``torch.kthvalue`` for the threshold, same tie rule as the CPU path."""
    n = flat.numel()
    kth = torch.kthvalue(flat, n - k + 1).values
    mask = flat > kth
    # count_nonzero, not bool .sum(): the latter is ~80x slower on CPU.
    need = k - int(torch.count_nonzero(mask))
    if need > 0:
        ties = torch.nonzero(flat == kth).squeeze(1)[:need]
        mask[ties] = True
        need -= ties.numel()
    if need != 0:
        # NaN compares false with everything, so entries go missing only when NaNs are present.
        raise ValueError("scores contain NaN; cannot select a mask")
    return mask


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest entries of ``scores`` (same shape).

    Ties at the threshold are broken by flat index: the lowest indices are kept. The result has
    exactly ``k`` true entries.

    Args:
        scores: Any-shaped floating tensor (e.g. ``weight.abs()``). Must not contain NaN.
        k: Number of entries to keep, ``0 <= k <= scores.numel()``.

    Raises:
        ValueError: If ``k`` is out of range or the scores contain NaN.
    """
    n = scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    flat = scores.detach().reshape(-1)
    if k in (0, n):
        if torch.isnan(flat).any():
            raise ValueError("scores contain NaN; cannot select a mask")
        return torch.full_like(scores, k == n, dtype=torch.bool)
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        mask = torch.from_numpy(_topk_flat_numpy(flat.numpy(), k))
    else:
        mask = _topk_flat_torch(flat.float(), k)
    return mask.view(scores.shape)


def random_mask(shape: torch.Size | Sequence[int], k: int, generator: torch.Generator) -> Tensor:
    """A mask with exactly ``k`` true entries at positions drawn uniformly by ``generator``."""
    scores = torch.rand(tuple(shape), generator=generator, device=generator.device)
    return topk_mask(scores, k)


def scores_extending(base: Tensor, generator: torch.Generator) -> Tensor:
    """Scores whose top-k (k >= ``base.sum()``) is ``base`` plus entries drawn at random.

    Random scores lie in [0, 1) (drawn on the generator's device, so a seed gives the same
    draw everywhere); 2.0 puts every entry of ``base`` ahead of all others.
    """
    scores = torch.rand(base.shape, generator=generator, device=generator.device)
    return torch.where(base, 2.0, scores.to(base.device))


def extend_mask_randomly(base: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``base`` plus ``k - base.sum()`` further entries drawn uniformly from outside ``base``."""
    return topk_mask(scores_extending(base, generator), k)


def sample_outside(taken: Tensor, size: int, k: int, generator: torch.Generator) -> Tensor:
    """``k`` distinct indices drawn uniformly from ``[0, size)`` minus ``taken``, sorted.

    Works in index space with O(k + len(taken)) memory, never a mask or a score tensor of
    ``size`` entries, so a sparse layer can regrow without a dense intermediate. With
    m = size - len(taken) free indices:

    - ranks: k distinct ranks in [0, m). If 4k >= m, the first k of a random permutation of the
      m ranks (O(m) <= O(4k) memory); otherwise uniform draws with replacement, keeping the
      first k distinct values in draw order (a uniformly random k-subset), drawn in rounds of
      ``need + need // 4 + 16`` until k are distinct (about k^2 / 2m repeats are expected);
    - rank -> index: with ``taken`` sorted, g_i = taken_i - i counts the free indices before
      taken_i (non-decreasing), and the r-th free index is r + #{i : g_i <= r}.

    The draws depend only on (size, len(taken), k) and the generator, so two processes holding
    the same ``taken`` draw the same indices.

    Args:
        taken: Sorted, distinct int64 indices in ``[0, size)`` that must not be drawn.
        size: Size of the index space.
        k: Number of indices to draw, ``0 <= k <= size - len(taken)``.
        generator: Source of randomness (consumed on its own device, results on the CPU).
    """
    free = size - taken.numel()
    if not 0 <= k <= free:
        raise ValueError(f"cannot draw {k} of the {free} indices outside the taken ones")
    device = generator.device
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    if 4 * k >= free:
        ranks = torch.randperm(free, generator=generator, device=device)[:k].cpu()
    else:
        drawn = torch.empty(0, dtype=torch.long)
        while True:
            distinct = torch.unique(drawn).numel()
            if distinct >= k:
                break
            need = k - distinct
            more = torch.randint(free, (need + need // 4 + 16,), generator=generator, device=device)
            drawn = torch.cat([drawn, more.cpu()])
        values, inverse = torch.unique(drawn, return_inverse=True)
        order = torch.arange(drawn.numel())
        first = torch.full((values.numel(),), drawn.numel()).scatter_reduce_(
            0, inverse, order, "amin"
        )
        ranks = values[torch.argsort(first)[:k]]
    ranks, _ = torch.sort(ranks)
    gaps = taken.cpu() - torch.arange(taken.numel())
    return ranks + torch.searchsorted(gaps, ranks, right=True)


def global_topk_masks(scores: Sequence[Tensor], k: int) -> list[Tensor]:
    """Top-``k`` over the concatenation of several tensors, returned as one mask per tensor.

    Ties break by position in the concatenation (earlier tensors, then lower indices, win).
    """
    flat = torch.cat([s.detach().reshape(-1) for s in scores])
    mask = topk_mask(flat, k)
    sizes = [s.numel() for s in scores]
    return [m.view(s.shape) for m, s in zip(mask.split(sizes), scores, strict=True)]


BLOCK_NORMS = ("l1", "l2", "linf")


def matrix_view(tensor: Tensor) -> Tensor:
    """The 2-D (rows, everything else) view used for block structure: (out, in * kh * kw)."""
    return tensor.reshape(tensor.shape[0], -1) if tensor.dim() != 2 else tensor


def check_block_shape(shape: Sequence[int], block: int, name: str) -> None:
    """Raise ``ValueError`` unless a tensor of ``shape`` tiles exactly into ``block`` squares."""
    if block == 1:
        return
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    if len(shape) < 2 or rows % block or cols % block:
        raise ValueError(
            f"{name} has shape {tuple(shape)} (as a matrix {rows} x {cols}), which does not tile "
            f"into {block}x{block} blocks; choose another block_size or keep it dense with "
            "layout.dense_patterns"
        )


def block_norms(values: Tensor, block: int, norm: str) -> Tensor:
    """Importance of each ``block`` x ``block`` tile of ``values`` (dynsparse-bert.md eq. 1).

    ``L^p(B) = (sum_ij |B_ij|^p)^(1/p)`` for p = 1 (``"l1"``), 2 (``"l2"``), inf (``"linf"``,
    the largest magnitude). With ``block == 1`` every norm is ``|values|`` (same shape).

    The sums run in one fixed order of elementwise additions (pairwise, over the columns of a
    tile, then over its rows), never through a reduction kernel whose order depends on the
    memory layout: a tile scored on the whole grid, alone, or among gathered tiles
    (:func:`tile_norms`) gets the same bits, so a selection over the grid and one over a few
    units rank them identically.

    Returns:
        A (rows / block, cols / block) tensor for the matrix view of ``values``.
    """
    if norm not in BLOCK_NORMS:
        raise ValueError(f"block norm must be one of {list(BLOCK_NORMS)}, got {norm!r}")
    magnitude = values.detach().abs()
    if block == 1:
        return magnitude
    matrix = matrix_view(magnitude)
    rows, cols = matrix.shape
    tiles = matrix.reshape(rows // block, block, cols // block, block)
    if norm == "linf":
        return tiles.amax(dim=(1, 3))  # a maximum does not depend on the order
    if norm == "l2":
        tiles = tiles.square()
    sums = _pairwise_sum(_pairwise_sum(tiles, 3), 1)
    return sums.sqrt() if norm == "l2" else sums


def _pairwise_sum(x: Tensor, dim: int) -> Tensor:
    """Sum over ``dim`` (removed) by halving: elementwise adds in an order fixed by the size."""
    size = x.shape[dim]
    while size > 1:
        half = size // 2
        summed = x.narrow(dim, 0, half) + x.narrow(dim, half, half)
        if size % 2:
            summed = torch.cat([summed, x.narrow(dim, 2 * half, 1)], dim)
        x, size = summed, summed.shape[dim]
    return x.squeeze(dim)


def expand_blocks(block_mask: Tensor, block: int, shape: Sequence[int]) -> Tensor:
    """Element mask of ``shape`` in which each true block of ``block_mask`` is a true tile."""
    if block == 1:
        return block_mask.reshape(tuple(shape))
    full = block_mask.repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)
    return full.reshape(tuple(shape))


def collapse_blocks(mask: Tensor, block: int) -> Tensor:
    """Block mask of a block-aligned element mask (a tile is true if any entry is)."""
    if block == 1:
        return mask
    matrix = matrix_view(mask)
    rows, cols = matrix.shape
    return matrix.reshape(rows // block, block, cols // block, block).any(dim=3).any(dim=1)


def unit_tiles(tensor: Tensor, block: int) -> Tensor:
    """A (rows / b, b, cols / b, b) *view* of the matrix view of ``tensor``.

    ``unit_tiles(t, b)[r, :, c, :]`` is unit u = r * (cols / b) + c of the block grid, so
    gathering or writing units by index needs no dense temporary (writes go to ``tensor``).
    """
    rows = tensor.shape[0]
    cols = tensor.numel() // max(rows, 1)
    return tensor.view(rows // block, block, cols // block, block)


def gather_units(tensor: Tensor, units: Tensor, block: int) -> Tensor:
    """The (n, b, b) tiles of ``tensor`` at the flat block-grid indices ``units``."""
    if block == 1:  # the grid is the tensor: one flat gather
        index = units.to(device=tensor.device, dtype=torch.long)
        return tensor.view(-1).index_select(0, index).view(-1, 1, 1)
    tiles = unit_tiles(tensor, block)
    grid_cols = tiles.shape[2]
    return tiles[torch.div(units, grid_cols, rounding_mode="floor"), :, units % grid_cols, :]


def write_units(tensor: Tensor, units: Tensor, block: int, values: Tensor | float) -> None:
    """``tensor``'s tiles at ``units`` = ``values`` ((n, b, b) or a scalar), in place."""
    if block == 1:
        flat, index = tensor.view(-1), units.to(device=tensor.device, dtype=torch.long)
        if isinstance(values, Tensor):
            flat.index_copy_(0, index, values.reshape(-1).to(flat))
        else:
            flat.index_fill_(0, index, values)
        return
    tiles = unit_tiles(tensor, block)
    grid_cols = tiles.shape[2]
    rows, cols = torch.div(units, grid_cols, rounding_mode="floor"), units % grid_cols
    tiles[rows, :, cols, :] = values


def tile_norms(tiles: Tensor, norm: str) -> Tensor:
    """Block importance (:func:`block_norms`) of each of n stacked (b, b) tiles: shape (n,).

    Both backends score stored units with this one function on the same (n, b, b) layout, so
    their scores agree bit for bit whenever the weights do.
    """
    n, block = tiles.shape[0], tiles.shape[-1]
    return block_norms(tiles.reshape(n * block, block), block, norm).reshape(n)

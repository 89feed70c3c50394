"""Position bookkeeping computed from ``image_grid_thw`` and ``input_ids`` (no weights).

Vision side (patches in the HF processor order: each frame's patches ordered by 2x2 merge block, i.e. block row,
block column, row inside the block, column inside the block):
    vision_cu_seqlens        one attention sequence per frame
    vision_patch_coords      (row, col) of every patch, for the 2D RoPE
    vision_position_taps     bilinear (align_corners=True) taps into the square learned position table

Text side: ``mrope_position_ids`` -- Qwen3-VL's 3D (t, h, w) MRoPE positions of a packed batch, the rule of HF's
``Qwen3VLModel.get_rope_index`` applied to every sample separately (positions restart at 0 in each sample).

These run on the host (grids are a handful of ints); the results are moved to the requested device once.
"""

from __future__ import annotations

import torch


def _grid_list(grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
    return [tuple(row) for row in grid_thw.tolist()]


def vision_cu_seqlens(grid_thw: torch.Tensor, device) -> tuple[torch.Tensor, int]:
    """(int32 [F + 1] offsets, one sequence of h*w patches per frame; longest sequence as a host int)."""
    lengths = [h * w for t, h, w in _grid_list(grid_thw) for _ in range(t)]
    offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    return offsets.to(device), max(lengths, default=0)


def _block_order(t: int, h: int, w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of the t*h*w patches of one image in merge-block order (frames repeat the same grid)."""
    rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
    cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
    # Block order: (block row, block col, row in block, col in block).
    rows, cols = rows.permute(0, 2, 1, 3).reshape(-1), cols.permute(0, 2, 1, 3).reshape(-1)
    return rows.repeat(t), cols.repeat(t)


def vision_patch_coords(grid_thw: torch.Tensor, merge: int, device) -> torch.Tensor:
    """int64 [P, 2]: (row, col) of every patch in processor order."""
    coords = [torch.stack(_block_order(t, h, w, merge), dim=-1) for t, h, w in _grid_list(grid_thw)]
    return (torch.cat(coords) if coords else torch.zeros(0, 2, dtype=torch.int64)).to(device)


def _axis_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear interpolation with aligned corners from ``size`` target points onto a ``side``-entry axis:
    source coordinate s = index * (side - 1) / (size - 1); taps floor(s), floor(s) + 1 (clamped to the table)
    with weights 1 - frac, frac."""
    source = index.double() * (side - 1) / max(size - 1, 1)
    low = source.floor()
    frac = source - low
    low = low.long()
    taps = torch.stack([low, (low + 1).clamp(max=side - 1)], dim=-1)
    return taps, torch.stack([1 - frac, frac], dim=-1)


def vision_position_taps(grid_thw: torch.Tensor, merge: int, side: int, device,
                         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices int64 [P, 4], weights [P, 4]) into the flattened side x side position table: the learned table
    resized bilinearly (align_corners=True) to each image's (h, w) grid, as HF's vision model does."""
    indices, weights = [], []
    for t, h, w in _grid_list(grid_thw):
        rows, cols = _block_order(t, h, w, merge)
        row_taps, row_weights = _axis_taps(rows, h, side)
        col_taps, col_weights = _axis_taps(cols, w, side)
        indices.append((row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4))
        weights.append((row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4))
    if not indices:
        return torch.zeros(0, 4, dtype=torch.int64, device=device), torch.zeros(0, 4, dtype=dtype, device=device)
    return torch.cat(indices).to(device), torch.cat(weights).to(device=device, dtype=dtype)


def mrope_position_ids(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, image_grid_thw: torch.Tensor,
                       image_token_id: int, merge: int) -> torch.Tensor:
    """int64 [3, T] (t, h, w) positions of a packed batch, on ``input_ids``' device.

    Per sample, a cursor starts at 0. A text token gets (c, c, c) and advances it by 1. An image (its run of
    t*h*w/merge**2 ``image_token_id`` tokens, images taken in order) at cursor c gets (c + i_t, c + i_h, c + i_w)
    over its merged (t, h/merge, w/merge) grid in raster order and advances the cursor by max(h, w)/merge.
    """
    ids = input_ids.cpu()
    bounds = cu_seqlens.tolist()
    grids = _grid_list(image_grid_thw)
    sizes = [t * h * w // merge ** 2 for t, h, w in grids]
    image_at = torch.nonzero(ids == image_token_id).flatten().tolist()
    if len(image_at) != sum(sizes):
        raise ValueError(f"mrope_position_ids: input_ids hold {len(image_at)} image tokens but image_grid_thw "
                         f"{grids} needs {sum(sizes)} (t*h*w/{merge ** 2} per image)")
    starts, offset = [], 0
    for size in sizes:
        start = image_at[offset] if size else None
        if size and image_at[offset + size - 1] != start + size - 1:
            raise ValueError(f"mrope_position_ids: the {size} tokens of image {len(starts)} are not contiguous")
        starts.append(start)
        offset += size

    pieces = []
    image = 0
    for begin, end in zip(bounds[:-1], bounds[1:]):
        cursor, at = 0, begin
        while image < len(grids) and sizes[image] == 0:
            image += 1
        while image < len(grids) and starts[image] < end:
            if starts[image] + sizes[image] > end:
                raise ValueError(f"mrope_position_ids: image {image} crosses the sample boundary at token {end}")
            text = starts[image] - at
            pieces.append(torch.arange(cursor, cursor + text).expand(3, text))
            cursor += text
            t, h, w = grids[image]
            grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h // merge), torch.arange(w // merge),
                                              indexing="ij")).reshape(3, -1)
            pieces.append(grid + cursor)
            cursor += max(h, w) // merge
            at = starts[image] + sizes[image]
            image += 1
            while image < len(grids) and sizes[image] == 0:
                image += 1
        pieces.append(torch.arange(cursor, cursor + end - at).expand(3, end - at))
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.int64)
    return positions.to(input_ids.device)

"""Frame sets shared between stages: a `frames` blob (raw uint8 RGB) plus its `frames_shape` [n, h, w, 3].

The frames stage writes them once per clip; every stage that looks at pixels reads them with
`unpack_frames`. Not a stage itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from clipmill.stages.base import FrameSpec


def unpack_frames(blob: bytes, shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """The (n, h, w, 3) uint8 array stored in a `frames` blob with its `frames_shape`; a read-only view."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or shape[3] != 3:
        raise ValueError(f"frames_shape must be [n, h, w, 3], got {list(shape)}")
    arr = np.frombuffer(blob, dtype=np.uint8)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"frames blob has {arr.size} bytes, shape {list(shape)} needs {int(np.prod(shape))}")
    return arr.reshape(shape)


def pick_frames(n_have: int, n_want: int) -> list[int]:
    """Indices of `min(n_want, n_have)` frames out of `n_have`, evenly spread, first and last kept
    (one frame: the middle one)."""
    if n_have <= 0:
        return []
    if n_want >= n_have:
        return list(range(n_have))
    if n_want == 1:
        return [n_have // 2]
    return sorted({int(round(x)) for x in np.linspace(0, n_have - 1, n_want)})


def row_frames(row: dict[str, Any], spec: FrameSpec, stage: str, max_frames: int) -> list[np.ndarray]:
    """Up to `max_frames` evenly spread frames of frame set `spec` from a work row; ValueError (which
    becomes the row's error) when the frames stage did not provide them."""
    blob_col, shape_col = spec.columns
    blob, shape = row.get(blob_col), row.get(shape_col)
    if blob is None or shape is None:
        raise ValueError(f"row has no {blob_col} (run the frames stage with the {spec.name!r} frame set first; "
                         f"the recipe loader adds it when the recipe lists the {stage} stage)")
    frames = unpack_frames(blob, shape)
    if frames.shape[0] == 0:
        raise ValueError(f"{blob_col} holds no frames")
    return [frames[i] for i in pick_frames(frames.shape[0], max_frames)]

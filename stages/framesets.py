"""Frame sets shared between stages: a `frames` blob (raw uint8 RGB) plus its `frames_shape` [n, h, w, 3].

The frames stage writes them once per clip; every stage that looks at pixels reads them with
`unpack_frames`. Not a stage itself.
"""

from __future__ import annotations

import numpy as np


def unpack_frames(blob: bytes, shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """The (n, h, w, 3) uint8 array stored in a `frames` blob with its `frames_shape`; a read-only view."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or shape[3] != 3:
        raise ValueError(f"frames_shape must be [n, h, w, 3], got {list(shape)}")
    arr = np.frombuffer(blob, dtype=np.uint8)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"frames blob has {arr.size} bytes, shape {list(shape)} needs {int(np.prod(shape))}")
    return arr.reshape(shape)

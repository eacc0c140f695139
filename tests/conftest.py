"""Set before any test module imports triton: where torch sees no GPU, Triton's kernels run on CPU tensors through
its interpreter (TRITON_INTERPRET=1), which is how the GPU kernels are tested without one; on a GPU machine they run
compiled. A value already in the environment is kept."""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def write_colour_folder(root, train: int, val: int):
    """An image folder with train/ and val/, two classes: reddish and bluish 32 px noise images (seeded)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for label, channel in (("blue", 2), ("red", 0)):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 120, (32, 32, 3), dtype=np.uint8)
                pixels[..., channel] += 130
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root

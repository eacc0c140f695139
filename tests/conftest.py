"""Set before any test module imports triton: where torch sees no GPU, Triton's kernels run on CPU tensors through
its interpreter (TRITON_INTERPRET=1), which is how the GPU kernels are tested without one; on a GPU machine they run
compiled. A value already in the environment is kept."""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

"""Triton kernels for the backend interface of docs/CONTRACT.md, one op per file.

Each file holds its ``@triton.jit`` kernels first, then the launchers. The submodules
import ``triton``; ``entrodrop_fast.ops.triton_backend`` guards that import.
"""

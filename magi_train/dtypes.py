"""The parameter and storage dtypes configs name ("float32", "bfloat16"), one map for every package."""
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

__all__ = ["DTYPES", "DTYPE_NAMES"]

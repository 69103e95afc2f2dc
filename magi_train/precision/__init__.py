"""Precision: MAGI-1 fp8 checkpoint format, fp8 training (TE spec, torchao float8)."""

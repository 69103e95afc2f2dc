"""Inference uses the encoders training uses: one definition (magi_train.encoders)."""
from magi_train.encoders import *  # noqa: F401,F403
from magi_train.encoders import __all__  # noqa: F401

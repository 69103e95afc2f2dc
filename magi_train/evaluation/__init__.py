"""Evaluation of world models on held-out synthetic clips: image metrics and physics (trajectory) metrics."""
from .image_metrics import psnr_per_frame, ssim_per_frame
from .continuation import ContinuationScores, score_continuation

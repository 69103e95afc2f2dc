"""Evaluation of world models, pure metric code shared by the sweep entry point (magi_eval) and evaluation inside
training: image metrics, trajectory error on the synthetic world, Physics-IQ motion-mask metrics, FVD from local
I3D weights, and confidence intervals."""
from .image_metrics import psnr_per_frame, ssim_per_frame
from .continuation import ContinuationScores, copy_last_frame, score_continuation
from .physics_iq import PhysicsIQScores, physics_iq_scores
from .stats import mean_ci95

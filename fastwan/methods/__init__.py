"""Training methods (``dmd``: sparse distillation, ``flow``: flow-matching fine-tuning).

Loss math lives in :mod:`fastwan.methods.losses` as pure tensor functions.
"""

from fastwan.methods.losses import (
    cfg_combine,
    dmd_generator_loss,
    dmd_gradient,
    fastvideo_to_standard_guidance,
    flow_matching_loss,
    sample_dmd_timesteps,
    standard_to_fastvideo_guidance,
)

__all__ = [
    "cfg_combine",
    "dmd_generator_loss",
    "dmd_gradient",
    "fastvideo_to_standard_guidance",
    "flow_matching_loss",
    "sample_dmd_timesteps",
    "standard_to_fastvideo_guidance",
]

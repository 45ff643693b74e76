"""Training: typed configs and recipes (:mod:`.config`), LR / sparsity schedules
(:mod:`.schedules`), EMA (:mod:`.ema`) and atomic checkpoints (:mod:`.checkpoint_io`).

Only the config API is re-exported here, so reading a recipe does not import torch.
"""

from fastwan.train.config import (
    ConfigError,
    DataConfig,
    DMDConfig,
    ModelConfig,
    OptimConfig,
    OptimConfigs,
    ParallelConfig,
    Recipe,
    TrainConfig,
    VSAConfig,
    dump_recipe,
    load_recipe,
)

__all__ = [
    "ConfigError",
    "DMDConfig",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "OptimConfigs",
    "ParallelConfig",
    "Recipe",
    "TrainConfig",
    "VSAConfig",
    "dump_recipe",
    "load_recipe",
]

"""Training: typed configs and recipes (:mod:`.config`), LR / sparsity schedules
(:mod:`.schedules`), EMA (:mod:`.ema`), atomic checkpoints (:mod:`.checkpoint_io`), the
loop (:mod:`.trainer`, built by :mod:`.build`), validation videos (:mod:`.validation`),
metric sinks (:mod:`.tracking`) and loss plots (:mod:`.plots`).

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

"""Training: EMA (:mod:`.ema`), checkpoints (:mod:`.checkpoint`: DCP, resharded on load;
atomic, checksummed directories: :mod:`.checkpoint_io`), the loop
(:mod:`.trainer`, built by :mod:`.build`), validation videos (:mod:`.validation`), metric
sinks (:mod:`.tracking`) and loss plots (:mod:`.plots`). Recipes and their typed configs
are :mod:`fastwan.config`; LR and sparsity schedules :mod:`fastwan.methods.schedules`.
"""

"""Scale-out on PyTorch's own distributed stack, kept apart from the model code.

* :mod:`.mesh` -- the ``replicate x shard x sequence_parallel`` device mesh of a recipe,
  its validation (before any model is built) and the process group from torchrun;
* :mod:`.parallelize` -- FSDP2 ``fully_shard`` per Wan block and root (HSDP when
  ``replicate > 1``), mixed precision on GPU, gradient sync control, global clipping;
* :mod:`.sequence_parallel` -- Ulysses sequence parallelism for dense and VSA attention;
* :mod:`.activation_checkpoint` -- ``full`` / ``selective`` checkpointing per block.

The per-GPU memory estimate behind ``fastwan plan`` is a tool, not distributed code:
:mod:`fastwan.plan`.

Checkpoints (DCP, one path for one and many processes) are the trainer's:
:mod:`fastwan.train.checkpoint`. Nothing here imports :mod:`fastwan.methods` or
:mod:`fastwan.train` (``parallelize`` names ``Method`` for type checkers only).

Nothing is imported here: ``import fastwan.distributed.mesh`` (etc.) loads what it needs.
"""

"""Regional ``torch.compile`` of a Wan transformer.

Each transformer block is compiled in place by diffusers' own regional compile
(``ModelMixin.compile_repeated_blocks``, the blocks named by ``_repeated_blocks``; measured
the same as fastwan's former per-block loop, ``benchmarks/regional_compile.py``): the blocks
share one piece of code, so Dynamo traces it once and every block reuses the graph, which compiles
in a fraction of the time of the whole model, and the state dict keeps its keys (no
``_orig_mod.`` prefix), so a compiled model still saves and exports as usual. VSA's fine
stage is a custom op with a fake implementation, so it compiles without graph breaks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastwan.choices import COMPILE_BACKENDS


def parse_compile(value: bool | str | None) -> str | None:
    """``False``/``None`` -> None (eager); ``True`` -> ``"inductor"``; a backend name."""
    if value is None or value is False:
        return None
    if value is True:
        return "inductor"
    if isinstance(value, str) and value in COMPILE_BACKENDS:
        return value
    raise ValueError(
        f"compile must be True/False or one of {COMPILE_BACKENDS} (a torch.compile backend), "
        f"got {value!r}"
    )


def compile_blocks(
    transformer: torch.nn.Module,
    backend: str | Callable = "inductor",
    mode: str | None = None,
    fullgraph: bool = False,
) -> int:
    """Compile every block of ``transformer.blocks`` in place; returns how many.

    ``backend``: a ``torch.compile`` backend (name or callable). ``mode``: e.g.
    ``"max-autotune-no-cudagraphs"``, inductor only. ``fullgraph``: fail on a graph break
    instead of running that part eagerly. Shapes are static: a new resolution or frame
    count compiles once more, as does each new attention setting (``set_attention``); all
    blocks share each graph.
    """
    blocks = getattr(transformer, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise ValueError(
            f"compile needs a Wan transformer with a non-empty .blocks ModuleList, got "
            f"{type(transformer).__name__}"
        )
    if not getattr(transformer, "_repeated_blocks", None):
        raise ValueError(
            f"compile needs a diffusers model that names its repeated blocks "
            f"(_repeated_blocks), got {type(transformer).__name__}"
        )
    kwargs = {"mode": mode} if mode is not None else {}
    transformer.compile_repeated_blocks(
        backend=backend, dynamic=False, fullgraph=fullgraph, **kwargs
    )
    return len(blocks)

"""FastVideo's own VSA (``fastvideo-kernel`` on PyPI) as the peer of ``fastwan bench attention``.

Nothing of the peer lives in fastwan: it is used from an installed ``fastvideo-kernel`` or
from an unpacked source distribution given by path (``scripts/fetch_peer.sh`` fetches
0.3.5 with pip). This module only loads it and converts tensors to its layout.

The peer's layout (``fastvideo_kernel.vsa_utils``, 0.3.5): tokens in tile order, tiles of
4x4x4 in (t, h, w) order and raster order inside a tile, as fastwan's ``TilePlan``; each
tile padded with zeros to 64 slots (its kernels are hard-wired to 64-token blocks, and
its tile means divide a zero-padded sum by ``variable_block_sizes``, the valid tokens per
tile). ``video_sparse_attn(q, k, v, variable_block_sizes, q_variable_block_sizes, topk,
block_size=64, compress_attn_weight=gate)`` keeps ``topk`` key tiles per query tile by
bf16 coarse scores (ties to the lower index, as fastwan) and returns
``coarse * gate + fine``, fastwan's ``fine + gate * coarse``. Its Triton kernels cast
probabilities to bfloat16 in the kernel: bfloat16 is the only dtype it computes in.

Two ways to run it:

* the public ``fastvideo_kernel.video_sparse_attn`` of an installed package, on CUDA:
  ``FASTVIDEO_VSA_TRITON=1`` forces its Triton kernels, otherwise it takes its compiled
  ThunderKittens kernel on sm_90 when the package's extension imports;
* its Triton kernels composed as that function composes them (``PeerVSA.triton_vsa``):
  on a CPU under ``TRITON_INTERPRET=1``, where its public wrappers refuse CPU tensors
  (``torch.library`` ops registered for CUDA only, CUDA checks in its index helpers), and
  for a source tree. Kernel files are loaded by path, so the package's ``__init__`` (and
  its compiled extension, its other kernels' dependencies) is never needed there.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from fastwan.attention.tiling import get_tile_plan

PEER_RELEASE = "0.3.5"  # the release this adapter and its layout were checked against
BLOCK = 64  # the peer's tokens per tile (4 x 4 x 4); its kernels take no other
TILE = (4, 4, 4)
IMPLEMENTATIONS = ("triton", "cuda")
# Kernel files of the peer's Triton path, inside its package directory.
_FILES = {
    "attn": "triton_kernels/block_sparse_attn_triton.py",
    "compress": "triton_kernels/fused_compress_topk.py",
    "index": "triton_kernels/index.py",
    "utils": "vsa_utils.py",
}
FETCH_HINT = (
    "install fastvideo-kernel, or pass --peer-src DIR with its unpacked source distribution "
    "(bash scripts/fetch_peer.sh DIR fetches 0.3.5 with pip)"
)


def _package_dir(src: str | os.PathLike | None) -> tuple[Path, str]:
    """The peer's ``fastvideo_kernel`` directory and where it came from."""
    if src is None:
        spec = importlib.util.find_spec("fastvideo_kernel")  # no import: its __init__ not run
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"--peer fastvideo: fastvideo-kernel is not installed; {FETCH_HINT}")
        return Path(next(iter(spec.submodule_search_locations))), "installed"
    root = Path(src)
    for cand in (root / "python" / "fastvideo_kernel", root / "fastvideo_kernel", root):
        if (cand / _FILES["attn"]).is_file():
            return cand, "source"
    raise ValueError(
        f"--peer-src {src}: no python/fastvideo_kernel/{_FILES['attn']} under it; pass the "
        f"unpacked fastvideo-kernel source distribution ({FETCH_HINT})"
    )


def _load_file(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # triton.jit resolves a kernel's globals through its module
    spec.loader.exec_module(module)
    return module


FETCHED_TRITON = "triton-3.7.0"  # the folder scripts/fetch_peer.sh installs beside the source


def fetched_triton(src: str | os.PathLike) -> Path | None:
    """The Triton folder ``scripts/fetch_peer.sh`` put beside the source tree ``src`` (for
    PYTHONPATH), or None."""
    folder = Path(src).resolve().parent / FETCHED_TRITON
    return folder if (folder / "triton" / "__init__.py").is_file() else None


def triton_blocker(src: str | os.PathLike | None = None) -> str | None:
    """Why the peer's Triton forward cannot run with this Triton, or None. ``src``: the
    source tree, to name the Triton fetched beside it in the fix."""
    try:
        import triton
    except ImportError:
        return "Triton is not installed"
    major, minor = (int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
    if (major, minor) >= (3, 9):
        found = fetched_triton(src) if src is not None else None
        fix = (
            f"start with PYTHONPATH={found} (the Triton scripts/fetch_peer.sh fetched)"
            if found
            else "put a Triton 3.7 or 3.8 first on PYTHONPATH (scripts/fetch_peer.sh "
            f"installs 3.7.0 beside the source, in {FETCHED_TRITON}/)"
        )
        return (
            f"its forward kernel uses tl.make_block_ptr, which Triton 3.9 removed (this is "
            f"Triton {triton.__version__}); {fix}"
        )
    return None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def interpreter_fidelity() -> Iterator[None]:
    """Make the Triton interpreter compute what compiled Triton does, in three places the
    peer's kernels reach (CPU interpreter runs only; restored on exit):

    * ``tl.dot`` of bfloat16: the interpreter stores bfloat16 as raw uint16 bits and
      multiplies them as integers (every release up to 3.9). The peer computes only in
      bfloat16, so its kernels, and fastwan's in bfloat16, would give garbage. A bfloat16
      operand is widened to float32 (exact) before the product, which accumulates in the
      output's float32, as a GPU's bf16 MMA does.
    * float32 -> bfloat16 casts (``x.to(tl.bfloat16)``, stores): the interpreter truncates
      the mantissa, compiled Triton rounds to nearest even; truncation doubles the error
      of every bfloat16 rounding in a kernel (measured: outputs 2-3x less accurate).
    * the variable of a ``range`` / ``tl.range`` loop: a tensor in compiled Triton, a
      Python int in the interpreter, where the peer's backward
      (``(blk_idx % 2).to(tl.int32)``) fails. Kernels first run inside the context are
      rewritten with it wrapped as a tensor (``tl.static_range`` stays an int, as compiled).
    """
    import ast

    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original_dot = interpreter.InterpreterBuilder.create_dot
    original_cast = interpreter.InterpreterBuilder.cast_impl
    original_rewriter = interpreter.FunctionRewriter.ast_transformer

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        bits = h.data.astype(np.uint32) << 16  # bfloat16 = the high half of a float32
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args):
        return original_dot(self, widen(a), widen(b), d, *args)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = src.data.astype(np.float32).view(np.uint32)
            # round to nearest, ties to even: add 0x7fff plus the lowest kept bit
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(src.data)  # keep nan a (quiet) nan, not an inf
            return interpreter.TensorHandle(np.where(nan, np.uint16(0x7FC0), rounded), tl.bfloat16)
        return original_cast(self, src, dst_type)

    class TensorLoopVariables(type(original_rewriter)):
        def visit_For(self, node):
            self.generic_visit(node)
            it = node.iter
            name = getattr(it, "func", None)
            dynamic = isinstance(it, ast.Call) and (
                (isinstance(name, ast.Name) and name.id == "range")
                or (isinstance(name, ast.Attribute) and name.attr == "range")
            )
            if dynamic and isinstance(node.target, ast.Name):
                wrap = ast.Call(
                    func=ast.Attribute(
                        value=ast.Name(id="interpreter_semantic", ctx=ast.Load()),
                        attr="to_tensor",
                        ctx=ast.Load(),
                    ),
                    args=[ast.Name(id=node.target.id, ctx=ast.Load()), ast.Constant(False)],
                    keywords=[],
                )
                target = ast.Name(id=node.target.id, ctx=ast.Store())
                node.body.insert(0, ast.Assign(targets=[target], value=wrap))
            return node

    interpreter.InterpreterBuilder.create_dot = create_dot
    interpreter.InterpreterBuilder.cast_impl = cast_impl
    interpreter.FunctionRewriter.ast_transformer = TensorLoopVariables()
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.create_dot = original_dot
        interpreter.InterpreterBuilder.cast_impl = original_cast
        interpreter.FunctionRewriter.ast_transformer = original_rewriter


@dataclass(frozen=True)
class PeerLayout:
    """The peer's token layout for one grid (from its own ``build_vsa_metadata``)."""

    grid: tuple[int, int, int]
    num_tiles: int
    tile_order: torch.Tensor  # [S] int64: raster token at each tile-order position
    raster_order: torch.Tensor  # [S] int64: inverse of tile_order
    slots: torch.Tensor  # [S] int64: padded slot of each tile-order position
    block_sizes: torch.Tensor  # [N] int32: valid tokens per tile (variable_block_sizes)

    @property
    def padded_len(self) -> int:
        return self.num_tiles * BLOCK

    def to_peer(self, x: torch.Tensor) -> torch.Tensor:
        """Raster ``[B, H, S, D]`` -> the peer's ``[B, H, N * 64, D]`` (pads are zeros)."""
        out = x.new_zeros(*x.shape[:2], self.padded_len, x.shape[-1])
        return out.index_copy_(2, self.slots, x.index_select(2, self.tile_order))

    def from_peer(self, x_p: torch.Tensor) -> torch.Tensor:
        """The peer's ``[B, H, N * 64, D]`` -> raster ``[B, H, S, D]`` (pads dropped)."""
        return x_p.index_select(2, self.slots).index_select(2, self.raster_order)

    def raster_slot(self) -> torch.Tensor:
        """``[S]``: the peer's padded slot of every raster token (fastwan's
        ``TilePlan(slots=64).scatter_index`` when both layouts agree)."""
        out = torch.empty_like(self.slots)
        out[self.tile_order] = self.slots
        return out


class _PeerFine(torch.autograd.Function):
    """The peer's Triton fine stage, paired as its ``block_sparse_attn_triton`` op pairs
    it (forward -> o, M; backward from the key->query index)."""

    @staticmethod
    def forward(ctx, q, k, v, q2k_idx, q2k_num, block_sizes, peer):
        o, m = peer.attn.triton_block_sparse_attn_forward(q, k, v, q2k_idx, q2k_num, block_sizes)
        ctx.save_for_backward(q, k, v, o, m, q2k_idx, q2k_num, block_sizes)
        ctx.peer = peer
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, m, q2k_idx, q2k_num, block_sizes = ctx.saved_tensors
        k2q_idx, k2q_num = ctx.peer.invert(q2k_idx, q2k_num, block_sizes.numel())
        dq, dk, dv = ctx.peer.attn.triton_block_sparse_attn_backward(
            do.contiguous(), q, k, v, o, m, q2k_idx, q2k_num, k2q_idx, k2q_num, block_sizes
        )
        return dq, dk, dv, None, None, None, None


class PeerVSA:
    """FastVideo's VSA, loaded from an installed package or a source tree (``src``)."""

    def __init__(self, src: str | os.PathLike | None = None) -> None:
        self.package_dir, self.origin = _package_dir(src)
        self.src = Path(src) if src is not None else None
        text = (self.package_dir / "version.py").read_text()
        found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
        self.version = found.group(1) if found else "unknown"
        # One private module name per directory: two copies never share kernel objects.
        tag = hashlib.sha1(str(self.package_dir.resolve()).encode()).hexdigest()[:8]
        self._mods = {
            key: _load_file(f"_fastwan_peer_{tag}_{key}", self.package_dir / rel)
            for key, rel in _FILES.items()
        }
        if interpreting():
            # The interpreter has no GPU timer to autotune with, and warps / stages mean
            # nothing there: one config of the peer's 12 (this private copy only).
            fwd = self.attn._attn_fwd_sparse
            fwd.configs = fwd.configs[:1]
        self.triton_error = triton_blocker(self.src)
        self._public: ModuleType | None = None
        self._public_error: str | None = None

    # the peer's modules, by role
    attn = property(lambda self: self._mods["attn"])
    compress = property(lambda self: self._mods["compress"])
    index = property(lambda self: self._mods["index"])
    utils = property(lambda self: self._mods["utils"])

    @property
    def source(self) -> str:
        return f"fastvideo-kernel {self.version} ({self.origin}: {self.package_dir})"

    def public(self) -> ModuleType | None:
        """The installed package itself (its ``__init__`` run), for its public CUDA entry
        points; None for a source tree, or when it does not import (the error is kept)."""
        if self.origin != "installed" or self._public_error is not None:
            return self._public
        if self._public is None:
            try:
                self._public = importlib.import_module("fastvideo_kernel")
            except Exception as e:  # its __init__ imports every kernel family it ships
                self._public_error = f"fastvideo_kernel does not import ({type(e).__name__}: {e})"
        return self._public

    def cuda_error(self, device: torch.device) -> str | None:
        """Why its compiled (ThunderKittens, sm_90) kernel is unavailable, or None."""
        if device.type != "cuda":
            return "its CUDA kernels need a CUDA device"
        if self.origin != "installed":
            return "a source tree has no compiled extension (install the package for it)"
        if self.public() is None:
            return self._public_error
        try:
            ops = importlib.import_module("fastvideo_kernel._C").fastvideo_kernel_ops
        except Exception as e:
            return f"its extension does not import ({type(e).__name__}: {e})"
        if getattr(ops, "block_sparse_fwd", None) is None:
            return "its extension was built without the block-sparse (VSA) kernels"
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) != (9, 0):
            return f"its VSA kernel is for sm_90 (Hopper); this GPU is sm_{major}{minor}"
        return None

    def available(self, impl: str, device: torch.device) -> str | None:
        """None when ``impl`` (``triton`` or ``cuda``) can run on ``device``, else why not."""
        if impl == "cuda":
            return self.cuda_error(device)
        if self.triton_error:
            return self.triton_error
        if device.type == "cpu" and not interpreting():
            return "on a CPU its Triton kernels need TRITON_INTERPRET=1 set before Python starts"
        return None

    def layout(self, grid: tuple[int, int, int], device: torch.device) -> PeerLayout:
        meta = self.utils.build_vsa_metadata(tuple(grid), TILE, device)
        return PeerLayout(
            grid=tuple(grid),
            num_tiles=math.prod(meta["num_tiles"]),
            tile_order=meta["tile_partition_indices"],
            raster_order=meta["reverse_tile_partition_indices"],
            slots=meta["non_pad_index"],
            block_sizes=meta["variable_block_sizes"].to(torch.int32),
        )

    def invert(self, q2k_idx, q2k_num, num_kv: int):
        """Key -> query tiles of a selection: its own ``invert_indices`` on CUDA; on a CPU
        (which that refuses) its ``map_to_index`` kernel over the transposed block map."""
        if q2k_idx.is_cuda:
            return self.index.invert_indices(q2k_idx, q2k_num, num_kv_blocks=num_kv)
        B, H, N, M = q2k_idx.shape
        valid = torch.arange(M, device=q2k_idx.device) < q2k_num.unsqueeze(-1)  # [B, H, N, M]
        # Unused entries (-1) go to an extra column, dropped after: no duplicate writes.
        column = torch.where(valid, q2k_idx, num_kv).long()
        block_map = torch.zeros(B, H, N, num_kv + 1, dtype=torch.bool, device=q2k_idx.device)
        block_map.scatter_(-1, column, True)
        return self.index.map_to_index(block_map[..., :num_kv].transpose(-1, -2).contiguous())

    def coarse(self, q_p, k_p, v_p, layout: PeerLayout, topk: int):
        """Its coarse stage as ``ops.video_sparse_attn`` runs it: bf16 tile means (fused
        kernel), scores, softmax, and the top-k block map. Returns (out_c [B, H, N, D],
        mask [B, H, N, N] bool)."""
        vbs = layout.block_sizes
        q_c = self.compress.fused_block_mean(q_p, vbs, BLOCK)
        k_c = self.compress.fused_block_mean(k_p, vbs, BLOCK)
        v_c = self.compress.fused_block_mean(v_p, vbs, BLOCK)
        scores = torch.matmul(q_c, k_c.transpose(-2, -1)) / (q_p.shape[-1] ** 0.5)
        out_c = torch.matmul(torch.softmax(scores, dim=-1), v_c)
        return out_c, self.compress.fused_topk_mask(scores, topk)

    def triton_vsa(self, q_p, k_p, v_p, gate_p, layout: PeerLayout, topk: int):
        """Its VSA from its Triton kernels, step for step as its ``video_sparse_attn``
        (64-token blocks), on the peer layout; differentiable."""
        B, H, S_p, D = q_p.shape
        out_c, mask = self.coarse(q_p, k_p, v_p, layout, topk)
        out_c = out_c.view(B, H, layout.num_tiles, 1, D).repeat(1, 1, 1, BLOCK, 1)
        q2k_idx, q2k_num = self.index.map_to_index(mask)
        out_s = _PeerFine.apply(
            q_p.contiguous(), k_p.contiguous(), v_p.contiguous(), q2k_idx, q2k_num,
            layout.block_sizes, self,
        )  # fmt: skip
        return out_c.view(B, H, S_p, D) * gate_p + out_s

    def vsa(self, impl: str, q_p, k_p, v_p, gate_p, layout: PeerLayout, topk: int):
        """Run ``impl`` on peer-layout tensors: its public function on CUDA when the
        package is installed (``triton`` forced by its own switch), else ``triton_vsa``."""
        public = self.public() if q_p.is_cuda else None
        if public is None:
            if impl != "triton":
                raise ValueError(f"peer impl {impl!r} needs the installed package on CUDA")
            return self.triton_vsa(q_p, k_p, v_p, gate_p, layout, topk)
        with _switch("FASTVIDEO_VSA_TRITON", "1" if impl == "triton" else "0"):
            return public.video_sparse_attn(
                q_p, k_p, v_p, layout.block_sizes, layout.block_sizes, topk,
                block_size=BLOCK, compress_attn_weight=gate_p,
            )  # fmt: skip

    def entry(self, impl: str, device: torch.device) -> str:
        """What ``vsa(impl)`` calls on ``device`` (for the report)."""
        if device.type == "cuda" and self.public() is not None:
            how = "FASTVIDEO_VSA_TRITON=1" if impl == "triton" else "its sm_90 kernel"
            return f"fastvideo_kernel.video_sparse_attn ({how})"
        return "its Triton kernels composed as fastvideo_kernel.ops.video_sparse_attn"


@contextlib.contextmanager
def _switch(name: str, value: str) -> Iterator[None]:
    """Set the peer's backend switch (read at every call) for the duration."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def separable_inputs(
    batch: int,
    heads: int,
    grid: tuple[int, int, int],
    head_dim: int,
    topk: int,
    rng: torch.Generator,
    strength: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 ``q, k, v, gate`` ``[B, H, S, D]`` (raster) whose top-``topk`` tiles are the
    same in any precision, so two implementations can be held to one selection.

    The peer ranks tiles by bfloat16 scores, fastwan by float32 ones: with random inputs
    and hundreds of tiles, neighbouring coarse scores are closer than a bfloat16 step and
    the selections would differ. Here each (batch, head) splits the key tiles into groups
    of exactly ``topk`` (the rest in none) and gives every query tile a group; a tile's
    tokens are unit noise centred on the tile (mean 0 per tile) plus a one-hot of its
    group times ``strength``. Coarse scores are then ``strength**2 * scale`` within a group
    and ~0 elsewhere: each query tile's top-k is its group, by a wide margin. The fine
    stage sees ordinary unit-variance attention scores.
    """
    plan = get_tile_plan(grid, TILE)
    n = plan.num_tiles
    groups = n // topk
    if not 1 <= topk <= n:
        raise ValueError(f"topk must be in [1, {n}] for grid {grid}, got {topk}")
    if groups > head_dim:
        raise ValueError(
            f"head_dim={head_dim} is too small for {groups} tile groups (grid {grid}, "
            f"topk {topk}); use a head dim >= {groups} or a lower sparsity"
        )
    B, H, S, D = batch, heads, plan.seq_len, head_dim
    tile = plan.token_tile.cpu()  # [S]

    def centred_noise() -> torch.Tensor:  # [B, H, S, D], mean 0 over each tile's tokens
        x = torch.randn(B, H, S, D, generator=rng)
        return x - plan.tile_mean(x).index_select(-2, tile)

    order = torch.argsort(torch.rand(B, H, n, generator=rng), dim=-1)  # [B, H, N]
    key_group = torch.full((B, H, n), groups, dtype=torch.long)  # ``groups``: in none
    member = torch.arange(groups).repeat_interleave(topk).expand(B, H, -1)
    key_group.scatter_(-1, order[..., : groups * topk], member)
    query_group = torch.randint(0, groups, (B, H, n), generator=rng)

    def one_hot(g: torch.Tensor) -> torch.Tensor:  # [B, H, N] -> [B, H, S, D]
        hot = torch.zeros(B, H, n, D)
        hot.scatter_(-1, g.unsqueeze(-1).clamp(max=D - 1), (g < groups).float().unsqueeze(-1))
        return strength * hot.index_select(-2, tile)

    q = centred_noise() + one_hot(query_group)
    k = centred_noise() + one_hot(key_group)
    v = torch.randn(B, H, S, D, generator=rng)
    gate = torch.randn(B, H, S, D, generator=rng)
    return q, k, v, gate


def mask_from_indices(idx: torch.Tensor, num_tiles: int) -> torch.Tensor:
    """fastwan's selected tiles ``[B, H, N, k]`` -> a block map ``[B, H, N, N]`` bool."""
    out = torch.zeros(*idx.shape[:-1], num_tiles, dtype=torch.bool, device=idx.device)
    return out.scatter_(-1, idx.long(), True)


__all__ = [
    "FETCHED_TRITON",
    "IMPLEMENTATIONS",
    "PEER_RELEASE",
    "PeerLayout",
    "PeerVSA",
    "fetched_triton",
    "interpreter_fidelity",
    "interpreting",
    "mask_from_indices",
    "separable_inputs",
    "triton_blocker",
]

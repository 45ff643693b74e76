"""``fastwan bench attention``: dense SDPA vs VSA, forward and forward+backward.

Every case times PyTorch's ``scaled_dot_product_attention`` and ``video_sparse_attention``
on the same tensors in the same run and reports dense/VSA time ratios. FLOP counts follow
the flash-attention convention: forward 4 * B * H * S * S_kv * D, backward 2.5x forward.

``--peer fastvideo`` times FastVideo's own VSA (``fastvideo-kernel``: its Triton kernels,
and its compiled CUDA kernel where it imports) beside fastwan's backends and dense SDPA,
on the same tensors in the same run (see :func:`run_peer`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastwan.attention import (
    get_tile_plan,
    num_selected_tiles,
    resolve_backend,
    video_sparse_attention,
    vsa_reference,
)
from fastwan.attention.api import triton_usable
from fastwan.attention.reference import MAX_MASK_ELEMENTS
from fastwan.attention.tiling import tile_counts_per_dim
from fastwan.bench.timing import measure
from fastwan.choices import ATTENTION_PEERS
from fastwan.shapes import latent_grid

# Token grids (T, H/2, W/2) of Wan latents; 21 x 30 x 52 is Wan2.1's 480P, 81-frame grid.
GRIDS = {8192: (8, 32, 32), 16384: (16, 32, 32), 32760: (21, 30, 52)}
SPARSITIES = (0.5, 0.8, 0.9, 0.95)
# Speed goals (issue #2): (device type, mode, sparsity, min S) -> min dense/VSA ratio.
GOALS = {
    ("cpu", "fwd+bwd", 0.9, 16384): 5.0,
    ("cpu", "fwd+bwd", 0.8, 16384): 3.0,
    ("cuda", "fwd+bwd", 0.9, 32760): 5.0,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def wan_token_grid(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Token grid of a Wan2.1 video: VAE stride (4, 8, 8), then patch (1, 2, 2)."""
    t, h, w = latent_grid(num_frames, height, width, (4, 8, 8), (1, 2, 2))
    return t, h // 2, w // 2


# Side by side with the peer (issue 21): Wan2.1's 81-frame grids, 21 x 30 x 52 at 480P
# (480 x 832) and 21 x 45 x 80 at 720P (720 x 1280).
PEER_GRIDS = {"480p": wan_token_grid(81, 480, 832), "720p": wan_token_grid(81, 720, 1280)}
PEER_SPARSITIES = (0.8, 0.9, 0.95)
PEER_CPU_GRID = "5x6x9"  # under the Triton interpreter: 12 tiles, partial along every axis
FACTOR = 2.0  # the low-precision rule: error <= FACTOR x PyTorch's own at that dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seq-lens",
        type=int,
        nargs="+",
        default=sorted(GRIDS),
        help=f"sequence lengths, from {sorted(GRIDS)}",
    )
    parser.add_argument(
        "--sparsities",
        type=float,
        nargs="+",
        default=None,
        help=f"default {list(SPARSITIES)}; with --peer {list(PEER_SPARSITIES)}",
    )
    parser.add_argument(
        "--heads", type=int, default=None, help="attention heads (default: 1 on CPU, 12 on CUDA)"
    )
    parser.add_argument(
        "--head-dim", type=int, default=None, help="default 128; with --peer on a CPU 32"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    parser.add_argument(
        "--backend",
        default=None,
        help="VSA backend (auto, torch, triton; default auto); with --peer: triton on CUDA, "
        "on a CPU every one of triton and torch that runs",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case")
    parser.add_argument(
        "--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one short case per mode (S=8192, sparsity 0.9): a smoke run",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    peer = parser.add_argument_group("side by side with another project's VSA")
    peer.add_argument(
        "--peer",
        choices=ATTENTION_PEERS,
        default=None,
        help="also time this peer's VSA on the same tensors (fastvideo: FastVideo's "
        "fastvideo-kernel, installed or --peer-src); bfloat16, with a gate, --grids",
    )
    peer.add_argument(
        "--peer-src",
        metavar="DIR",
        default=None,
        help="the peer's unpacked source distribution (scripts/fetch_peer.sh DIR fetches "
        "fastvideo-kernel 0.3.5); default: the installed package",
    )
    peer.add_argument(
        "--grids",
        nargs="+",
        default=None,
        metavar="GRID",
        help=f"with --peer: token grids, {' '.join(PEER_GRIDS)} or TxHxW (default: "
        f"{' '.join(PEER_GRIDS)} on CUDA, {PEER_CPU_GRID} on a CPU)",
    )
    peer.add_argument(
        "--skip-check",
        action="store_true",
        help="with --peer: skip the accuracy check (its float64 oracle and bf16 PyTorch "
        "budget on one head need ~60 GB of GPU memory at 720P)",
    )


def _attention_flops(B, H, S, S_kv, D, mode):
    fwd = 4.0 * B * H * S * S_kv * D
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def _step(fn, q, k, v, mode):
    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                fn(q, k, v)

        return fwd
    do = torch.randn_like(q)

    def run():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), do)

    return run


def _device(args: argparse.Namespace) -> torch.device:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return device


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def run(args: argparse.Namespace) -> dict:
    if args.peer:
        return run_peer(args)
    if args.peer_src or args.grids or args.skip_check:
        raise ValueError("--peer-src, --grids and --skip-check need --peer fastvideo")
    device = _device(args)
    dtype = (
        DTYPES[args.dtype]
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    heads = args.heads or (12 if device.type == "cuda" else 1)
    repeats = args.repeats or (10 if device.type == "cuda" else 1)
    sparsities = args.sparsities or list(SPARSITIES)
    seq_lens, sparsities = ([8192], [0.9]) if args.quick else (args.seq_lens, sparsities)
    for s in seq_lens:
        if s not in GRIDS:
            raise ValueError(f"--seq-lens: {s} is not one of {sorted(GRIDS)}")
    for sp in sparsities:
        if not 0.0 <= sp < 1.0:
            raise ValueError(f"--sparsities: {sp} must be in [0, 1)")
    backend = resolve_backend(args.backend or "auto", device)
    D, B = args.head_dim or 128, 1
    gen = torch.Generator(device="cpu").manual_seed(0)

    results = []
    cases = [(s, m) for s in seq_lens for m in args.modes]
    bar = tqdm(total=len(cases) * (1 + len(sparsities)), desc="bench attention", unit="case")
    for S, mode in cases:
        grid = GRIDS[S]
        q, k, v = (
            torch.randn(B, heads, S, D, generator=gen).to(device, dtype).requires_grad_()
            for _ in range(3)
        )
        dense = measure(_step(F.scaled_dot_product_attention, q, k, v, mode), device, repeats)
        bar.update()
        n_tiles = math.prod(tile_counts_per_dim(grid, (4, 4, 4)))
        for sp in sparsities:
            fn = lambda q, k, v, sp=sp, grid=grid: video_sparse_attention(  # noqa: E731
                q, k, v, grid=grid, sparsity=sp, backend=backend
            )
            t = measure(_step(fn, q, k, v, mode), device, repeats)
            kv = num_selected_tiles(n_tiles, sp) * 64
            dense_flops = _attention_flops(B, heads, S, S, D, mode)
            results.append(
                {
                    "seq_len": S,
                    "grid": list(grid),
                    "mode": mode,
                    "sparsity": sp,
                    "selected_tiles": kv // 64,
                    "num_tiles": n_tiles,
                    "dense_s": dense["median_s"],
                    "vsa_s": t["median_s"],
                    "speedup": dense["median_s"] / t["median_s"],
                    "dense_tflops": dense_flops / dense["median_s"] / 1e12,
                    "vsa_dense_equiv_tflops": dense_flops / t["median_s"] / 1e12,
                    "vsa_sparse_tflops": _attention_flops(B, heads, S, kv, D, mode)
                    / t["median_s"]
                    / 1e12,
                }
            )
            bar.update()
        del q, k, v
    bar.close()

    goals = []
    for (dev, mode, sp, min_s), target in GOALS.items():
        rows = [
            r
            for r in results
            if dev == device.type
            and r["mode"] == mode
            and r["sparsity"] == sp
            and r["seq_len"] >= min_s
        ]
        for r in rows:
            goals.append(
                {
                    "goal": f"{mode} sparsity {sp} S={r['seq_len']} >= {target}x",
                    "speedup": r["speedup"],
                    "met": r["speedup"] >= target,
                }
            )
    report = {
        "benchmark": "attention",
        "device": _device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "backend": backend,
        "heads": heads,
        "head_dim": D,
        "batch": B,
        "repeats": repeats,
        "torch": torch.__version__,
        "results": results,
        "goals": goals,
    }
    _print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return report


def _print(report: dict) -> None:
    print(
        f"\nVSA vs dense SDPA on {report['device']}, {report['dtype']}, backend "
        f"{report['backend']}, B={report['batch']} H={report['heads']} D={report['head_dim']}"
    )
    head = (
        f"{'S':>6} {'mode':>8} {'sparsity':>8} {'tiles':>9} {'dense s':>9} {'VSA s':>9} "
        f"{'dense/VSA':>9} {'TFLOP/s dense-eq':>17} {'sparse':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in report["results"]:
        print(
            f"{r['seq_len']:>6} {r['mode']:>8} {r['sparsity']:>8.2f} "
            f"{r['selected_tiles']:>4}/{r['num_tiles']:<4} {r['dense_s']:>9.4f} "
            f"{r['vsa_s']:>9.4f} {r['speedup']:>8.2f}x {r['vsa_dense_equiv_tflops']:>17.3f} "
            f"{r['vsa_sparse_tflops']:>8.3f}"
        )
    for g in report["goals"]:
        print(f"goal {g['goal']}: {g['speedup']:.2f}x {'MET' if g['met'] else 'NOT MET'}")


# ----------------------------------------------------------------- side by side with a peer


def _parse_grid(text: str) -> tuple[int, int, int]:
    if text.lower() in PEER_GRIDS:
        return PEER_GRIDS[text.lower()]
    try:
        grid = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        grid = ()
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(
            f"--grids: {text!r} is neither {' / '.join(PEER_GRIDS)} nor TxHxW of positive "
            "integers (e.g. 21x30x52)"
        )
    return grid  # type: ignore[return-value]


def _timed_step(fn, inputs: tuple[torch.Tensor, ...], mode: str, d_out: torch.Tensor):
    """What one timed run does: a forward (no autograd), or forward + backward to every
    input (q, k, v and the gate where there is one)."""
    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                fn(*inputs)

        return fwd

    def fwd_bwd():
        torch.autograd.grad(fn(*inputs), inputs, d_out)

    return fwd_bwd


def _outputs_and_grads(fn, inputs, d_out) -> list[torch.Tensor]:
    """[out, d(input) for every input] of ``fn`` on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, d_out.to(out.dtype))]


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to the reference's max magnitude (the tests' rule)."""
    ref = ref.double()
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def torch_vsa(q, k, v, gate, *, grid, tiles: torch.Tensor) -> torch.Tensor:
    """PyTorch's own VSA at the inputs' dtype, the budget of the low-precision rule: the
    fine stage as PyTorch's math-backend SDPA under the block mask of ``tiles``
    ([B, H, N, N] bool), the coarse stage in plain torch ops; ``fine + gate * coarse``.
    Materialises a [B, H, S, S] mask: one head at a time at video sizes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    plan = get_tile_plan(grid, (4, 4, 4), device=q.device)
    tt = plan.token_tile  # [S]
    mask = tiles[:, :, tt][:, :, :, tt]  # [B, H, S, S]
    with sdpa_kernel(SDPBackend.MATH):
        fine = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    qc, kc, vc = plan.tile_mean(q), plan.tile_mean(k), plan.tile_mean(v)  # [B, H, N, D]
    coarse = torch.softmax(qc @ kc.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ vc
    return fine + gate * coarse.index_select(-2, tt)


def _oracle(inputs, d_out, grid, idx) -> tuple[list[torch.Tensor], bool]:
    """float64 outputs and gradients of VSA with the selection ``idx`` ([B, H, N, k]), on
    float64 ``inputs``: the dense masked reference where it fits, else fastwan's torch
    backend (its own float64 selection: returned whether it equals ``idx``)."""
    q = inputs[0]
    k_sel = idx.shape[-1]
    if q.shape[0] * q.shape[1] * q.shape[2] ** 2 <= MAX_MASK_ELEMENTS:

        def ref(q, k, v, g):
            return vsa_reference(q, k, v, grid=grid, topk=k_sel, gate=g, indices=idx)[0]

        return _outputs_and_grads(ref, inputs, d_out), True
    with torch.no_grad():
        _, own = video_sparse_attention(
            *inputs[:3], grid=grid, topk=k_sel, gate=inputs[3], backend="torch",
            return_indices=True,
        )  # fmt: skip

    def fw64(q, k, v, g):
        return video_sparse_attention(q, k, v, grid=grid, topk=k_sel, gate=g, backend="torch")

    return _outputs_and_grads(fw64, inputs, d_out), bool(torch.equal(own, idx))


GRAD_NAMES = ("out", "dq", "dk", "dv", "dgate")


def _peer_setup(args: argparse.Namespace):
    from fastwan.bench import peer as peer_mod

    device = _device(args)
    if args.dtype not in (None, "bfloat16"):
        raise ValueError(
            f"--dtype {args.dtype}: the peer's kernels compute in bfloat16 only (they cast "
            "probabilities to bfloat16 in the kernel); leave --dtype out or pass bfloat16"
        )
    if args.quick:
        raise ValueError("--quick is for the dense-vs-VSA run; with --peer pass --grids")
    cpu = device.type == "cpu"
    D = args.head_dim or (32 if cpu else 128)
    if D < 16 or D & (D - 1):
        raise ValueError(
            f"--head-dim {D}: the peer's kernels take the head dim as a Triton block size, "
            "a power of two >= 16 (Wan's is 128)"
        )
    grids = [_parse_grid(g) for g in (args.grids or ([PEER_CPU_GRID] if cpu else PEER_GRIDS))]
    sparsities = args.sparsities or list(PEER_SPARSITIES)
    for sp in sparsities:
        if not 0.0 < sp < 1.0:
            raise ValueError(f"--sparsities: {sp} must be in (0, 1) with --peer")
    if args.backend:
        backends = [resolve_backend(args.backend, device)]
    elif device.type == "cuda" and triton_usable(device):
        # the torch backend walks query tiles in Python: minutes per case at 720P
        backends = ["triton"]
    else:  # on a CPU: every fastwan fine-stage backend that runs here
        backends = (["triton"] if triton_usable(device) else []) + ["torch"]
    peer = peer_mod.PeerVSA(args.peer_src)
    reasons = {impl: peer.available(impl, device) for impl in peer_mod.IMPLEMENTATIONS}
    impls = [impl for impl, why in reasons.items() if why is None]
    if not impls:
        raise ValueError(
            "--peer fastvideo: none of its VSA implementations runs here: "
            + "; ".join(f"{impl}: {why}" for impl, why in reasons.items())
        )
    return peer_mod, device, D, grids, sparsities, backends, peer, reasons, impls


def run_peer(args: argparse.Namespace) -> dict:
    """FastVideo's VSA beside fastwan's backends and dense SDPA, bf16, with a gate.

    Per grid and sparsity: one set of inputs (``peer.separable_inputs``: their top-k
    tiles are unambiguous at any precision), converted once to each implementation's
    layout before any timing (raster for dense and fastwan, which tiles inside its own
    call and pays for it in its time; zero-padded tile order for the peer, which expects
    that). Each implementation's selected tiles are compared, and on head 0 its output
    and gradients are held to the low-precision rule: error against a float64 oracle of
    VSA at that selection <= FACTOR x the error of PyTorch's own bf16 VSA
    (:func:`torch_vsa`). Then dense SDPA, fastwan and the peer are timed in turn.
    """
    peer_mod, device, D, grids, sparsities, backends, peer, reasons, impls = _peer_setup(args)
    dtype, B = torch.bfloat16, 1
    heads = args.heads or (12 if device.type == "cuda" else 1)
    repeats = args.repeats or (10 if device.type == "cuda" else 1)
    interp = device.type == "cpu" and peer_mod.interpreting()
    rng = torch.Generator().manual_seed(0)
    cases = [(g, sp) for g in grids for sp in sparsities]
    n_impl = 1 + len(backends) + len(impls)

    import triton  # the peer's kernels need it: imported by now

    meta = {
        "benchmark": "attention_peer",
        "device": _device_name(device),
        "dtype": "bfloat16",
        "heads": heads,
        "head_dim": D,
        "batch": B,
        "repeats": repeats,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "triton_interpreter": interp,
        "fastwan_backends": backends,
        "peer": {
            "name": args.peer,
            "source": peer.source,
            "version": peer.version,
            "checked_release": peer_mod.PEER_RELEASE,
            "implementations": {
                impl: {
                    "available": reasons[impl] is None,
                    "reason": reasons[impl],
                    "entry": peer.entry(impl, device) if reasons[impl] is None else None,
                }
                for impl in peer_mod.IMPLEMENTATIONS
            },
        },
        "rule": f"error vs a float64 VSA oracle (head 0, same selection) <= {FACTOR} x the "
        "error of PyTorch's own bf16 VSA (math SDPA under the block mask + coarse branch)",
        "inputs": "peer.separable_inputs: each query tile's top-k tiles unambiguous; gate "
        "randn; fastwan takes raster tokens and tiles inside its timed call, the peer its "
        "zero-padded tile order, converted before timing",
    }
    rows, checks = [], []
    bar = tqdm(total=len(cases) * len(args.modes) * n_impl, desc="bench attention --peer")
    with peer_mod.interpreter_fidelity() if interp else contextlib.nullcontext():
        for grid, sp in cases:
            layout = peer.layout(grid, device)
            n_tiles = layout.num_tiles
            k_sel = num_selected_tiles(n_tiles, sp)
            raw = peer_mod.separable_inputs(B, heads, grid, D, k_sel, rng)
            q, k, v, g = (t.to(device, dtype) for t in raw)  # raster [B, H, S, D]
            do = torch.randn(q.shape, generator=rng).to(device, dtype)
            q_p, k_p, v_p, g_p, do_p = (layout.to_peer(t) for t in (q, k, v, g, do))

            # name -> (fn(q, k, v, gate), the layout it takes)
            fns = {
                f"fastwan_{b}": (
                    functools.partial(_fastwan_vsa, grid=grid, topk=k_sel, backend=b),
                    "raster",
                )
                for b in backends
            }
            for i in impls:
                fns[f"peer_{i}"] = (
                    functools.partial(_peer_vsa, peer, i, layout=layout, topk=k_sel),
                    "peer",
                )
            check = _agreement(
                peer, layout, grid, k_sel, backends, fns, (q, k, v, g), do, args.skip_check
            )
            check.update(grid=list(grid), sparsity=sp, topk=k_sel, num_tiles=n_tiles)
            checks.append(check)

            for mode in args.modes:
                ins = {
                    "raster": tuple(t.detach().requires_grad_() for t in (q, k, v, g)),
                    "peer": tuple(t.detach().requires_grad_() for t in (q_p, k_p, v_p, g_p)),
                }
                d_out = {"raster": do, "peer": do_p}
                times = {}
                dense = F.scaled_dot_product_attention
                t = measure(_timed_step(dense, ins["raster"][:3], mode, do), device, repeats)
                times["dense"] = t["median_s"]
                bar.update()
                for name, (fn, lay) in fns.items():
                    step = _timed_step(fn, ins[lay], mode, d_out[lay])
                    times[name] = measure(step, device, repeats)["median_s"]
                    bar.update()
                rows.append(_peer_row(grid, sp, k_sel, n_tiles, mode, times, backends, impls))
            del q, k, v, g, do, q_p, k_p, v_p, g_p, do_p
            if args.json:  # after every case: a run stopped at a time limit keeps its rows
                _write_json(args.json, _peer_report(meta, checks, rows, impls, complete=False))
    bar.close()

    report = _peer_report(meta, checks, rows, impls, complete=True)
    _print_peer(report)
    if args.json:
        _write_json(args.json, report)
        print(f"wrote {args.json}")
    return report


def _write_json(path: str, report: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)  # whole files only, also when killed mid-write


def _peer_report(meta: dict, checks: list, rows: list, impls: list, complete: bool) -> dict:
    """The report so far: ``complete`` False while cases remain."""
    behind = [
        f"{r['mode']} {tuple(r['grid'])} sparsity {r['sparsity']}: fastwan "
        f"{r['fastest_fastwan']} {r['times_s'][r['fastest_fastwan']]:.4g} s > {name} "
        f"{r['times_s'][name]:.4g} s"
        for r in rows
        for name in (f"peer_{i}" for i in impls)
        if r["times_s"][r["fastest_fastwan"]] > r["times_s"][name]
    ]
    return {**meta, "complete": complete, "checks": checks, "results": rows,
            "fastwan_behind": behind}  # fmt: skip


def _fastwan_vsa(q, k, v, g, *, grid, topk, backend):
    return video_sparse_attention(q, k, v, grid=grid, topk=topk, gate=g, backend=backend)


def _peer_vsa(peer, impl, q, k, v, g, *, layout, topk):
    return peer.vsa(impl, q, k, v, g, layout, topk)


def _agreement(peer, layout, grid, k_sel, backends, fns, raster, do, skip_check) -> dict:
    """Same tiles selected by every implementation, and (unless skipped) each one's output
    and gradients on head 0 within the low-precision rule (see :func:`run_peer`)."""
    from fastwan.bench.peer import mask_from_indices

    q, k, v, g = raster
    with torch.no_grad():
        idx = {
            b: video_sparse_attention(
                q, k, v, grid=grid, topk=k_sel, gate=g, backend=b, return_indices=True
            )[1]
            for b in backends
        }
        _, peer_tiles = peer.coarse(*(layout.to_peer(t) for t in (q, k, v)), layout, k_sel)
    tiles = mask_from_indices(idx[backends[0]], layout.num_tiles)  # [B, H, N, N]
    rows_same = (tiles == peer_tiles).all(-1)  # [B, H, N]: a query tile's whole selection
    fastwan_same = all(torch.equal(i, idx[backends[0]]) for i in idx.values())
    out = {
        "same_tiles": bool(rows_same.all()) and fastwan_same,
        "query_tiles_same_fraction": rows_same.float().mean().item(),
    }
    if skip_check:
        return out
    head0 = [t[:, :1] for t in raster]
    head0_idx = idx[backends[0]][:, :1]
    ref, oracle_same = _oracle([t.double() for t in head0], do[:, :1].double(), grid, head0_idx)
    out["oracle_same_tiles"] = oracle_same
    budget_fn = functools.partial(torch_vsa, grid=grid, tiles=tiles[:, :1])
    try:  # [S, S] scores, mask and their gradients: ~60 GB at 720P
        budget = _outputs_and_grads(budget_fn, head0, do[:, :1])
        out["budget"] = {n: _rel_err(a, r) for n, a, r in zip(GRAD_NAMES, budget, ref)}
        del budget
    except torch.OutOfMemoryError as e:  # keep the errors and the timings, say why
        out["budget"] = None
        out["budget_skipped"] = f"PyTorch's bf16 VSA ran out of memory ({e})".split("\n")[0]
        torch.cuda.empty_cache()
    out["errors"], out["within_rule"] = {}, {}
    for name, (fn, lay) in fns.items():
        if lay == "peer":
            got = _outputs_and_grads(fn, [layout.to_peer(t) for t in raster], layout.to_peer(do))
            got = [layout.from_peer(t) for t in got]
        else:
            got = _outputs_and_grads(fn, raster, do)
        errs = {n: _rel_err(a[:, :1], r) for n, a, r in zip(GRAD_NAMES, got, ref)}
        out["errors"][name] = errs
        out["within_rule"][name] = (
            all(errs[n] <= FACTOR * out["budget"][n] for n in GRAD_NAMES)
            if out["budget"]
            else None  # no budget to hold it to: see budget_skipped
        )
    return out


def _peer_row(grid, sp, k_sel, n_tiles, mode, times, backends, impls) -> dict:
    fastest = min((f"fastwan_{b}" for b in backends), key=times.__getitem__)
    ratios = {f"dense/{n}": times["dense"] / t for n, t in times.items() if n != "dense"}
    for i in impls:  # > 1: fastwan is faster
        for b in backends:
            ratios[f"peer_{i}/fastwan_{b}"] = times[f"peer_{i}"] / times[f"fastwan_{b}"]
    return {
        "grid": list(grid),
        "seq_len": math.prod(grid),
        "mode": mode,
        "sparsity": sp,
        "topk": k_sel,
        "num_tiles": n_tiles,
        "times_s": times,
        "ratios": ratios,
        "fastest_fastwan": fastest,
    }


def _print_peer(report: dict) -> None:
    p = report["peer"]
    note = " (Triton interpreter: times measure it)" if report["triton_interpreter"] else ""
    print(
        f"\nfastwan VSA vs {p['source']} vs dense SDPA on {report['device']}, bf16, "
        f"B={report['batch']} H={report['heads']} D={report['head_dim']}, with a gate{note}"
    )
    for impl, info in p["implementations"].items():
        state = f"runs {info['entry']}" if info["available"] else f"not run: {info['reason']}"
        print(f"  peer {impl}: {state}")
    for c in report["checks"]:
        line = (
            f"  check {tuple(c['grid'])} sparsity {c['sparsity']} (top-{c['topk']} of "
            f"{c['num_tiles']}): same tiles {'yes' if c['same_tiles'] else 'NO'}"
        )
        if "errors" in c:
            line += "; within rule: " + ", ".join(
                f"{n} {'?' if ok is None else 'yes' if ok else 'NO'}"
                for n, ok in c["within_rule"].items()
            )
        if c.get("budget_skipped"):
            line += f" ({c['budget_skipped']})"
        print(line)
    names = list(report["results"][0]["times_s"]) if report["results"] else []
    head = f"{'grid':>12} {'mode':>8} {'sp':>5} " + " ".join(f"{n + ' s':>16}" for n in names)
    head += "  peer time / fastwan time (> 1: fastwan faster)"
    print(head)
    print("-" * len(head))
    for r in report["results"]:
        t = r["times_s"]
        vs = [f"{n}: {x:.2f}x" for n, x in r["ratios"].items() if n.startswith("peer_")]
        print(
            f"{'x'.join(map(str, r['grid'])):>12} {r['mode']:>8} {r['sparsity']:>5.2f} "
            + " ".join(f"{t[n]:>16.5f}" for n in names)
            + "  "
            + ", ".join(vs)
        )
    for line in report["fastwan_behind"]:
        print(f"FINDING fastwan behind the peer: {line}")

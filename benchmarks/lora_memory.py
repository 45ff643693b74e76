"""Peak memory of LoRA sparse distillation (one shared base) against full sparse
distillation: the same model, data, recipe and steps.

A ``WanTransformer3DModel`` with random weights (default: dim 1024 = 16 heads x 64,
8 layers, FFN 4096: ~150 M parameters, written by this script as a Diffusers-layout
folder) is distilled with ``train.method: dmd`` by the real :class:`fastwan.train.trainer.Trainer`
for ``--steps`` steps (generator and critic updated every step), the networks built as
:func:`fastwan.train.build.build_trainer` builds them:

* ``full``: the teacher frozen in ``model.teacher_dtype`` (bf16), the student and the
  critic copies in ``model.dtype`` (fp32) with gradients and AdamW states;
* ``lora``: ``lora.rank = --rank`` on one shared base (the teacher, bf16): the adapters
  (fp32) and the student's gate adapters are all that has gradients and AdamW states.

Each mode runs in a fresh process. Reported: the bytes of the parameters held (every
distinct tensor once), of the gradients (the trained parameters) and of the AdamW states,
counted from the live tensors after the last step; the peak resident set of the process
(``getrusage(RUSAGE_SELF).ru_maxrss``) minus its resident set before the model was built
(torch, diffusers and fastwan imported); on CUDA also ``torch.cuda.max_memory_allocated``.
Ratios are ``lora / full`` of the same run.

    python benchmarks/lora_memory.py --json benchmarks/results/lora_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

MB = 2**20


def _rss_mb() -> float:
    """The process's current resident set (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / MB


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_model(
    folder: Path, dim_heads: int, layers: int, ffn: int, text_dim: int
) -> tuple[Path, int]:
    """A random-weight Wan transformer in ``folder/transformer`` (the layout fastwan
    loads); returns the folder and the parameter count."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=dim_heads,
        attention_head_dim=64,
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=256,
        ffn_dim=ffn,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    )
    model.save_pretrained(folder / "transformer", safe_serialization=True)
    return folder / "transformer", sum(p.numel() for p in model.parameters())


def _recipe(mode: str, out: Path, steps: int, rank: int):
    from fastwan.config import (
        DMDConfig,
        LoRAConfig,
        ModelConfig,
        OptimConfig,
        OptimConfigs,
        Recipe,
        TrainConfig,
        VSAConfig,
    )

    return Recipe(
        model=ModelConfig(teacher="random-wan", dtype="fp32", teacher_dtype="bf16"),
        train=TrainConfig(
            method="dmd",
            max_steps=steps,
            mixed_precision="bf16",
            checkpoint_interval=0,
            log_interval=steps,
            report_to=[],
            output_dir=str(out),
        ),
        optim=OptimConfigs(generator=OptimConfig(lr=1e-4), critic=OptimConfig(lr=1e-4)),
        dmd=DMDConfig(generator_update_interval=1, guidance_scale=3.0, negative_prompt=""),
        vsa=VSAConfig(sparsity=0.75, tile_size=(2, 4, 4), backend="torch"),
        lora=LoRAConfig(rank=rank if mode == "lora" else 0),
    )


class _Batches:
    """Endless random micro-batches: latents ``[1, 16, T, H, W]`` and text ``[1, L, dim]``."""

    def __init__(self, latent: tuple[int, ...], text_len: int, text_dim: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.batch = {
            "latents": torch.randn(1, *latent, generator=g),
            "text_embedding": torch.randn(1, text_len, text_dim, generator=g),
        }

    def __iter__(self):
        while True:
            yield self.batch


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def measure(mode: str, model: str, args: dict, result: str) -> None:
    """One mode in this (fresh) process; writes its numbers to ``result`` (JSON)."""
    from fastwan.config import torch_dtype
    from fastwan.methods.base import trained_parameters
    from fastwan.methods.dmd import DMDMethod
    from fastwan.models import load_transformer
    from fastwan.train.trainer import Trainer

    device = torch.device(args["device"])
    torch.set_num_threads(args["threads"])
    with tempfile.TemporaryDirectory() as tmp:
        recipe = _recipe(mode, Path(tmp), args["steps"], args["rank"])
        m = recipe.model
        base_rss = _rss_mb()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        teacher = load_transformer(model, dtype=torch_dtype(m.teacher_dtype), device=device)
        neg = torch.zeros(args["text_len"], args["text_dim"])
        if mode == "full":  # as build_trainer: student and critic loaded in model.dtype
            student = load_transformer(model, dtype=torch_dtype(m.dtype), device=device)
            critic = load_transformer(model, dtype=torch_dtype(m.dtype), device=device)
            method = DMDMethod(teacher, recipe.dmd, recipe.vsa, neg, student=student, critic=critic)
        else:
            method = DMDMethod(
                teacher,
                recipe.dmd,
                recipe.vsa,
                neg,
                lora=recipe.lora,
                lora_dtype=torch_dtype(m.dtype),
                seed=recipe.train.seed,
            )
        batches = _Batches(tuple(args["latent"]), args["text_len"], args["text_dim"])
        trainer = Trainer(method, recipe, batches, log_fn=lambda _l: None)
        trainer.train(args["steps"])
        seconds = time.perf_counter() - start
        nets = [*method.networks().values(), *method.frozen_networks().values()]
        params = [p.detach() for net in nets for p in net.parameters()]
        trained = [p for role in method.roles for p in trained_parameters(method, role).values()]
        states = [
            v
            for opt in trainer.optimizers.values()
            for st in opt.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor) and v.numel() > 1
        ]
        out = {
            "mode": mode,
            "networks_in_memory": len({id(n) for n in nets}),
            "parameters": sum(p.numel() for p in {id(p): p for p in params}.values()),
            "trainable_parameters": sum(p.numel() for p in trained),
            "parameter_mb": _tensor_bytes(params) / MB,
            "gradient_mb": _tensor_bytes(trained) / MB,  # one gradient per trained parameter
            "optimizer_state_mb": _tensor_bytes(states) / MB,
            "peak_rss_mb": _peak_rss_mb() - base_rss,
            "seconds": seconds,
            "losses": [
                {k: r[k] for k in ("generator_loss", "critic_loss") if k in r}
                for r in trainer.history
            ],
        }
        out["state_mb"] = out["parameter_mb"] + out["gradient_mb"] + out["optimizer_state_mb"]
        if device.type == "cuda":
            out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / MB
        Path(result).write_text(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=16, help="dim = heads x 64")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--latent", type=int, nargs=3, default=[4, 16, 16], help="T H W")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    text_dim, text_len = 256, 32
    settings = {
        "steps": args.steps,
        "rank": args.rank,
        "latent": [16, *args.latent],
        "text_len": text_len,
        "text_dim": text_dim,
        "device": args.device,
        "threads": args.threads,
    }
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        model, count = write_model(Path(tmp) / "model", args.heads, args.layers, args.ffn, text_dim)
        runs = {}
        for mode in ("full", "lora"):
            result = Path(tmp) / f"{mode}.json"
            proc = ctx.Process(target=measure, args=(mode, str(model), settings, str(result)))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                raise SystemExit(f"the {mode} run failed (exit code {proc.exitcode})")
            runs[mode] = json.loads(result.read_text())
            print(mode, {k: v for k, v in runs[mode].items() if k != "losses"})
    keys = ("parameter_mb", "gradient_mb", "optimizer_state_mb", "state_mb", "peak_rss_mb")
    ratios = {k: runs["lora"][k] / runs["full"][k] for k in keys if runs["full"][k]}
    if "cuda_peak_allocated_mb" in runs["full"]:
        ratios["cuda_peak_allocated_mb"] = (
            runs["lora"]["cuda_peak_allocated_mb"] / runs["full"]["cuda_peak_allocated_mb"]
        )
    print("lora / full:", {k: round(v, 3) for k, v in ratios.items()})
    record = {
        "benchmark": "lora_memory",
        "model": {
            "dim": args.heads * 64,
            "layers": args.layers,
            "ffn_dim": args.ffn,
            "parameters": count,
        },
        "settings": settings,
        "machine": {
            "torch": torch.__version__,
            "device": args.device,
            "cpu": platform.processor() or platform.machine(),
        },
        "runs": runs,
        "lora_over_full": ratios,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Ulysses sequence parallelism: SP = 2 (two gloo processes on CPU) equals one process.

The parent builds tiny Wan transformers, runs them in one process (the reference) and
saves models, inputs and reference results; two spawned ranks load them, enable SP over
the world group and save their outputs, input gradients, and parameter gradients after
the documented reduction (SUM over the SP group). Cases: Wan2.1 dense and VSA on a token
count that divides by 2 and one that does not; Wan2.2 (per-token timesteps) with VSA on an
odd token count; each also with activation checkpointing (full and selective, which
recompute blocks and their all-to-alls in backward); plus a deepcopy (EMA-like) of an SP
model, disabling SP, and a head count that does not divide by the SP size.
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _tiny_wan import tiny_transformer_config

from fastwan.models.vsa import add_vsa_gates, set_attention

WORLD = 2
# (name, variant, attention, latent grid (T, H, W) before the (1, 2, 2) patch)
CASES = [
    ("dense_even", "wan2.1", "dense", (2, 4, 6)),  # 2 x 2 x 3 = 12 tokens
    ("dense_odd", "wan2.1", "dense", (3, 6, 10)),  # 3 x 3 x 5 = 45 tokens
    ("vsa_even", "wan2.1", "vsa", (2, 8, 8)),  # 2 x 4 x 4 = 32 tokens
    ("vsa_odd", "wan2.1", "vsa", (3, 10, 14)),  # 3 x 5 x 7 = 105 tokens
    ("wan22_vsa_odd", "wan2.2", "vsa", (3, 6, 10)),  # per-token timesteps, 45 tokens
]
TEXT_LEN = 5
AC_MODES = ("full", "selective")  # with fastwan.distributed.activation_checkpoint
PROBE = "blocks.0.ffn.net.0.proj.weight"  # a parameter whose unreduced grads are kept
BATCH = 2


def _build(variant: str, attention: str, seed: int, heads: int = 2) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    config = tiny_transformer_config(variant, num_layers=2)
    config["num_attention_heads"] = heads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # module constructors draw from the global generator
        model = WanTransformer3DModel(**config).eval()
    gates = add_vsa_gates(model)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero gates, so the gate path of VSA counts
        for gate in gates:
            gate.weight.copy_(0.2 * torch.randn(gate.weight.shape, generator=g))
            gate.bias.copy_(0.2 * torch.randn(gate.bias.shape, generator=g))
    if attention == "vsa":
        # Small tiles so the tiny grids have several tiles and top-k really selects.
        set_attention(model, "vsa", sparsity=0.5, tile_size=(2, 2, 2), backend="torch")
    else:
        set_attention(model, "dense")
    return model


def _inputs(variant: str, grid: tuple[int, int, int], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    channels = 48 if variant == "wan2.2" else 16
    T, H, W = grid
    tokens = T * (H // 2) * (W // 2)
    latents = torch.randn(BATCH, channels, T, H, W, generator=g)  # [B, C, T, H, W]
    text = torch.randn(BATCH, TEXT_LEN, 32, generator=g)  # [B, L, text_dim]
    if variant == "wan2.2":
        timestep = torch.rand(BATCH, tokens, generator=g) * 1000  # [B, S] per-token
    else:
        timestep = torch.tensor([250.0, 800.0])  # [B]
    weight = torch.randn(latents.shape, generator=g)  # loss weights, [B, C, T, H, W]
    return {"latents": latents, "text": text, "timestep": timestep, "weight": weight}


def _run(model: torch.nn.Module, inp: dict[str, torch.Tensor]) -> dict[str, object]:
    """Forward + backward of a weighted-sum loss; output, input grads, parameter grads."""
    model.zero_grad(set_to_none=True)
    latents = inp["latents"].clone().requires_grad_(True)
    text = inp["text"].clone().requires_grad_(True)
    out = model(
        hidden_states=latents,
        timestep=inp["timestep"],
        encoder_hidden_states=text,
        return_dict=False,
    )[0]  # [B, C, T, H, W]
    (out * inp["weight"]).sum().backward()
    return {
        "out": out.detach(),
        "d_latents": latents.grad,
        "d_text": text.grad,
    }


def _param_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, port: int, tmp: str) -> None:
    from fastwan.distributed.activation_checkpoint import apply_activation_checkpointing
    from fastwan.distributed.sequence_parallel import (
        disable_sequence_parallel,
        enable_sequence_parallel,
        get_sequence_parallel,
        reduce_sequence_parallel_grads,
    )

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        group = dist.group.WORLD
        results = {}
        for name, *_ in CASES:
            saved = torch.load(Path(tmp) / f"{name}.pt", weights_only=False)
            model = saved["model"]
            enable_sequence_parallel(model, group)
            res = _run(model, saved["inputs"])
            res["unreduced"] = _param_grads(model)[PROBE]
            reduce_sequence_parallel_grads(model, group)
            res["params"] = _param_grads(model)
            # Activation checkpointing recomputes blocks (and their all-to-alls) in backward.
            for mode in AC_MODES:
                apply_activation_checkpointing(model, mode)
                ac = _run(model, saved["inputs"])
                reduce_sequence_parallel_grads(model, group)
                ac["params"] = _param_grads(model)
                res[f"ac_{mode}"] = ac
            apply_activation_checkpointing(model, "none")
            # A deepcopy (an EMA copy) runs SP on the same group; its forward matches.
            ema = copy.deepcopy(model)
            with torch.no_grad():
                res["ema_out"] = ema(
                    hidden_states=saved["inputs"]["latents"],
                    timestep=saved["inputs"]["timestep"],
                    encoder_hidden_states=saved["inputs"]["text"],
                    return_dict=False,
                )[0]
            res["ema_sp"] = get_sequence_parallel(ema) is not None
            # Disabled: a plain one-process model again (no collective is called).
            disable_sequence_parallel(model)
            with torch.no_grad():
                res["plain_out"] = model(
                    hidden_states=saved["inputs"]["latents"],
                    timestep=saved["inputs"]["timestep"],
                    encoder_hidden_states=saved["inputs"]["text"],
                    return_dict=False,
                )[0]
            results[name] = res
        try:
            enable_sequence_parallel(_build("wan2.1", "dense", seed=0, heads=3), group)
            results["odd_heads_error"] = None
        except ValueError as err:
            results["odd_heads_error"] = str(err)
        torch.save(results, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    reference = {}
    for i, (name, variant, attention, grid) in enumerate(CASES):
        model = _build(variant, attention, seed=10 + i)
        inputs = _inputs(variant, grid, seed=100 + i)
        torch.save({"model": copy.deepcopy(model), "inputs": inputs}, tmp / f"{name}.pt")
        ref = _run(model, inputs)
        ref["params"] = _param_grads(model)
        reference[name] = ref
    mp.spawn(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return reference, ranks


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    # float32, and the sums are not the one-process sums: each rank's half of the tokens,
    # the SP gradient reduction and the ranks' single thread reorder them (~1e-6 relative
    # per op, through 2 blocks and backward); a wrong shard or reduction is off by O(1).
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_sp2_forward_backward_equal_one_process(sp_results, case):
    reference, ranks = sp_results
    ref = reference[case]
    assert ref["out"].abs().max() > 0 and len(ref["params"]) > 10
    for r, res in enumerate(ranks):
        got = res[case]
        _close(got["out"], ref["out"], f"rank {r} output")
        _close(got["d_latents"], ref["d_latents"], f"rank {r} latent grad")
        _close(got["d_text"], ref["d_text"], f"rank {r} text grad")
        assert got["params"].keys() == ref["params"].keys()
        for n, g in ref["params"].items():
            _close(got["params"][n], g, f"rank {r} grad of {n}")
        for mode in AC_MODES:
            ac = got[f"ac_{mode}"]
            _close(ac["out"], ref["out"], f"rank {r} output, checkpointing {mode}")
            _close(ac["d_latents"], ref["d_latents"], f"rank {r} latent grad, {mode}")
            for n, g in ref["params"].items():
                _close(ac["params"][n], g, f"rank {r} grad of {n}, checkpointing {mode}")
        _close(got["ema_out"], ref["out"], f"rank {r} deepcopy output")
        assert got["ema_sp"]
        _close(got["plain_out"], ref["out"], f"rank {r} output after disable")


def test_sp_gates_get_gradients_only_with_vsa(sp_results):
    reference, ranks = sp_results
    gate = "blocks.0.to_gate_compress.weight"
    assert gate in ranks[0]["vsa_odd"]["params"] and gate not in ranks[0]["dense_odd"]["params"]
    assert ranks[0]["vsa_odd"]["params"][gate].abs().max() > 0


def test_sp_heads_not_divisible_is_a_value_error(sp_results):
    _, ranks = sp_results
    for res in ranks:
        msg = res["odd_heads_error"]
        assert msg is not None and "num_attention_heads (3)" in msg
        assert "sequence_parallel" in msg


def test_sp_needs_an_initialised_process_group():
    from fastwan.distributed.sequence_parallel import enable_sequence_parallel

    if dist.is_initialized():
        pytest.skip("a process group is already running in this process")
    with pytest.raises(ValueError, match="init_process_group"):
        enable_sequence_parallel(_build("wan2.1", "dense", seed=0), None)


def test_each_rank_holds_its_shards_share_and_the_sum_is_the_gradient(sp_results):
    reference, ranks = sp_results
    for case in ("dense_odd", "vsa_odd"):
        ref = reference[case]["params"][PROBE]
        shares = [res[case]["unreduced"] for res in ranks]
        _close(shares[0] + shares[1], ref, f"{case}: sum of the ranks' shares")
        for share in shares:  # neither share alone is the gradient
            assert (share - ref).abs().max() > 1e-3 * ref.abs().max()

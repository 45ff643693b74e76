"""LoRA files and inference helpers (fastwan.models.lora) and ``fastwan export`` of a LoRA run.

* An adapter written by :func:`save_lora` is a diffusers-format Wan LoRA: diffusers'
  ``WanPipeline.load_lora_weights`` loads it into a tiny ``WanPipeline`` and its transformer
  gives fastwan's adapted model's output (dense attention, bitwise: the same peft layers).
* :func:`load_lora` gives the same model back (VSA included: the gates come from the
  folder's ``vsa_gates.safetensors``); :func:`set_lora_scale` 0 is the base;
  :func:`unload_lora` restores the base bitwise; original-Wan-format LoRAs load through
  diffusers' conversion; keys that match no layer are an error naming them.
* ``fastwan export`` of a trained LoRA checkpoint writes the LoRA folder (the EMA with
  ``--ema``) or, with ``--merge-lora``, a Diffusers folder whose plain transformer computes
  what the trained student did.
"""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_wan import MAX_TEXT_LEN, TEXT_DIM, build_tiny_wan
from safetensors.torch import load_file, save_file
from test_trainer import _loader, _negative, _recipe

from fastwan.config import LoRAConfig
from fastwan.methods.dmd import DMDMethod
from fastwan.models import load_transformer, set_attention
from fastwan.models.export import gates_are_zero
from fastwan.models.lora import (
    GATES_FILE,
    LORA_FILE,
    LORA_META_FILE,
    adapter_names,
    adapter_parameters,
    add_adapter,
    load_lora,
    lora_layers,
    merge_lora,
    save_lora,
    set_lora_scale,
    unload_lora,
    use_adapter,
)
from fastwan.train.trainer import Trainer

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
VSA = {"sparsity": 0.5, "tile_size": (1, 2, 2), "backend": "torch"}


@pytest.fixture(scope="module")
def wan_path(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("tiny_wan"), num_layers=2)


def _inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)  # [1, C, T, H, W]
    t = torch.tensor([600.0])  # [1]
    cond = torch.randn(1, MAX_TEXT_LEN, TEXT_DIM, generator=g)  # [1, L, dim]
    return x, t, cond


def _v(net) -> torch.Tensor:
    x, t, cond = _inputs()
    with torch.no_grad():
        return net(hidden_states=x, timestep=t, encoder_hidden_states=cond, return_dict=False)[0]


def _adapted(wan_path, gates: bool = True):
    """A tiny Wan with a rank-4 adapter (alpha 8: scale 2) whose B is non-zero."""
    net = load_transformer(wan_path)
    targets = TARGETS + (["to_gate_compress"] if gates else [])
    add_adapter(net, "generator", rank=4, alpha=8, target_modules=targets, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in adapter_parameters(net, "generator").items():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


@pytest.fixture(scope="module")
def lora_dir(wan_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    save_lora(_adapted(wan_path), out, "generator", info={"rank": 4})
    return out


def test_diffusers_loads_the_lora_and_computes_the_same(wan_path, lora_dir):
    from diffusers import WanPipeline

    assert {p.name for p in lora_dir.iterdir()} == {LORA_FILE, GATES_FILE, LORA_META_FILE}
    keys = set(load_file(str(lora_dir / LORA_FILE)))
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "transformer.blocks.1.ffn.net.2.lora_B.weight" in keys
    assert not any("to_gate_compress" in k for k in keys)  # no such layer in diffusers' Wan
    gates = load_file(str(lora_dir / GATES_FILE))
    assert set(gates) == {
        f"blocks.{i}.to_gate_compress.{w}" for i in (0, 1) for w in ("weight", "bias")
    }
    assert gates["blocks.0.to_gate_compress.weight"].abs().max() > 0  # the gate adapter, folded

    pipe = WanPipeline.from_pretrained(str(wan_path))
    base = _v(pipe.transformer)
    pipe.load_lora_weights(str(lora_dir))
    ours = _v(_adapted(wan_path))
    assert torch.equal(_v(pipe.transformer), ours)  # dense: diffusers' Wan has no VSA
    assert not torch.allclose(base, ours, atol=1e-3)


def test_load_scale_and_unload(wan_path, lora_dir):
    net = load_transformer(wan_path)
    set_attention(net, "vsa", **VSA)
    base = _v(net)
    want_net = _adapted(wan_path)
    set_attention(want_net, "vsa", **VSA)
    want = _v(want_net)  # VSA with the gates' adapter
    assert load_lora(net, lora_dir, adapter_name="mine") == "mine"
    assert adapter_names(net) == ["mine"] and not gates_are_zero(net)
    assert torch.allclose(_v(net), want, atol=1e-6)  # the gate adapter came folded
    set_lora_scale(net, 0.0)
    off = _v(net)
    # scale 0: the base model's layers, with the folder's gates (full weights, not scaled)
    dense_gates = load_transformer(wan_path)
    dense_gates.load_state_dict(
        {k: v for k, v in load_file(str(lora_dir / GATES_FILE)).items()}, strict=False
    )
    set_attention(dense_gates, "vsa", **VSA)
    assert torch.allclose(off, _v(dense_gates), atol=1e-6)
    set_lora_scale(net, 1.0)
    assert torch.allclose(_v(net), want, atol=1e-6)
    unload_lora(net)
    assert adapter_names(net) == [] and not list(lora_layers(net))
    assert gates_are_zero(net)  # the gates it brought are gone
    assert torch.equal(_v(net), base)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        set_lora_scale(net, 0.5)


def test_two_loras_add_up_and_unload_one_at_a_time(wan_path, lora_dir):
    net = load_transformer(wan_path)
    base = _v(net)
    load_lora(net, lora_dir / LORA_FILE, adapter_name="a")  # a file: no gates
    one = _v(net)
    load_lora(net, lora_dir / LORA_FILE, adapter_name="b", scale=0.5)
    both = _v(net)
    assert not torch.allclose(both, one, atol=1e-5)
    unload_lora(net, "b")
    assert torch.allclose(_v(net), one, atol=1e-6)
    with pytest.raises(ValueError, match="already has an adapter 'a'"):
        load_lora(net, lora_dir, adapter_name="a")
    unload_lora(net)
    assert torch.equal(_v(net), base)


def test_unmatched_keys_are_named_and_nothing_loads(wan_path, lora_dir, tmp_path):
    state = load_file(str(lora_dir / LORA_FILE))
    state["transformer.blocks.7.attn1.to_q.lora_A.weight"] = torch.zeros(4, 32)
    state["transformer.blocks.7.attn1.to_q.lora_B.weight"] = torch.zeros(32, 4)
    state["transformer.blocks.0.norm2.lora_A.weight"] = torch.zeros(4, 32)
    save_file(state, str(tmp_path / "bad.safetensors"))
    net = load_transformer(wan_path)
    with pytest.raises(ValueError, match=r"3 of its \d+ keys match no layer") as err:
        load_lora(net, tmp_path / "bad.safetensors")
    assert "blocks.7.attn1.to_q.lora_A.weight" in str(err.value)
    assert "blocks.0.norm2.lora_A.weight" in str(err.value)
    assert adapter_names(net) == [] and not list(lora_layers(net))
    # a tensor without its pair
    half = {k: v for k, v in load_file(str(lora_dir / LORA_FILE)).items() if "to_q.lora_B" not in k}
    save_file(half, str(tmp_path / "half.safetensors"))
    with pytest.raises(ValueError, match="lora_A or lora_B missing"):
        load_lora(net, tmp_path / "half.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        load_lora(net, tmp_path / "nowhere")


def test_original_wan_format_loads_through_diffusers_conversion(wan_path, tmp_path):
    g = torch.Generator().manual_seed(3)
    down = 0.1 * torch.randn(4, 32, generator=g)  # [r, in]
    up = 0.1 * torch.randn(32, 4, generator=g)  # [out, r]
    original = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up,
        "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(8.0),  # scale 8 / 4 = 2
    }
    save_file(original, str(tmp_path / "wan_format.safetensors"))
    diffusers_format = {
        "transformer.blocks.0.attn1.to_q.lora_A.weight": down,
        "transformer.blocks.0.attn1.to_q.lora_B.weight": 2 * up,  # no metadata: scale 1
    }
    save_file(diffusers_format, str(tmp_path / "diffusers_format.safetensors"))
    a, b = load_transformer(wan_path), load_transformer(wan_path)
    base = _v(a)
    load_lora(a, tmp_path / "wan_format.safetensors")
    load_lora(b, tmp_path / "diffusers_format.safetensors")
    assert torch.allclose(_v(a), _v(b), atol=1e-6)
    assert not torch.allclose(_v(a), base, atol=1e-4)


def test_merge_folds_the_adapter_into_plain_layers(wan_path):
    net = _adapted(wan_path)
    set_attention(net, "vsa", **VSA)
    want = _v(net)
    merge_lora(net)
    assert not list(lora_layers(net)) and isinstance(net.blocks[0].attn1.to_q, torch.nn.Linear)
    assert torch.allclose(_v(net), want, atol=1e-5)


def _export(args: list[str]) -> int:
    import fastwan.cli as cli

    saved = cli.COMMAND_MODULES
    cli.COMMAND_MODULES = ["fastwan.commands.train"]
    try:
        return cli.main(["export", *args])
    finally:
        cli.COMMAND_MODULES = saved


def test_export_of_a_lora_run(wan_path, tmp_path, capsys):
    from diffusers import WanPipeline

    recipe = _recipe("dmd", tmp_path / "run", steps=2, interval=1, ema_decay=0.5)
    recipe.model.teacher = str(wan_path)
    recipe.lora = LoRAConfig(rank=4, gates="lora")
    method = DMDMethod(
        load_transformer(wan_path), recipe.dmd, recipe.vsa, _negative(), lora=recipe.lora, seed=7
    )
    trainer = Trainer(method, recipe, _loader(), log_fn=lambda _l: None)
    trainer.train(2)
    ckpt = trainer.save_checkpoint()
    method.prepare("generator")
    student = _v(method.student)  # VSA, the trained adapter and gate adapter

    out = tmp_path / "lora"
    assert _export([str(ckpt), "--out", str(out)]) == 0
    info = json.loads((out / LORA_META_FILE).read_text())
    assert info["rank"] == 4 and info["step"] == 2 and info["sampling"]["attention"] == "vsa"
    assert info["base_model"] == wan_path.name  # no local path
    net = load_transformer(wan_path)
    set_attention(net, "vsa", **VSA)
    load_lora(net, out)
    assert torch.allclose(_v(net), student, atol=1e-5)
    # diffusers: the same adapter, dense
    pipe = WanPipeline.from_pretrained(str(wan_path))
    pipe.load_lora_weights(str(out))
    set_attention(net, "dense")
    assert torch.allclose(_v(pipe.transformer), _v(net), atol=1e-6)

    # --ema: the adapter's EMA
    ema_out = tmp_path / "lora_ema"
    assert _export([str(ckpt), "--out", str(ema_out), "--ema"]) == 0
    saved = load_file(str(ema_out / LORA_FILE))
    key = "blocks.0.attn1.to_q.lora_B.generator.weight"
    assert torch.equal(
        saved[f"transformer.{key.replace('.generator', '')}"], trainer.ema.shadow[key]
    )
    live = load_file(str(out / LORA_FILE))
    assert not torch.equal(
        saved[f"transformer.{key.replace('.generator', '')}"],
        live[f"transformer.{key.replace('.generator', '')}"],
    )

    # --merge-lora: a Diffusers folder with plain layers computing the trained student
    merged = tmp_path / "merged"
    assert _export([str(ckpt), "--out", str(merged), "--merge-lora"]) == 0
    assert (merged / "fastwan.json").is_file() and (merged / "vae").is_dir()
    plain = load_transformer(merged)
    assert not list(lora_layers(plain))
    set_attention(plain, "vsa", **VSA)
    assert torch.allclose(_v(plain), student, atol=1e-5)
    # a full run's checkpoint refuses --merge-lora
    full = _recipe("dmd", tmp_path / "full", steps=1)
    full.model.teacher = str(wan_path)
    t2 = Trainer(
        DMDMethod(load_transformer(wan_path), full.dmd, full.vsa, _negative()),
        full,
        _loader(),
        log_fn=lambda _l: None,
    )
    rc = _export([str(t2.save_checkpoint()), "--out", str(tmp_path / "x"), "--merge-lora"])
    assert rc != 0 and "without LoRA" in capsys.readouterr().err


def test_use_adapter_names_unknown_adapters(wan_path):
    net = _adapted(wan_path, gates=False)
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        use_adapter(net, "nope")
    use_adapter(net, None)
    assert torch.equal(_v(net), _v(load_transformer(wan_path)))  # adapters off = the base

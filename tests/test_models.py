"""fastwan.models: presets, the VSA gate and processor on diffusers' Wan transformer,
loading (FastVideo gate layout, errors), export round trips, and the denoise benchmark."""

from __future__ import annotations

import argparse
import copy
import json
import warnings

import pytest
import torch
from _tiny_wan import add_fastvideo_gates, build_tiny_wan, tiny_transformer

from fastwan.attention import num_selected_tiles, vsa_reference
from fastwan.models import (
    GATE_NAME,
    PRESETS,
    add_vsa_gates,
    export_pipeline,
    get_attention,
    get_preset,
    has_vsa_gates,
    infer_preset,
    load_components,
    load_transformer,
    read_gate_tensors,
    resolve_model_path,
    save_transformer,
    set_attention,
    transformer_config,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("wan21"), gates="fastvideo")


def _inputs(shape=(1, 16, 3, 10, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)  # [B, C, T, H, W] latents
    ctx = torch.randn(shape[0], 8, 32, generator=g)  # [B, L, text_dim]
    t = torch.tensor([700.0] * shape[0])
    return x, t, ctx


def _fwd(model, x, t, ctx):
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]


def _random_gates(model, seed=1, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in add_vsa_gates(model):
            gate.weight.copy_(std * torch.randn(gate.weight.shape, generator=g))
            gate.bias.copy_(std * torch.randn(gate.bias.shape, generator=g))


# ------------------------------------------------------------------ presets
def test_presets_cover_the_supported_models_with_their_defaults():
    assert set(PRESETS) == {
        "wan2.1-t2v-1.3b",
        "wan2.1-t2v-14b",
        "wan2.1-i2v-14b-480p",
        "wan2.1-i2v-14b-720p",
        "wan2.2-ti2v-5b",
        "fastwan2.1-t2v-1.3b",
        "fastwan2.1-t2v-14b-480p",
        "fastwan2.2-ti2v-5b-fullattn",
        "toy-teacher",
        "toy-student",
        "toy-i2v-teacher",
        "toy-i2v-student",
    }
    toy = get_preset("toy-student")  # the embedded toy world: weights ship with fastwan
    assert toy.bundled and toy.tile_size == (2, 2, 2) and toy.text_length == 16
    assert toy.latent_shape() == (15, 8, 8, 8) and toy.few_step and toy.sparsity == 0.75
    toy_i2v = get_preset("toy-i2v-student")
    assert toy_i2v.expand_timesteps and toy_i2v.task == "ti2v" and toy_i2v.bundled
    fast = get_preset("FastVideo/FastWan2.1-T2V-1.3B-Diffusers")  # a hub id works too
    assert fast.name == "fastwan2.1-t2v-1.3b"
    assert fast.timesteps == (1000, 757, 522) and fast.attention == "vsa"
    # FastVideo's FastWanT2V480PConfig: the 61 x 448 x 832 clips FastWan was trained on
    assert fast.flow_shift == 8 and (fast.height, fast.width, fast.num_frames) == (448, 832, 61)
    assert get_preset("fastwan2.1-t2v-14b").sparsity == 0.9  # trained and run at VSA 0.9
    assert get_preset("wan2.1-t2v-14b").flow_shift == 3
    five = get_preset("Wan2.2-TI2V-5B")
    assert five.flow_shift == 5 and five.in_channels == 48 and five.expand_timesteps
    assert five.vae_stride == (4, 16, 16) and five.latent_shape() == (48, 31, 44, 80)
    assert get_preset("wan2.1-t2v-1.3b").latent_shape() == (16, 21, 60, 104)
    assert not get_preset("wan2.1-t2v-1.3b").few_step
    assert get_preset("wan2.1-t2v-1.3b").guidance_scale > 1
    assert get_preset("fastwan2.2-ti2v-5b").attention == "dense"  # the FullAttn release


def test_unknown_preset_and_bad_fields_raise_value_errors():
    with pytest.raises(ValueError, match="unknown preset 'wan9'.*choose one of"):
        get_preset("wan9")
    with pytest.raises(ValueError, match="unknown preset fields"):
        get_preset("wan2.1-t2v-1.3b").replace(heigth=480)
    with pytest.raises(ValueError, match="height must be a positive int"):
        get_preset("wan2.1-t2v-1.3b").replace(height=0)


def test_infer_preset_from_architecture():
    cfg = transformer_config(get_preset("wan2.1-t2v-1.3b"))
    assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == 1536
    assert infer_preset("/some/dir", cfg, has_gates=False).name == "wan2.1-t2v-1.3b"
    assert infer_preset("/some/dir", cfg, has_gates=True).name == "fastwan2.1-t2v-1.3b"
    with pytest.raises(ValueError, match="pass preset="):
        infer_preset("/some/dir", {"num_attention_heads": 2, "attention_head_dim": 16}, False)


# ------------------------------------------------------------------ gate + processor
def test_gates_are_zero_initialised_and_keyed_like_fastvideo():
    model = tiny_transformer()
    assert not has_vsa_gates(model)
    gates = add_vsa_gates(model)
    assert has_vsa_gates(model) and len(gates) == 2
    keys = [k for k in model.state_dict() if GATE_NAME in k]
    assert keys == [
        "blocks.0.to_gate_compress.weight",
        "blocks.0.to_gate_compress.bias",
        "blocks.1.to_gate_compress.weight",
        "blocks.1.to_gate_compress.bias",
    ]
    assert all(torch.count_nonzero(g.weight) + torch.count_nonzero(g.bias) == 0 for g in gates)
    assert add_vsa_gates(model)[0] is gates[0]  # idempotent


def test_vsa_with_sparsity_zero_and_zero_gate_equals_dense():
    torch.manual_seed(0)
    model = tiny_transformer()
    x, t, ctx = _inputs()  # grid (3, 5, 6): not a multiple of the 4x4x4 tile
    dense = _fwd(model, x, t, ctx)  # stock diffusers processors
    set_attention(model, "vsa", sparsity=0.0, backend="torch")
    assert get_attention(model)["mode"] == "vsa"
    torch.testing.assert_close(_fwd(model, x, t, ctx), dense, rtol=1e-5, atol=1e-5)
    set_attention(model, "dense")
    assert torch.equal(_fwd(model, x, t, ctx), dense)  # dense mode is diffusers' processor


def test_vsa_sparse_matches_reference_backend_and_differs_from_dense():
    torch.manual_seed(0)
    model = tiny_transformer()
    _random_gates(model)
    x, t, ctx = _inputs()
    dense = _fwd(model, x, t, ctx)
    set_attention(model, "vsa", sparsity=0.75, backend="torch")
    fast = _fwd(model, x, t, ctx)
    set_attention(model, "vsa", sparsity=0.75, backend="reference")
    ref = _fwd(model, x, t, ctx)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert (fast - dense).abs().max() > 1e-2  # sparsity and gate really act


def test_vsa_processor_equals_reference_vsa_on_diffusers_qkv(monkeypatch):
    """Layer-level oracle: q, k, v as diffusers computes them (captured from its own
    processor), the gate from the same input, fed to the reference VSA."""
    import diffusers.models.transformers.transformer_wan as tw

    torch.manual_seed(0)
    model = tiny_transformer()
    _random_gates(model)
    attn, gate = model.blocks[0].attn1, model.blocks[0].to_gate_compress
    captured = {}
    orig_dispatch = tw.dispatch_attention_fn

    def capture(q, k, v, **kw):  # [B, S, H, D]
        captured["qkv"] = (q, k, v)
        return orig_dispatch(q, k, v, **kw)

    seen = {}
    attn.register_forward_hook(
        lambda m, a, out: seen.update(inp=a[0], rope=a[3], out=out), with_kwargs=False
    )
    x, t, ctx = _inputs(shape=(1, 16, 2, 8, 12))  # grid (2, 4, 6)
    set_attention(model, "vsa", sparsity=0.5, backend="torch")
    _fwd(model, x, t, ctx)
    vsa_out, inp, rope = seen["out"], seen["inp"], seen["rope"]
    monkeypatch.setattr(tw, "dispatch_attention_fn", capture)
    with torch.no_grad():
        tw.WanAttnProcessor()(attn, inp, None, None, rope)
        q, k, v = (z.transpose(1, 2) for z in captured["qkv"])  # [B, H, S, D]
        g = gate(inp).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        topk = num_selected_tiles(2, 0.5)  # grid (2, 4, 6) holds 1 x 1 x 2 tiles of 4x4x4
        expect, _ = vsa_reference(q, k, v, grid=(2, 4, 6), topk=topk, gate=g)
        expect = attn.to_out[0](expect.transpose(1, 2).flatten(2))
    torch.testing.assert_close(vsa_out, expect, rtol=1e-5, atol=1e-5)


def test_teacher_and_student_switch_independently_and_deepcopy_is_independent():
    torch.manual_seed(0)
    teacher = tiny_transformer()
    student = copy.deepcopy(teacher)
    _random_gates(student)
    x, t, ctx = _inputs()
    dense = _fwd(teacher, x, t, ctx)
    set_attention(student, "vsa", sparsity=0.5, backend="torch")
    sparse = _fwd(student, x, t, ctx)
    set_attention(teacher, "dense")
    assert torch.equal(_fwd(teacher, x, t, ctx), dense)
    assert torch.equal(_fwd(student, x, t, ctx), sparse)  # the teacher's switch left it alone
    ema = copy.deepcopy(student)  # its own processors, gates and grid state
    set_attention(ema, "dense")
    assert get_attention(student)["mode"] == "vsa"
    x2, t2, ctx2 = _inputs(shape=(1, 16, 1, 8, 8), seed=3)  # a different grid on the copy
    _fwd(ema, x2, t2, ctx2)
    assert torch.equal(_fwd(student, x, t, ctx), sparse)
    assert ema.blocks[0].attn1.processor.gate is ema.blocks[0].to_gate_compress
    assert ema.blocks[0].to_gate_compress is not student.blocks[0].to_gate_compress


def test_set_attention_validates_its_arguments():
    model = tiny_transformer()
    with pytest.raises(ValueError, match="needs sparsity="):
        set_attention(model, "vsa")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        set_attention(model, "vsa", sparsity=1.0)
    with pytest.raises(ValueError, match="attention mode must be one of"):
        set_attention(model, "sparse", sparsity=0.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        set_attention(model, "vsa", sparsity=0.5, backend="cuda")
    with pytest.raises(ValueError, match="tile_size must be three positive ints"):
        set_attention(model, "vsa", sparsity=0.5, tile_size=(4, 4))
    with pytest.raises(ValueError, match="expected a diffusers WanTransformer3DModel"):
        set_attention(torch.nn.Linear(2, 2), "dense")


# ------------------------------------------------------------------ loading + export
def test_fastvideo_gate_keys_load_into_the_right_layers(tiny_dir):
    stored = read_gate_tensors(tiny_dir)
    assert len(stored) == 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_transformer(tiny_dir, attention="vsa", sparsity=0.5, backend="torch")
    assert not [w for w in caught if "were not used" in str(w.message)]  # gates are known
    for n, block in enumerate(model.blocks):
        assert torch.equal(
            block.to_gate_compress.weight, stored[f"blocks.{n}.to_gate_compress.weight"]
        )
        assert torch.equal(block.to_gate_compress.bias, stored[f"blocks.{n}.to_gate_compress.bias"])
    assert not torch.equal(
        model.blocks[0].to_gate_compress.weight, model.blocks[1].to_gate_compress.weight
    )
    assert get_attention(model)["sparsity"] == 0.5


def test_checkpoint_without_gates_gets_zero_gates(tmp_path):
    path = build_tiny_wan(tmp_path / "plain")
    assert read_gate_tensors(path) == {}
    model = load_transformer(path / "transformer")  # the subfolder works too
    assert has_vsa_gates(model)
    assert all(torch.count_nonzero(b.to_gate_compress.weight) == 0 for b in model.blocks)


def test_export_round_trips_bit_exactly_and_loads_in_stock_diffusers(tiny_dir, tmp_path):
    from diffusers import WanTransformer3DModel
    from safetensors import safe_open

    model = load_transformer(tiny_dir, attention="vsa", sparsity=0.5, backend="torch")
    with torch.no_grad():  # a "trained" model: every weight differs from the checkpoint's
        for p in model.parameters():
            p.add_(0.01)
    out = save_transformer(model, tmp_path / "export")
    again = load_transformer(out, attention="vsa", sparsity=0.5, backend="torch")
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    x, t, ctx = _inputs()
    assert torch.equal(_fwd(model, x, t, ctx), _fwd(again, x, t, ctx))

    stock = WanTransformer3DModel.from_pretrained(str(out))
    stock_sd = stock.state_dict()
    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), "pt") as f:
        saved_keys = set(f.keys())
    assert saved_keys - set(stock_sd) == {k for k in sd if GATE_NAME in k}  # the only extras
    assert all(torch.equal(stock_sd[k], sd[k]) for k in stock_sd)
    set_attention(model, "dense")
    assert torch.equal(_fwd(stock, x, t, ctx), _fwd(model, x, t, ctx))


def test_export_pipeline_writes_a_loadable_folder(tiny_dir, tmp_path):
    model = load_transformer(tiny_dir)
    out = export_pipeline(tiny_dir, model, tmp_path / "pipe")
    comps = load_components(out, preset="fastwan2.1-t2v-1.3b")
    assert torch.equal(
        comps.transformer.blocks[1].to_gate_compress.weight, model.blocks[1].to_gate_compress.weight
    )
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    with pytest.raises(ValueError, match="not empty"):
        export_pipeline(tiny_dir, model, out)


def test_gate_tensors_for_a_different_model_are_rejected(tmp_path):
    path = build_tiny_wan(tmp_path / "two", num_layers=2)
    add_fastvideo_gates(path / "transformer")
    cfg = json.loads((path / "transformer" / "config.json").read_text())
    cfg["num_layers"] = 1  # now the checkpoint's block-1 gate has no block to go to
    (path / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"gates for blocks \[1\] but the transformer has 1"):
        load_transformer(path)


def test_loading_errors_name_the_problem_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="does not exist; pass a local Diffusers-format"):
        resolve_model_path(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no model_index.json"):
        load_components(tmp_path / "empty")
    path = build_tiny_wan(tmp_path / "novae")
    import shutil

    shutil.rmtree(path / "vae")
    with pytest.raises(ValueError, match="missing the 'vae' component"):
        load_components(path)

    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(
        ValueError, match="could not download 'FastVideo/FastWan2.1-T2V-1.3B-Diffusers'.*local path"
    ):
        resolve_model_path("fastwan2.1-t2v-1.3b")  # a preset name means its hub id
    with pytest.raises(ValueError, match="could not download 'someone/some-model'.*--model DIR"):
        resolve_model_path("someone/some-model")


# ------------------------------------------------------------------ benchmark
def test_bench_denoise_reports_measured_ratios(tmp_path):
    from fastwan.bench import denoise

    parser = argparse.ArgumentParser()
    denoise.add_arguments(parser)
    out = tmp_path / "bench.json"
    flags = "--height 64 --width 64 --num-frames 9 --layers 1 --text-len 8 --repeats 2"
    args = parser.parse_args([*flags.split(), "--sparsities", "0.5", "0.75", "--json", str(out)])
    report = denoise.run(args)
    assert report["tokens"] == 3 * 4 * 4 and report["layers"] == 1
    t_dense = report["times"]["dense"]["median_s"]
    for r in report["results"]:
        assert r["forward_s"] == report["times"][f"vsa_{r['sparsity']:g}"]["median_s"] > 0
        assert r["projected_speedup"] == pytest.approx(50 * 2 * t_dense / (3 * r["forward_s"]))
        best = report["times"][f"vsa_{r['sparsity']:g}"]["min_s"]
        assert r["projected_speedup_min"] == pytest.approx(
            50 * 2 * report["times"]["dense"]["min_s"] / (3 * best)
        )
    assert all(v["runs"] == 2 for v in report["times"].values())
    assert report["goal"]["applies"] is False  # not the 480P shape
    assert json.loads(out.read_text())["results"][0]["sparsity"] == 0.5
    with pytest.raises(ValueError, match="--sparsities"):
        denoise.run(parser.parse_args(["--sparsities", "1.5", "--layers", "1"]))
    # compiled blocks: one untimed warm-up round (the compiles), then the timed ones
    args = parser.parse_args([*flags.split(), "--sparsities", "0.5", "--compile", "aot_eager"])
    report = denoise.run(args)
    assert report["compile"] == "aot_eager" and report["warmup"] == 1
    assert all(v["runs"] == 2 for v in report["times"].values())

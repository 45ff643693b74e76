"""First contact with real checkpoints: a folder's own files decide how it samples, loads
are loud about incomplete weights, and exports load in diffusers and reload in fastwan.

Identity tests use folders laid out exactly as the published ones (their real
``config.json`` keys and values, ``model_index.json``, scheduler configs, a sharded
safetensors index with the real key names) but no tensors: identification reads JSON and
key names only. Loading and sampling tests use tiny pipelines that diffusers builds."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_wan import add_fastvideo_gates, build_tiny_wan

from fastwan.models.identity import MAX_LATENT_TOKENS, SIDECAR_NAME, check_video_size
from fastwan.models.loading import (
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    expected_weight_keys,
    identify_folder,
    load_transformer,
)
from fastwan.models.presets import WAN_NEGATIVE_PROMPT
from fastwan.pipeline import VideoGenerator

# --------------------------------------------------------------- published layouts

_COMMON = {
    "_class_name": "WanTransformer3DModel",
    "_diffusers_version": "0.33.0.dev0",
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "freq_dim": 256,
    "image_dim": None,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}
TRANSFORMERS = {  # the transformer/config.json of each published checkpoint
    "wan2.1-1.3b": {
        **_COMMON,
        "ffn_dim": 8960,
        "in_channels": 16,
        "num_attention_heads": 12,
        "num_layers": 30,
        "out_channels": 16,
    },
    "wan2.1-14b": {
        **_COMMON,
        "ffn_dim": 13824,
        "in_channels": 16,
        "num_attention_heads": 40,
        "num_layers": 40,
        "out_channels": 16,
    },
    "wan2.2-5b": {
        **_COMMON,
        "ffn_dim": 14336,
        "in_channels": 48,
        "num_attention_heads": 24,
        "num_layers": 30,
        "out_channels": 48,
        "pos_embed_seq_len": None,
    },
}
UNIPC = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.33.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}


def write_published_layout(
    root: Path,
    kind: str,
    *,
    pipeline_class: str = "WanPipeline",
    gates: bool = False,
    flow_shift: float = 3.0,
    extra_index: dict | None = None,
) -> Path:
    """A pipeline folder with the published files (configs, model_index.json, a sharded
    weight index with the real key names) and no tensors."""
    config = TRANSFORMERS[kind]
    wan22 = kind == "wan2.2-5b"
    index = {
        "_class_name": pipeline_class,
        "_diffusers_version": "0.33.0.dev0",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    if wan22:
        index.update(boundary_ratio=None, expand_timesteps=True, transformer_2=[None, None])
    index.update(extra_index or {})
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(index))
    for name in ("text_encoder", "tokenizer", "scheduler", "vae", "transformer"):
        (root / name).mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**UNIPC, "flow_shift": flow_shift})
    )
    vae = {"_class_name": "AutoencoderKLWan", "z_dim": 48 if wan22 else 16}
    if wan22:
        vae.update(scale_factor_spatial=16, scale_factor_temporal=4, patch_size=2)
    (root / "vae" / "config.json").write_text(json.dumps(vae))
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    keys = sorted(expected_weight_keys(config))
    if gates:
        keys += [
            f"blocks.{n}.to_gate_compress.{w}"
            for n in range(config["num_layers"])
            for w in ("weight", "bias")
        ]
    half = len(keys) // 2
    weight_map = {
        k: f"diffusion_pytorch_model-0000{1 + (i >= half)}-of-00002.safetensors"
        for i, k in enumerate(keys)
    }
    (root / "transformer" / WEIGHTS_INDEX_NAME).write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    return root


def test_fastwan_5b_in_a_folder_of_the_users_naming_samples_few_step(tmp_path):
    folder = write_published_layout(
        tmp_path / "fastwan-5b", "wan2.2-5b", pipeline_class="WanDMDPipeline", flow_shift=5.0
    )
    _, ident = identify_folder(folder)
    p = ident.preset
    assert p.timesteps == (1000, 757, 522) and p.guidance_scale == 1.0
    assert ident.sources["timesteps"].startswith("model_index.json (WanDMDPipeline")
    assert p.attention == "dense"  # FullAttn: no gates
    assert p.expand_timesteps and ident.sources["expand_timesteps"] == "model_index.json"
    assert p.flow_shift == 5.0 and ident.sources["flow_shift"] == "scheduler_config.json"
    assert ident.matched == "fastwan2.2-ti2v-5b-fullattn (matched by its architecture)"
    assert (p.height, p.width, p.num_frames, p.fps) == (704, 1280, 121, 24)
    assert p.vae_stride == (4, 16, 16)


def test_a_hub_cache_snapshot_is_recognised_by_its_cache_name(tmp_path):
    snap = tmp_path / "models--FastVideo--FastWan2.2-TI2V-5B-FullAttn-Diffusers" / "snapshots"
    folder = write_published_layout(snap / "3f1c0a9", "wan2.2-5b", pipeline_class="WanDMDPipeline")
    _, ident = identify_folder(folder)
    assert ident.matched == "fastwan2.2-ti2v-5b-fullattn (matched by the hub cache name)"
    assert ident.preset.few_step


def test_base_wan_samples_with_the_shift_its_scheduler_states(tmp_path):
    folder = write_published_layout(tmp_path / "Wan2.1-T2V-1.3B-Diffusers", "wan2.1-1.3b")
    _, ident = identify_folder(folder)
    p = ident.preset
    assert p.flow_shift == 3.0 and ident.sources["flow_shift"] == "scheduler_config.json"
    assert not p.few_step and p.num_inference_steps == 50 and p.attention == "dense"
    assert p.negative_prompt == WAN_NEGATIVE_PROMPT  # what no file says: the preset's
    assert ident.sources["negative_prompt"] == "preset wan2.1-t2v-1.3b"
    # a user's fine-tune with another shift in its scheduler: the file wins
    other = write_published_layout(tmp_path / "my-finetune", "wan2.1-1.3b", flow_shift=7.0)
    _, ident = identify_folder(other)
    assert ident.preset.flow_shift == 7.0
    assert ident.matched == "wan2.1-t2v-1.3b (matched by its architecture)"


def test_fastwan_14b_runs_at_vsa_0_9(tmp_path):
    folder = write_published_layout(
        tmp_path / "fastwan-14b", "wan2.1-14b", pipeline_class="WanDMDPipeline", gates=True
    )
    _, ident = identify_folder(folder)
    assert ident.has_gates and ident.preset.attention == "vsa"
    assert ident.preset.sparsity == 0.9
    assert ident.matched.startswith("fastwan2.1-t2v-14b-480p")
    assert ident.preset.few_step


def test_two_expert_wan22_is_refused_with_the_reason(tmp_path):
    folder = write_published_layout(
        tmp_path / "a14b",
        "wan2.1-14b",
        extra_index={"boundary_ratio": 0.875, "transformer_2": ["diffusers", "X"]},
    )
    with pytest.raises(ValueError, match="two-expert Wan2.2 model"):
        identify_folder(folder)


def test_sizes_past_the_rotary_table_or_sane_bounds_are_refused_before_loading(tmp_path):
    _, toy = identify_folder("toy-teacher")  # rope_max_seq_len 64, VAE x2, patch 2
    check_video_size(toy, 16, 16, 64)
    with pytest.raises(ValueError, match=r"num_frames=65 needs 65 positions.*largest num_frames"):
        check_video_size(toy, 16, 16, 65)
    with pytest.raises(ValueError, match="height=4096 needs 1024 positions.*largest height it "):
        check_video_size(toy, 4096, 16, 8)
    with pytest.raises(ValueError, match="num_frames=1000000"):
        check_video_size(toy, 16, 16, 1_000_000)
    _, wan = identify_folder(write_published_layout(tmp_path / "w", "wan2.1-1.3b"))
    with pytest.raises(ValueError, match=f"sanity bound of {MAX_LATENT_TOKENS}"):
        check_video_size(wan, 8192, 8192, 401)
    with pytest.raises(ValueError, match="num_frames must be a positive int"):
        check_video_size(wan, 480, 832, -3)


# --------------------------------------------------------------- tiny real pipelines


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_any_diffusers_wan_folder_reproduces_wan_pipeline_with_no_override(tmp_path, scheduler):
    from _tiny_wan import tiny_scheduler
    from diffusers import WanPipeline

    folder = build_tiny_wan(tmp_path / "my-tiny-wan", scheduler=scheduler)
    if scheduler == "euler":  # a shift no preset has: it must come from the file
        tiny_scheduler("euler", shift=5.0).save_pretrained(folder / "scheduler")
    call = dict(prompt="a red cat runs on the road", height=32, width=48, num_frames=5)
    pipe = WanPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        **call, num_inference_steps=3, guidance_scale=4.0, generator=torch.manual_seed(3)
    ).frames
    gen = VideoGenerator.from_pretrained(folder, attention="dense", device="cpu")
    out = gen.generate(**call, num_inference_steps=3, guidance_scale=4.0, seed=3)
    np.testing.assert_allclose(out.frames, ref, rtol=0, atol=1e-5)
    assert gen.identity.matched is None
    assert gen.sampling_sources["flow_shift"] == "scheduler_config.json"
    assert gen.preset.flow_shift == (5.0 if scheduler == "euler" else 3.0)
    assert gen.sampling_sources["negative_prompt"] == "diffusers WanPipeline default"
    assert out.sampling_sources["guidance_scale"] == "argument"
    assert out.sampling_sources["max_sequence_length"] == "diffusers WanPipeline default"


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("gated") / "fastwan-tiny", gates="fastvideo")


def _rewrite_weights(folder: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    file = folder / "transformer" / WEIGHTS_NAME
    state = load_file(file)
    edit(state)
    save_file(state, file, metadata={"format": "pt"})
    return folder


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_gate_blocks_are_named_and_refused_when_strict(gated, tmp_path):
    folder = _rewrite_weights(
        _copy(gated, tmp_path / "m"),
        lambda s: [s.pop(f"blocks.1.to_gate_compress.{w}") for w in ("weight", "bias")],
    )
    with pytest.warns(UserWarning, match=r"blocks \[1\] have no gate.*coarse branch is off"):
        model = load_transformer(folder, attention="vsa", sparsity=0.5)
    assert model.blocks[1].to_gate_compress.weight.abs().sum() == 0
    assert model.blocks[0].to_gate_compress.weight.abs().sum() > 0
    with pytest.raises(ValueError, match=r"blocks \[1\] have no gate.*strict load"):
        load_transformer(folder, strict=True)


def test_a_gate_weight_without_its_bias_keeps_a_zero_gate_and_says_so(gated, tmp_path):
    folder = _rewrite_weights(
        _copy(gated, tmp_path / "p"), lambda s: s.pop("blocks.0.to_gate_compress.bias")
    )
    with pytest.warns(UserWarning, match="block 0 lacks to_gate_compress.bias"):
        model = load_transformer(folder)
    assert model.blocks[0].to_gate_compress.weight.abs().sum() == 0  # half a gate: not loaded


def test_misnamed_gates_and_unknown_keys_are_named(gated, tmp_path):
    def edit(state):
        state["blocks.0.attn1.to_gate_compress.weight"] = state.pop(
            "blocks.0.to_gate_compress.weight"
        )
        state["blocks.0.extra_thing"] = torch.zeros(2)

    folder = _rewrite_weights(_copy(gated, tmp_path / "n"), edit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_transformer(folder)
    text = " ".join(str(w.message) for w in caught)
    assert "blocks.0.attn1.to_gate_compress.weight" in text and "not named blocks.N" in text
    assert "blocks.0.extra_thing" in text and "not used by WanTransformer3DModel" in text
    with pytest.raises(ValueError, match="strict load"):
        load_transformer(folder, strict=True)


def test_a_missing_weight_is_an_error_at_load_time_naming_the_key(gated, tmp_path):
    folder = _rewrite_weights(
        _copy(gated, tmp_path / "w"), lambda s: s.pop("blocks.1.ffn.net.0.proj.weight")
    )
    with pytest.raises(ValueError, match=r"lack 1 tensors.*blocks\.1\.ffn\.net\.0\.proj\.weight"):
        load_transformer(folder)


def test_a_missing_weight_in_a_sharded_checkpoint_names_the_index(tmp_path):
    from _tiny_wan import tiny_transformer

    model = tiny_transformer()
    tdir = tmp_path / "transformer"
    model.save_pretrained(str(tdir), max_shard_size="20KB")
    index_file = tdir / WEIGHTS_INDEX_NAME
    index = json.loads(index_file.read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    index["weight_map"].pop("blocks.0.attn2.to_k.weight")
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{WEIGHTS_INDEX_NAME}.*blocks.0.attn2.to_k.weight"):
        load_transformer(tdir)


# --------------------------------------------------------------- exports


def _configs(folder: Path):
    return [json.loads(f.read_text()) for f in folder.rglob("*config*.json")]


def test_export_loads_in_diffusers_and_reloads_in_fastwan_as_trained(gated, tmp_path):
    from diffusers import DiffusionPipeline
    from safetensors import safe_open

    src = _copy(gated, tmp_path / "fastwan-src")
    index = json.loads((src / "model_index.json").read_text())
    (src / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanDMDPipeline"}))
    from fastwan.models.export import export_pipeline

    model = load_transformer(src)
    sampling = dict(attention="vsa", sparsity=0.6, tile_size=[2, 2, 2], height=32, width=48)
    out = export_pipeline(src, model, tmp_path / "export", sampling=sampling)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    assert all("_name_or_path" not in c for c in _configs(out))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe).__name__ == "WanPipeline"
    # fastwan: no preset matches the tiny size; the sidecar and the files say everything
    gen = VideoGenerator.from_pretrained(out, device="cpu")
    assert gen.identity.matched is None
    assert gen.preset.timesteps == (1000, 757, 522) and gen.preset.guidance_scale == 1.0
    assert gen.attention["mode"] == "vsa" and gen.attention["sparsity"] == 0.6
    assert gen.sampling_sources["sparsity"] == SIDECAR_NAME
    assert (gen.preset.height, gen.preset.width, gen.preset.tile_size) == (32, 48, (2, 2, 2))
    with safe_open(str(out / "transformer" / WEIGHTS_NAME), "pt") as f:
        assert "blocks.1.to_gate_compress.bias" in f.keys()
    for a, b in zip(gen.transformer.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)  # a copy of stored tensors: exact by construction


def test_a_dense_student_exports_no_gate_tensors(tmp_path, caplog):
    from diffusers import WanTransformer3DModel
    from safetensors import safe_open

    from fastwan.models.export import export_pipeline

    src = build_tiny_wan(tmp_path / "dense")
    model = load_transformer(src)  # zero gates added on load
    out = export_pipeline(src, model, tmp_path / "export", sampling={"attention": "dense"})
    with safe_open(str(out / "transformer" / WEIGHTS_NAME), "pt") as f:
        assert not [k for k in f.keys() if "gate" in k]
    with caplog.at_level("WARNING"):
        WanTransformer3DModel.from_pretrained(str(out / "transformer"))
    assert "were not used" not in caplog.text
    assert VideoGenerator.from_pretrained(out, device="cpu").attention["mode"] == "dense"


def test_export_sampling_records_the_recipe(tmp_path):
    from fastwan.commands.train import export_sampling
    from fastwan.config import load_recipe

    recipe = load_recipe(
        Path(__file__).parents[1] / "recipes" / "wan2.1_t2v_14b_sparse_distill.yaml"
    )
    sampling = export_sampling(recipe)
    assert sampling["timesteps"] == list(recipe.dmd.denoising_timesteps)
    assert sampling["sparsity"] == recipe.vsa.sparsity == 0.9
    assert (sampling["height"], sampling["width"], sampling["num_frames"]) == (448, 832, 61)
    assert sampling["guidance_scale"] == 1.0 and sampling["attention"] == "vsa"


def test_partial_gates_warn_through_the_generator_and_strict_refuses(gated, tmp_path):
    folder = _copy(gated, tmp_path / "g")
    add_fastvideo_gates(folder / "transformer")  # complete again (fresh random gates)
    _rewrite_weights(folder, lambda s: s.pop("blocks.0.to_gate_compress.weight"))
    with pytest.raises(ValueError, match="block 0 lacks to_gate_compress.weight"):
        VideoGenerator.from_pretrained(folder, device="cpu", strict=True)


def test_task_of_a_folder_and_the_i2v_presets():
    from fastwan.models.identity import task_of
    from fastwan.models.presets import get_preset

    assert task_of({"_class_name": "WanPipeline"}, {}) == "t2v"
    assert task_of({"_class_name": "WanImageToVideoPipeline"}, {}) == "i2v"
    assert task_of({"image_encoder": ["transformers", "CLIPVisionModel"]}, {}) == "i2v"
    assert task_of({}, {"image_dim": 1280}) == "i2v"
    assert task_of({"expand_timesteps": True}, {}) == "ti2v"
    p480, p720 = get_preset("wan2.1-i2v-14b-480p"), get_preset("wan2.1-i2v-14b-720p")
    assert p480.task == p720.task == "i2v" and p480.in_channels == 36
    assert (p480.height, p480.width, p720.height, p720.width) == (480, 832, 720, 1280)
    assert p480.num_inference_steps == p720.num_inference_steps == 40
    assert get_preset("wan2.2-ti2v-5b").task == "ti2v"
    assert get_preset("wan2.1-t2v-1.3b").task == "t2v"


def test_sidecar_with_unknown_or_misplaced_keys_is_refused(tmp_path):
    """A hand-edited fastwan.json whose setting sits beside "sampling" (or is misspelt)
    would be ignored: it is refused with the key named instead."""
    from fastwan.models.identity import read_sidecar

    file = tmp_path / SIDECAR_NAME
    good = {"format_version": 1, "sampling": {"timesteps": [1000, 757, 522]}}
    file.write_text(json.dumps(good))
    assert read_sidecar(tmp_path)["timesteps"] == (1000, 757, 522)
    for bad, message in (
        ({**good, "timesteps": [1000, 500]}, r"unknown top-level keys \['timesteps'\]"),
        ({**good, "sampling": {"timestep": [1000]}}, r"unknown sampling fields \['timestep'\]"),
        ([1, 2], "must hold a JSON object"),
        ({**good, "format_version": 7}, "format_version 7"),
    ):
        file.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            read_sidecar(tmp_path)


@pytest.mark.parametrize(
    ("shipped", "text_to_video"),
    [("toy-i2v-teacher", "toy-teacher"), ("toy-i2v-student", "toy-student")],
)
def test_a_renamed_image_to_video_folder_matches_its_own_preset(tmp_path, shipped, text_to_video):
    # the toy I2V pair has the text-to-video pair's architecture; expand_timesteps tells them
    # apart (by architecture alone a renamed I2V folder was taken for its T2V twin)
    import shutil

    from fastwan.toy.assets import WEIGHTS_DIR

    folder = shutil.copytree(WEIGHTS_DIR / shipped, tmp_path / "my-model")
    _, ident = identify_folder(folder)
    assert ident.matched == f"{shipped} (matched by its architecture)"
    assert ident.preset.expand_timesteps and ident.task == "ti2v"
    twin = shutil.copytree(WEIGHTS_DIR / text_to_video, tmp_path / "my-t2v-model")
    assert identify_folder(twin)[1].matched == f"{text_to_video} (matched by its architecture)"


def test_the_effective_preset_states_the_folders_task_not_the_presets(tmp_path):
    # an image-to-video folder sampled with its text-to-video twin's preset (same
    # architecture) is still image-to-video: identity.task and identity.preset.task agree
    import shutil

    from fastwan.toy.assets import WEIGHTS_DIR

    folder = shutil.copytree(WEIGHTS_DIR / "toy-i2v-teacher", tmp_path / "my-model")
    _, ident = identify_folder(folder, preset="toy-teacher")
    assert ident.task == ident.preset.task == "ti2v"
    _, ident = identify_folder(WEIGHTS_DIR / "toy-teacher", preset="toy-i2v-teacher")
    assert ident.task == ident.preset.task == "t2v"

"""Typed configs and YAML recipes: validation, overrides, round trips, the shipped recipes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fastwan.config import (
    ConfigError,
    DataConfig,
    DMDConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    Recipe,
    TrainConfig,
    VSAConfig,
    dump_recipe,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    torch_dtype,
)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
R13 = RECIPES / "wan2.1_t2v_1.3b_sparse_distill.yaml"
R14 = RECIPES / "wan2.1_t2v_14b_sparse_distill.yaml"
R5 = RECIPES / "wan2.2_ti2v_5b_datafree_distill.yaml"


def _minimal(**sections) -> dict:
    data = {"model": {"teacher": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"}}
    data.update(sections)
    return data


# ----------------------------------------------------------------------- shipped recipes


def test_all_recipes_load_and_validate():
    paths = sorted(RECIPES.glob("*.yaml"))
    assert {R13, R14, R5} <= set(paths)
    for path in paths:
        recipe = load_recipe(path)
        t, p = recipe.train, recipe.parallel
        assert t.global_batch_size == (
            t.micro_batch_size * t.gradient_accumulation_steps * p.data_parallel_size
        ), path
        assert p.replicate * p.shard * p.sequence_parallel == p.world_size, path


def test_recipe_numbers_match_published_fastwan_recipes():
    r = load_recipe(R13)
    assert r.model.teacher == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert (r.train.global_batch_size, r.train.gradient_accumulation_steps) == (64, 2)
    assert r.optim.generator.lr == 1e-5 and r.vsa.sparsity == 0.8 and r.vsa.enabled
    assert r.train.max_steps == 4000 and r.parallel.world_size == 32
    assert r.parallel.sequence_parallel == 1 and r.dmd.flow_shift == 8.0
    assert r.dmd.guidance_scale == 4.5  # FastVideo's 3.5 in the standard convention

    r = load_recipe(R14)
    assert r.model.teacher == "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    assert (r.train.global_batch_size, r.train.gradient_accumulation_steps) == (64, 4)
    assert r.parallel.sequence_parallel == 4 and r.parallel.shard == 8
    assert r.parallel.world_size == 64 and r.parallel.data_parallel_size == 16
    assert r.optim.generator.lr == 1e-5 and r.vsa.sparsity == 0.9
    assert r.train.max_steps == 3000 and r.dmd.flow_shift == 3.0

    r = load_recipe(R5)
    assert r.model.teacher == "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
    assert (r.train.global_batch_size, r.train.gradient_accumulation_steps) == (64, 1)
    assert r.parallel.sequence_parallel == 1 and r.parallel.shard == 1
    assert r.parallel.world_size == 64 and r.train.max_steps == 3000
    assert r.optim.generator.lr == 2e-5 and r.optim.critic.lr == 1e-5
    assert r.optim.generator.schedule == "cosine" and r.optim.generator.min_lr_ratio == 0.5
    assert r.dmd.rollout == "simulate" and r.data.text_only
    assert (r.data.num_frames, r.data.height, r.data.width) == (121, 704, 1280)

    for path in (R13, R14, R5):
        r = load_recipe(path)
        assert r.dmd.denoising_timesteps == [1000, 757, 522]
        assert r.dmd.generator_update_interval == 5
        assert (r.dmd.min_timestep_ratio, r.dmd.max_timestep_ratio) == (0.02, 0.98)
        text = path.read_text()
        assert "uncond + w (cond - uncond)" in text and "FastVideo" in text


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("path", [R13, R14, R5], ids=lambda p: p.stem)
def test_dump_load_round_trip(path, tmp_path):
    recipe = load_recipe(path, ["--train.validation_prompts=['a: tricky, prompt', 'b']"])
    text = dump_recipe(recipe, tmp_path / "r.yaml")
    assert (tmp_path / "r.yaml").read_text() == text
    again = load_recipe(tmp_path / "r.yaml")
    assert again == recipe
    assert recipe_from_dict(yaml.safe_load(text)) == recipe
    assert isinstance(again.vsa.tile_size, tuple) and isinstance(again.optim.critic.betas, tuple)
    assert list(recipe_to_dict(recipe)) == [
        "model",
        "train",
        "parallel",
        "data",
        "optim",
        "dmd",
        "vsa",
        "lora",
    ]


def test_defaults_round_trip():
    recipe = Recipe(model=ModelConfig(teacher="t"))
    assert recipe_from_dict(yaml.safe_load(dump_recipe(recipe))) == recipe
    assert recipe.model.student_path == "t" and recipe.model.critic_path == "t"


# ------------------------------------------------------------------------------ overrides


def test_overrides_are_typed():
    r = load_recipe(
        R13,
        [
            "--optim.generator.lr=2e-5",
            "train.max_steps=10",
            "--train.ema_decay=0.999",
            "vsa.tile_size=[2, 4, 4]",
            "dmd.denoising_timesteps=[1000, 750, 500]",
            "--optim.critic.betas=[0.0, 0.999]",
            "vsa.enabled=false",
            "model.student=null",
            "model.critic=/ckpt/critic",
            "optim.generator.grad_clip=null",
            "train.validation_seeds=[1, 2]",
            "train.log_interval=1",
            "train.output_dir=2024",
        ],
    )
    assert r.optim.generator.lr == 2e-5 and isinstance(r.optim.generator.lr, float)
    assert r.train.max_steps == 10 and isinstance(r.train.max_steps, int)
    assert r.train.ema_decay == 0.999
    assert r.vsa.tile_size == (2, 4, 4)
    assert r.dmd.denoising_timesteps == [1000, 750, 500]
    assert r.optim.critic.betas == (0.0, 0.999)
    assert r.vsa.enabled is False
    assert r.model.student is None and r.model.critic == "/ckpt/critic"
    assert r.optim.generator.grad_clip is None
    assert r.train.validation_seeds == [1, 2]
    assert r.train.log_interval == 1
    assert r.train.output_dir == "2024"  # text fields take the text verbatim
    # Untouched fields keep the file's values.
    assert r.optim.critic.lr == 1e-5 and r.train.global_batch_size == 64


def test_pyyaml_exponent_strings_parse_as_floats(tmp_path):
    # PyYAML reads "1e-5" (no dot) as a string; the typed loader must still give a float.
    path = tmp_path / "r.yaml"
    path.write_text("model: {teacher: t}\noptim:\n  generator: {lr: 1e-5}\n")
    assert yaml.safe_load(path.read_text())["optim"]["generator"]["lr"] == "1e-5"
    assert load_recipe(path).optim.generator.lr == 1e-5


def test_override_scaling_down_a_recipe_must_stay_consistent():
    small = [
        "parallel.world_size=8",
        "parallel.replicate=1",
        "parallel.shard=2",
        "train.gradient_accumulation_steps=32",
    ]
    r = load_recipe(R14, small)
    assert r.parallel.data_parallel_size == 2
    msg = r"train\.global_batch_size.*gradient_accumulation_steps: 32"
    with pytest.raises(ValueError, match=msg):
        load_recipe(R14, small[:3])


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError) as err:
        load_recipe(R13, ["train.max_step=10"])
    msg = str(err.value)
    assert "train.max_step" in msg and "did you mean 'max_steps'" in msg
    assert "valid keys in train:" in msg and "gradient_accumulation_steps" in msg

    with pytest.raises(
        ValueError,
        match=r"optim\.generator\.learning_rate.*valid keys in "
        r"optim\.generator: lr, betas",
    ):
        load_recipe(R13, ["--optim.generator.learning_rate=1e-4"])
    with pytest.raises(
        ValueError,
        match=r"optimizer.*did you mean 'optim'.*valid keys in the "
        r"recipe: model, train",
    ):
        load_recipe(R13, ["optimizer.lr=1"])

    path = tmp_path / "r.yaml"
    path.write_text("model: {teacher: t}\nvsa: {sparsty: 0.5}\n")
    with pytest.raises(ValueError, match=r"vsa\.sparsty.*did you mean 'sparsity'"):
        load_recipe(path)


def test_malformed_overrides():
    with pytest.raises(ValueError, match="section.key=value"):
        load_recipe(R13, ["train.max_steps"])
    with pytest.raises(ValueError, match="is a section"):
        load_recipe(R13, ["optim.generator=1"])
    with pytest.raises(ValueError, match="is a value, not a section"):
        load_recipe(R13, ["train.max_steps.x=1"])
    with pytest.raises(ValueError, match="empty key"):
        load_recipe(R13, ["train..x=1"])


# ---------------------------------------------------------------- bad values name the field


@pytest.mark.parametrize(
    "override, field, fix",
    [
        ("optim.generator.lr=-1", "optim.generator.lr", "e.g. 1e-5"),
        ("optim.critic.lr=abc", "optim.critic.lr", "must be a number"),
        ("train.max_steps=1.5", "train.max_steps", "must be an integer"),
        ("train.max_steps=0", "train.max_steps", ">= 1"),
        ("dmd.rollout=replay", "dmd.rollout", "'data', 'simulate'"),
        ("dmd.denoising_timesteps=[522, 757]", "dmd.denoising_timesteps", "strictly decreasing"),
        ("dmd.denoising_timesteps=[2000]", "dmd.denoising_timesteps", "(0, 1000]"),
        ("dmd.min_timestep_ratio=0.99", "dmd.min_timestep_ratio", "< max_timestep_ratio"),
        ("dmd.guidance_scale=-1", "dmd.guidance_scale", "1 = no guidance"),
        ("dmd.generator_update_interval=0", "dmd.generator_update_interval", ">= 1"),
        ("dmd.flow_shift=0", "dmd.flow_shift", "1 = no shift"),
        ("vsa.sparsity=1.0", "vsa.sparsity", "[0, 1)"),
        ("vsa.tile_size=[4, 4]", "vsa.tile_size", "3 items"),
        ("vsa.backend=cuda", "vsa.backend", "'triton'"),
        ("vsa.decay_interval=0", "vsa.decay_interval", ">= 1"),
        ("vsa.enabled=maybe", "vsa.enabled", "true or false"),
        ("train.ema_decay=1.0", "train.ema_decay", "null disables EMA"),
        ("train.mixed_precision=fp16", "train.mixed_precision", "'fp32', 'bf16'"),
        ("train.validation_seeds=[]", "train.validation_seeds", "non-empty"),
        ("parallel.shard=3", "parallel.replicate", "must equal world_size"),
        ("parallel.activation_checkpointing=some", "parallel.activation_checkpointing", "full"),
        ("parallel.compile=true", "parallel.compile", "'inductor'"),
        ("parallel.compile=aot_eager", None, None),
        ("data.num_frames=0", "data.num_frames", ">= 1"),
        ("parallel.cpu_offload=maybe", "parallel.cpu_offload", "true or false"),
        ("data.height=450", "data.height", "multiple of 16"),
        ("data.cfg_dropout=1", "data.cfg_dropout", "[0, 1)"),
        ("model.teacher=", "model.teacher", "Diffusers folder"),
        ("model.dtype=fp16", "model.dtype", "'fp32', 'bf16'"),
        ("optim.generator.schedule=linear", "optim.generator.schedule", "'cosine'"),
        ("optim.critic.schedule=warmup", "optim.critic.warmup_steps", "schedule: constant"),
        ("optim.generator.min_lr_ratio=0.5", "optim.generator.min_lr_ratio", "cosine"),
        ("optim.generator.betas=[0.9, 1.0]", "optim.generator.betas", "[0, 1)"),
        ("optim.generator.grad_clip=0", "optim.generator.grad_clip", "null to disable"),
        ("optim.generator.warmup_steps=99999", "optim.generator.warmup_steps", "max_steps"),
        ("train.micro_batch_size=2", "train.global_batch_size", "micro_batch_size"),
        ("dmd.rollout=data", None, None),  # fine for the 1.3B recipe (has latents)
    ],
)
def test_bad_values_name_field_and_fix(override, field, fix):
    if field is None:
        load_recipe(R13, [override])
        return
    with pytest.raises(ValueError) as err:
        load_recipe(R13, [override])
    msg = str(err.value)
    assert msg.startswith(field + ":") or f"{field}:" in msg, msg
    assert fix in msg, msg
    assert isinstance(err.value, ConfigError)


def test_cross_section_rules():
    with pytest.raises(ValueError, match=r"dmd\.rollout: .*text_only.*set dmd\.rollout: simulate"):
        load_recipe(R5, ["dmd.rollout=data"])
    with pytest.raises(ValueError, match=r"data\.text_only: .*flow"):
        load_recipe(R5, ["train.method=flow"])
    with pytest.raises(ValueError, match=r"train\.ema_start_step"):
        load_recipe(R13, ["train.ema_decay=0.99", "train.ema_start_step=5000"])


def test_missing_teacher_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train: {max_steps: 3}\n")
    with pytest.raises(ValueError, match=r"model\.teacher: is required.*--model\.teacher="):
        load_recipe(path)
    # ... and an override can supply it.
    assert load_recipe(path, ["model.teacher=Wan-AI/x"]).model.teacher == "Wan-AI/x"


def test_load_errors_for_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping of sections"):
        load_recipe(listy)
    section = tmp_path / "section.yaml"
    section.write_text("model: {teacher: t}\ntrain: 5\n")
    with pytest.raises(ValueError, match="train: must be a mapping"):
        load_recipe(section)


# --------------------------------------------------------------- direct construction


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match=r"^OptimConfig\.lr: must be > 0, got 0.0"):
        OptimConfig(lr=0.0)
    with pytest.raises(ConfigError, match=r"^VSAConfig\.tile_size"):
        VSAConfig(tile_size=(4, 4))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^ParallelConfig\.replicate:.*set replicate: 4"):
        ParallelConfig(world_size=8, replicate=1, shard=2)
    with pytest.raises(ConfigError, match=r"^DMDConfig\.denoising_timesteps"):
        DMDConfig(denoising_timesteps=[])
    with pytest.raises(ConfigError, match=r"train\.global_batch_size"):
        Recipe(model=ModelConfig(teacher="t"), train=TrainConfig(global_batch_size=2))
    with pytest.raises(ConfigError, match="must be a TrainConfig"):
        Recipe(model=ModelConfig(teacher="t"), train={"max_steps": 1})  # type: ignore[arg-type]
    # Lists from Python callers become the annotated tuples.
    assert OptimConfig(betas=[0.0, 0.99]).betas == (0.0, 0.99)  # type: ignore[arg-type]
    assert VSAConfig(tile_size=[2, 2, 2]).tile_size == (2, 2, 2)  # type: ignore[arg-type]
    p = ParallelConfig(world_size=64, replicate=2, shard=8, sequence_parallel=4)
    assert p.data_parallel_size == 16


def test_recipe_from_dict_minimal():
    r = recipe_from_dict(_minimal(train={"max_steps": 7}))
    assert r.train.max_steps == 7 and r.dmd.guidance_scale == 4.5
    # a string is not an int (only override text is parsed by the field's type)
    with pytest.raises(ConfigError, match=r"^train\.max_steps: must be an integer, got the str"):
        recipe_from_dict(_minimal(train={"max_steps": "7"}))


def test_choice_fields_take_their_lists_from_fastwan_choices():
    import typing

    from fastwan import choices

    def literal(cls, name):
        return typing.get_args(typing.get_type_hints(cls)[name])

    assert literal(VSAConfig, "backend") == choices.ATTENTION_BACKENDS
    assert literal(TrainConfig, "validation_sampler") == choices.VALIDATION_SAMPLERS
    assert literal(TrainConfig, "method") == choices.METHODS
    assert literal(TrainConfig, "mixed_precision") == choices.TRAIN_DTYPES
    assert literal(ModelConfig, "dtype") == literal(ModelConfig, "teacher_dtype")
    assert literal(ModelConfig, "dtype") == choices.TRAIN_DTYPES
    assert literal(ParallelConfig, "compile") == ("none", *choices.COMPILE_BACKENDS)
    with pytest.raises(ConfigError, match=r"vsa\.backend: must be one of 'auto', 'reference'"):
        load_recipe(R13, ["vsa.backend=cuda"])


def test_torch_dtype():
    import torch

    assert torch_dtype("fp32") is torch.float32 and torch_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        torch_dtype("fp8")


def test_config_import_is_light():
    code = (
        "import sys, fastwan.train, fastwan.config; "
        "assert 'torch' not in sys.modules, 'config imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_cpu_offload_needs_more_than_one_process():
    assert load_recipe(R13, ["parallel.cpu_offload=true"]).parallel.cpu_offload
    one = [
        "parallel.world_size=1",
        "parallel.replicate=1",
        "train.global_batch_size=2",
        "parallel.cpu_offload=true",
    ]
    with pytest.raises(ValueError, match=r"parallel.cpu_offload: .*world_size > 1"):
        load_recipe(R13, one)


# ------------------------------------------------------------- typed YAML, issue 15 item 9


@pytest.mark.parametrize(
    "yaml_text, field, kind",
    [
        ('train: {max_steps: "600"}', "train.max_steps", "an integer"),
        ("train: {max_steps: '600'}", "train.max_steps", "an integer"),
        ('optim: {generator: {lr: "1e-5"}}', "optim.generator.lr", "a number"),
        ('vsa: {enabled: "true"}', "vsa.enabled", "true or false"),
        ('train: {validation_seeds: ["1"]}', "train.validation_seeds[0]", "an integer"),
        ('vsa: {tile_size: "4, 4, 4"}', "vsa.tile_size", "a list"),
        ('data: {max_skip_fraction: "0.1"}', "data.max_skip_fraction", "a number"),
    ],
)
def test_quoted_yaml_numbers_are_refused_naming_the_field(tmp_path, yaml_text, field, kind):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{teacher: t}}\n{yaml_text}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert msg.startswith(f"{field}: must be {kind}"), msg
    assert "string" in msg and str(path) in msg, msg


def test_unquoted_yaml_and_override_text_still_parse(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "model: {teacher: t}\ntrain: {max_steps: 600}\noptim: {generator: {lr: 1e-5}}\n"
    )
    r = load_recipe(path)
    assert r.train.max_steps == 600 and r.optim.generator.lr == 1e-5
    # overrides are text by nature: parsed by the field's type
    r = load_recipe(path, ["--train.max_steps=700", "vsa.enabled=false", "vsa.tile_size=[2, 2, 2]"])
    assert r.train.max_steps == 700 and r.vsa.enabled is False and r.vsa.tile_size == (2, 2, 2)
    # report_to / validation_prompts accept one string for a one-item list, as before
    path.write_text("model: {teacher: t}\ntrain: {report_to: tensorboard}\n")
    assert load_recipe(path).train.report_to == ["tensorboard"]


@pytest.mark.parametrize(
    "override, field, fix",
    [
        ("data.max_skip_fraction=1.5", "data.max_skip_fraction", "0.05 = 5%"),
        ("data.max_skip_fraction=-0.1", "data.max_skip_fraction", "[0, 1]"),
        ("data.max_abs_latent=0", "data.max_abs_latent", "null: NaN / inf only"),
        ("data.temporal_crop=middle", "data.temporal_crop", "'random', 'first'"),
    ],
)
def test_skip_and_crop_fields_validate(override, field, fix):
    with pytest.raises(ConfigError) as err:
        load_recipe(R13, [override])
    assert str(err.value).startswith(f"{field}:") and fix in str(err.value), str(err.value)
    d = DataConfig()
    assert (d.max_skip_fraction, d.max_abs_latent, d.temporal_crop) == (0.05, 1000.0, "random")
    assert load_recipe(R13, ["data.max_abs_latent=null"]).data.max_abs_latent is None


# ------------------------------------------------------- data shapes of the Wan recipes


def _wan21_folder(root: Path) -> Path:
    """Only the configs latent_shape_of reads, with Wan2.1's real values."""
    import json

    (root / "vae").mkdir(parents=True)
    (root / "transformer").mkdir()
    (root / "vae" / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "AutoencoderKLWan",
                "z_dim": 16,
                "scale_factor_temporal": 4,
                "scale_factor_spatial": 8,
            }
        )  # fmt: skip
    )
    (root / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "WanTransformer3DModel", "in_channels": 16})
    )
    return root


@pytest.mark.parametrize("path", [R13, R14], ids=lambda p: p.stem)
def test_wan_recipes_train_61x448x832_from_wan_syn_77_frame_latents(path, tmp_path):
    from fastwan.train.build import latent_shape_of

    r = load_recipe(path)
    d = r.data
    assert (d.num_frames, d.height, d.width) == (61, 448, 832)
    assert "Wan-Syn_77x448x832" in d.path and not d.text_only
    assert d.temporal_crop == "first"  # FastVideo: latents[:, :, :num_latent_t]
    shape = latent_shape_of(_wan21_folder(tmp_path / "wan"), r)
    assert shape == (16, 16, 56, 104)  # 61 frames -> 16 latent frames of 56 x 104
    wan_syn = (16, (77 - 1) // 4 + 1, 448 // 8, 832 // 8)  # the dataset's latents
    assert wan_syn[0] == shape[0] and wan_syn[2:] == shape[2:] and wan_syn[1] == 20 > shape[1]


# ------------------------------------------------------------------ resume comparison


def test_resume_changes_split_safe_and_unsafe_fields():
    from fastwan.config import RESUME_SAFE_FIELDS, recipe_changes, resume_changes

    saved = recipe_to_dict(load_recipe(R13))
    safe = load_recipe(R13, ["train.max_steps=5000", "optim.generator.lr=2e-5",
                             "train.log_interval=1", "train.report_to=[]",
                             "parallel.replicate=16", "parallel.world_size=16",
                             "train.gradient_accumulation_steps=4",
                             "data.on_error=skip"])  # fmt: skip
    changes = resume_changes(saved, safe, "run/checkpoint-500")
    assert changes["train.max_steps"] == (4000, 5000)
    assert changes["optim.generator.lr"] == (1e-5, 2e-5)
    assert set(changes) == {
        "train.max_steps", "optim.generator.lr", "train.log_interval", "train.report_to",
        "parallel.replicate", "parallel.world_size", "train.gradient_accumulation_steps",
        "data.on_error",
    }  # fmt: skip
    assert "vsa.sparsity" not in RESUME_SAFE_FIELDS and "optim.*.lr" in RESUME_SAFE_FIELDS

    unsafe = load_recipe(R13, ["vsa.sparsity=0.9", "optim.generator.betas=[0.0, 0.999]",
                               "train.max_steps=10"])  # fmt: skip
    with pytest.raises(ConfigError) as err:
        resume_changes(saved, unsafe, "run/checkpoint-500")
    msg = str(err.value)
    assert msg.startswith("optim.generator.betas: cannot change on resume from "), msg
    assert "vsa.sparsity: 0.8 -> 0.9" in msg and "[0.9, 0.999] -> [0.0, 0.999]" in msg
    assert "--vsa.sparsity=0.8" in msg and "--optim.generator.betas=[0.9, 0.999]" in msg
    assert "another train.output_dir" in msg and "train.max_steps" not in msg.split("Fields")[0]
    # a field the saved recipe lacks (added to fastwan since) compares with its default
    del saved["data"]["max_skip_fraction"]
    assert recipe_changes(saved, load_recipe(R13)) == {}
    assert recipe_changes(saved, load_recipe(R13, ["data.max_skip_fraction=0.5"])) == {
        "data.max_skip_fraction": (0.05, 0.5)
    }

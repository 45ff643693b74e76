"""Build a ready-to-run :class:`~fastwan.train.trainer.Trainer` from a :class:`Recipe`.

* the teacher transformer from ``model.teacher`` (a Diffusers folder, hub id or preset
  name) in ``model.teacher_dtype``; the student / critic from ``model.student`` /
  ``model.critic`` (default: the teacher's weights) in ``model.dtype``;
* the negative prompt (``dmd.negative_prompt``) and the validation prompts encoded once
  with the folder's own text encoder (then freed);
* the data loader (:func:`fastwan.data.build_train_loader`) normalising latents with the
  VAE statistics of ``model.teacher``;
* :class:`~fastwan.methods.dmd.DMDMethod` (``train.method: dmd``) or
  :class:`~fastwan.methods.flow.FlowMethod` (``train.method: flow``), with per-token
  timesteps for Wan2.2 TI2V folders (:func:`expand_timesteps_of`); with ``lora.rank > 0``
  the networks are LoRA adapters (``model.dtype``) on frozen bases (``model.teacher_dtype``;
  for ``dmd`` with ``lora.shared_base`` one base, the teacher itself), initialised from
  ``train.seed`` once the networks are materialised;
* the validator (:class:`~fastwan.train.validation.Validator`, with the folder's VAE) when
  ``train.validation_prompts`` is set, and the metric trackers of ``train.report_to``.

Image-to-video (:func:`trains_image_to_video`): a Wan2.1 I2V folder always, a Wan2.2 TI2V
folder when its data are image-to-video shards (``i2v``, or ``i2v_text`` for data-free
``dmd.rollout: simulate``). The loader then reads each row's image condition
(first-frame latent, CLIP features, frame), the methods condition teacher, critic and
student on it, and each validation prompt is paired with the image of a training row
(:func:`validation_images`), shown beside its videos.

Before any model loads: the data path, ``train.output_dir`` (writable), the checkpoint to
resume from (it exists and is complete, and the recipe's changes since it are safe:
:func:`fastwan.train.trainer.check_resume`) and the data's latent sizes against the
recipe's (:func:`latent_shape_of`; see :class:`fastwan.data.dataset.LatentDataset`) are
checked.

With ``parallel.world_size > 1`` (launched by ``torchrun``): the layout is checked before
any model is loaded, the process group and mesh start
(:func:`fastwan.distributed.mesh.init_parallel`), each rank reads its data-parallel rank's
samples (sequence-parallel ranks share them), the prompts are encoded on rank 0 only,
the networks are built on the meta device (no weights read), wrapped (activation
checkpointing, sequence parallelism, compilation from ``parallel``) and sharded with FSDP2 /
HSDP, then each rank materialises and reads from the checkpoint only its own shards
(:func:`fastwan.distributed.parallelize.materialize`), and only rank 0 logs to trackers
and writes validation videos (every rank generates them with its shards). One process
loads the networks in full on its device.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastwan.config import Recipe, torch_dtype
from fastwan.shapes import latent_grid
from fastwan.train.trainer import RECIPE_FILE, Trainer, check_resume, resolve_resume

__all__ = [
    "RECIPE_FILE",
    "TrainingSetup",
    "build_trainer",
    "check_world_size",
    "expand_timesteps_of",
    "latent_shape_of",
    "trains_image_to_video",
    "validation_images",
]


@dataclass
class TrainingSetup:
    """What :func:`build_trainer` made."""

    trainer: Trainer
    model_path: Path  # the resolved teacher folder
    device: torch.device
    # The checkpoint build_trainer(resume=...) checked (None: start from step 0); pass it
    # to trainer.resume().
    resume_from: Path | None = None


def check_world_size(recipe: Recipe, num_heads: int | None = None) -> None:
    """Raise a ValueError unless the recipe's mesh fits the processes running (torchrun's
    ``WORLD_SIZE``) and, when given, the model's attention heads divide by its SP size."""
    from fastwan.distributed.mesh import validate_layout

    validate_layout(recipe.parallel, num_heads=num_heads)


def _num_heads(model_path: Path) -> int | None:
    config = json.loads((model_path / "transformer" / "config.json").read_text())
    heads = config.get("num_attention_heads")
    return int(heads) if heads is not None else None


def latent_shape_of(model_path: Path, recipe: Recipe) -> tuple[int, int, int, int]:
    """``(C, T, H, W)`` of a ``data.num_frames x data.height x data.width`` clip's latents,
    from the folder's VAE and transformer configs (no weights loaded)."""
    vae = json.loads((model_path / "vae" / "config.json").read_text())
    transformer = json.loads((model_path / "transformer" / "config.json").read_text())
    st = int(vae.get("scale_factor_temporal", 4))
    ss = int(vae.get("scale_factor_spatial", 8))
    d = recipe.data
    grid = latent_grid(d.num_frames, d.height, d.width, (st, ss, ss), name=lambda f: f"data.{f}")
    # the generated latents: Wan2.1 I2V's input has condition channels beside them
    channels = int(
        transformer.get("out_channels") or transformer.get("in_channels", vae.get("z_dim", 16))
    )
    return (channels, *grid)


def _vae_scale_temporal(model_path: Path) -> int:
    vae = json.loads((model_path / "vae" / "config.json").read_text())
    return int(vae.get("scale_factor_temporal", 4))


def trains_image_to_video(model_path: Path, data_path: str | Path) -> bool:
    """Whether a run of the folder's model on ``data_path`` is image-to-video: always for a
    Wan2.1 I2V folder (its data must be ``i2v`` / ``i2v_text`` shards), for a Wan2.2 TI2V
    folder when the first parquet file holds an image condition (text-to-video otherwise),
    never for a text-to-video model."""
    import pyarrow.parquet as pq

    from fastwan.data.parquet_io import list_parquet_files
    from fastwan.data.schema import SchemaError, detect_kind
    from fastwan.models.identity import task_of
    from fastwan.models.loading import read_model_index

    config = json.loads((model_path / "transformer" / "config.json").read_text())
    task = task_of(read_model_index(model_path), config)
    if task == "i2v":
        return True
    if task != "ti2v":
        return False
    for file in list_parquet_files(Path(data_path)):
        try:
            return detect_kind(pq.read_schema(file)) in ("i2v", "i2v_text")
        except (OSError, SchemaError, ValueError):
            continue  # an unreadable file: the dataset names it (or skips it)
    return False


def validation_images(
    dataset: Any, count: int, vae: nn.Module | None = None
) -> list[tuple[np.ndarray, torch.Tensor | None]]:
    """The conditioning images of ``count`` validation prompts: prompt ``i`` gets row
    ``i`` (mod the rows) of the image-to-video ``dataset``: its frame ``[H, W, 3]`` uint8
    (``pil_image``; decoded with ``vae`` from the first latent frame when the row has
    none) and its CLIP features ``[N, D]`` (or None)."""
    from fastwan.pipeline import decode_latents
    from fastwan.video_io import to_uint8_frames

    if len(dataset) == 0:
        raise ValueError("the dataset has no rows to take validation images from")
    out = []
    for i in range(count):
        row = dataset[i % len(dataset)]
        if "first_frame_latent" not in row:
            raise ValueError(
                "validation of an image-to-video run needs image-to-video rows "
                "(first_frame_latent); the data has none"
            )
        frame = row.get("pil_image")
        if frame is None:
            if vae is None:
                raise ValueError(
                    f"row {i} has no pil_image: pass the VAE to decode its first latent frame"
                )
            first = row["first_frame_latent"][None, :, :1].float()  # [1, C, 1, h, w]
            # a VAE without weights (the toy world's pixel fold) has buffers only
            held = next(vae.parameters(), None)
            held = held if held is not None else next(vae.buffers(), None)
            device = held.device if held is not None else torch.device("cpu")
            frame = to_uint8_frames(decode_latents(vae, first, device=device)[0])[0]  # [H, W, 3]
        else:
            frame = np.asarray(frame.numpy() if isinstance(frame, torch.Tensor) else frame)
        clip = row.get("clip_feature")
        out.append((frame.astype(np.uint8), clip.float() if clip is not None else None))
    return out


def expand_timesteps_of(model_path: Path) -> bool:
    """Whether the folder's transformer takes one timestep per latent token (Wan2.2 TI2V):
    ``model_index.json``'s ``expand_timesteps``, else its recognised preset's."""
    from fastwan.models.loading import read_model_index
    from fastwan.models.presets import infer_preset

    index = read_model_index(model_path)
    if "expand_timesteps" in index:
        return bool(index["expand_timesteps"])
    config = json.loads((model_path / "transformer" / "config.json").read_text())
    try:
        return infer_preset(str(model_path), config, False).expand_timesteps
    except ValueError:  # an unknown architecture: Wan2.1-style scalar timesteps
        return False


def _encode_prompts(model_path: Path, prompts: list[str], max_length: int) -> list[torch.Tensor]:
    """Each prompt's valid-token embedding ``[L_i, dim]`` (float32, CPU); the encoder is
    loaded on the CPU in float32 and dropped afterwards."""
    from fastwan.data.encoders import WanTextEncoder

    encoder = WanTextEncoder.from_pretrained(
        model_path, device="cpu", dtype=torch.float32, max_length=max_length
    )
    try:
        return encoder(prompts)
    finally:
        del encoder


def _load(path: str, dtype_name: str, device: torch.device) -> nn.Module:
    """A network of the recipe; ``device`` meta: built without its weights, which
    :func:`fastwan.distributed.parallelize.parallelize_method` reads once it is sharded."""
    from fastwan.models.loading import load_transformer, resolve_model_path

    return load_transformer(resolve_model_path(path), dtype=torch_dtype(dtype_name), device=device)


def build_trainer(
    recipe: Recipe,
    *,
    device: str | torch.device | None = None,
    negative_prompt: str | None = None,
    log_fn: Callable[[str], None] | None = None,
    progress: bool = False,
    resume: str | Path | None = None,
) -> TrainingSetup:
    """Load the models and data of ``recipe`` and return its Trainer (not yet run).

    negative_prompt: replaces ``dmd.negative_prompt`` (the teacher's CFG "uncond" text for
    ``dmd``, the negative of ``flow`` validation with CFG) when given.
    progress: show a progress bar while validation videos are generated.
    resume: ``"latest"`` or a checkpoint (path, or name under ``train.output_dir``) that
    the caller will resume from: checked before any model loads (it exists, is complete,
    and the recipe changed only in fields safe to change); the result's ``resume_from``.
    """
    from fastwan.data.encoders import default_device, vae_latent_stats
    from fastwan.data.parquet_io import EMPTY_PROMPT_FILE
    from fastwan.data.sampler import build_train_loader
    from fastwan.distributed.mesh import broadcast_from_main, init_parallel
    from fastwan.distributed.parallelize import DistributedValidator, parallelize_method
    from fastwan.fsutil import ensure_writable_dir
    from fastwan.methods.dmd import DMDMethod
    from fastwan.methods.flow import FlowMethod
    from fastwan.models.loading import read_model_index, resolve_model_path
    from fastwan.train.tracking import build_trackers
    from fastwan.train.validation import Validator, load_validation_vae

    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe must be a Recipe, got {type(recipe).__name__}")
    check_world_size(recipe)
    if recipe.data.path is None:
        raise ValueError(
            "data.path is null: set it to the folder of parquet shards (--data.path=DIR)"
        )
    if not Path(recipe.data.path).exists():
        raise ValueError(
            f"data.path {recipe.data.path!r} does not exist; write shards with "
            "`fastwan preprocess` / `synthesize` and pass --data.path=DIR"
        )
    ensure_writable_dir(recipe.train.output_dir, "train.output_dir")
    resume_from = resolve_resume(resume, recipe.train.output_dir)
    if resume_from is not None:
        check_resume(recipe, resume_from)  # unsafe changes are refused here, not after loading
    dev = default_device(str(device) if device is not None else None)
    heads = _num_heads(resolve_model_path(recipe.model.teacher))
    check_world_size(recipe, heads)  # the layout fails here, before any model is loaded
    parallel = init_parallel(recipe.parallel, dev, num_heads=heads)
    dev = parallel.device
    # Sharded runs build on the meta device: each rank reads only its shards, once sharded.
    load_dev = torch.device("meta") if parallel.distributed else dev
    model_path = resolve_model_path(recipe.model.teacher)
    read_model_index(model_path)  # a clear error when a component is missing
    m, t = recipe.model, recipe.train

    # Text: the negative prompt (dmd's CFG, flow's validation CFG), the validation prompts
    # and, for CFG dropout without a stored empty embedding, the empty prompt -- encoded
    # once, then the encoder is freed.
    data_dir = Path(recipe.data.path)
    data_dir = data_dir if data_dir.is_dir() else data_dir.parent
    need_empty = recipe.data.cfg_dropout > 0 and not (data_dir / EMPTY_PROMPT_FILE).is_file()
    negative = negative_prompt if negative_prompt is not None else recipe.dmd.negative_prompt
    validate = bool(t.validation_prompts)
    need_negative = t.method == "dmd" or (validate and t.validation_guidance_scale != 1.0)
    prompts = [negative] if need_negative else []
    prompts += list(t.validation_prompts) if validate else []
    if need_empty:
        prompts.append("")
    encoded = []
    if prompts and parallel.is_main:
        encoded = _encode_prompts(model_path, prompts, recipe.data.text_length)
    if prompts and parallel.distributed:  # one text encoder per run, not one per GPU
        encoded = broadcast_from_main(encoded)
    empty = encoded.pop() if need_empty else None
    negative_embedding = encoded.pop(0) if need_negative else None  # [L, dim]
    validation_embeddings = encoded  # one [L_i, dim] per validation prompt
    expand = expand_timesteps_of(model_path)
    latent_shape = latent_shape_of(model_path, recipe)  # [C, T, H, W] of data.* clips
    image_to_video = trains_image_to_video(model_path, recipe.data.path)
    scale_t = _vae_scale_temporal(model_path)

    mean = std = None
    if not recipe.data.text_only:
        mean, std = vae_latent_stats(model_path)
    loader = build_train_loader(
        recipe.data,
        rank=parallel.rank,
        world_size=parallel.world_size,
        sequence_parallel=parallel.sp_size,
        micro_batch_size=t.micro_batch_size,
        seed=t.seed,
        latents_mean=mean,
        latents_std=std,
        empty_embedding=empty,
        latent_shape=latent_shape,  # longer latents are cropped in time, others skipped
        image_condition=image_to_video,
    )

    # LoRA: frozen bases in model.teacher_dtype, adapters (and full gates) in model.dtype
    lora = recipe.lora if recipe.lora.enabled else None
    lora_args = {"lora": lora, "lora_dtype": torch_dtype(m.dtype)} if lora else {}

    def build_method():  # the networks, wrapped for this rank (FSDP2: its shards only)
        if t.method == "dmd":
            teacher = _load(m.teacher, m.teacher_dtype, load_dev)
            if lora is not None:  # adapters on the teacher; bases of their own when asked
                own = not lora.shared_base
                student = (
                    _load(m.student_path, m.teacher_dtype, load_dev) if own and m.student else None
                )
                critic = _load(m.critic_path, m.teacher_dtype, load_dev) if own else None
            else:
                separate = m.dtype != m.teacher_dtype
                student = (
                    _load(m.student_path, m.dtype, load_dev) if m.student or separate else None
                )
                critic = _load(m.critic_path, m.dtype, load_dev) if m.critic or separate else None
            method = DMDMethod(
                teacher,
                recipe.dmd,
                recipe.vsa,
                negative_embedding,
                latent_shape=latent_shape,
                student=student,
                critic=critic,
                expand_timesteps=expand,
                vae_scale_temporal=scale_t,
                seed=t.seed,
                **lora_args,
            )
        else:
            method = FlowMethod(
                _load(m.student_path, m.teacher_dtype if lora else m.dtype, load_dev),
                recipe.vsa,
                flow_shift=recipe.dmd.flow_shift,
                min_ratio=recipe.dmd.min_timestep_ratio,
                max_ratio=recipe.dmd.max_timestep_ratio,
                expand_timesteps=expand,
                vae_scale_temporal=scale_t,
                seed=t.seed,
                **lora_args,
            )
        parallelize_method(method, parallel, recipe)
        if lora is not None:  # meta-built adapters have their memory only now
            method.init_adapters()
        return method

    method = build_method()
    validator = None
    if validate:
        vae = load_validation_vae(model_path, dev)
        images = None
        if image_to_video:  # each prompt with a training row's image
            images = validation_images(loader.dataset, len(t.validation_prompts), vae)
        validator = Validator.from_recipe(
            recipe,
            vae,
            validation_embeddings,
            negative_embedding=negative_embedding,
            latent_shape=latent_shape,
            model_path=model_path,
            expand_timesteps=expand,
            progress=progress and parallel.is_main,
            images=images,
        )
        if parallel.distributed:  # all ranks generate (sharded forwards), rank 0 writes
            validator = DistributedValidator(validator, parallel)
    trainer = Trainer(
        method,
        recipe,
        loader,
        output_dir=t.output_dir,
        log_fn=log_fn,
        validator=validator,
        tracker=build_trackers(recipe, t.output_dir) if parallel.is_main else None,
        parallel=parallel,
    )
    return TrainingSetup(
        trainer=trainer, model_path=model_path, device=dev, resume_from=resume_from
    )

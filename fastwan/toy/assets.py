"""The toy world's model folders: building a fresh one, and finding the shipped ones.

A toy model is a Diffusers-format Wan folder like any other (``model_index.json``,
``transformer/`` a ``WanTransformer3DModel``, ``text_encoder/`` a ``UMT5EncoderModel``,
``tokenizer/``, ``scheduler/``), only tiny, with :class:`~fastwan.toy.pixel_vae.ToyPixelVAE`
as its ``vae/``. The shipped teacher and student live under ``fastwan/toy/weights/`` as
``toy-<role>/`` for each of ``fastwan.choices.TOY_ROLES`` (their folder names are their
presets' names).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fastwan.choices import TOY_ROLES
from fastwan.models.presets import get_preset, transformer_config
from fastwan.toy import world

__all__ = [
    "TEXT_DIM",
    "WEIGHTS_DIR",
    "build_toy_pipeline",
    "latent_stats",
    "ship_model",
    "toy_model_path",
    "tiny_umt5",
    "toy_tokenizer",
    "word_tokenizer",
    "toy_transformer_config",
]

WEIGHTS_DIR = Path(__file__).parent / "weights"
TEXT_DIM = 64  # the toy UMT5's d_model = the transformer's text_dim
COORD_CHANNELS = 3  # frame, row, column ramps in the latent (see ToyPixelVAE)
COORD_GAIN = 5.0  # their std after normalisation (the pixel channels': 1)
_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"


def toy_model_path(name: str) -> Path:
    """The shipped toy model folder of a role in ``fastwan.choices.TOY_ROLES`` (``"teacher"``,
    ``"i2v-student"``, ...; ``"toy-teacher"`` ... too)."""
    role = name[len("toy-") :] if name.startswith("toy-") else name
    if role not in TOY_ROLES:
        raise ValueError(f"toy model must be one of {', '.join(TOY_ROLES)}; got {name!r}")
    path = WEIGHTS_DIR / f"toy-{role}"
    if not (path / "model_index.json").is_file():
        i2v = role.startswith("i2v")
        recipes = "toy_i2v_*.yaml" if i2v else "toy_teacher*.yaml / toy_distill.yaml"
        raise ValueError(
            f"the toy toy-{role} weights are missing from {path}; reinstall fastwan, or "
            f"rebuild them with the commands at the top of recipes/{recipes}"
        )
    return path


def word_tokenizer(words: list[str], model_max_length: int):
    """A T5-style unigram tokenizer whose pieces are whole ``words`` (letters as a
    fallback, so any text tokenises); ``<pad>`` is id 0 as the Wan pipeline expects."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -float(i + 1)) for i, w in enumerate(words)]
    vocab += [("\u2581", -60.0)] + [(c, -80.0) for c in _LETTERS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_umt5(vocab_size: int, d_model: int, *, d_kv: int, d_ff: int):
    """A 2-layer, 4-head ``UMT5EncoderModel`` with random weights (eval mode)."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
    )
    return UMT5EncoderModel(config).eval()


def toy_tokenizer():
    """The toy world's tokenizer: the grammar's words, the toy preset's text length."""
    return word_tokenizer(world.grammar_words(), get_preset("toy-teacher").text_length)


def toy_transformer_config() -> dict:
    """``WanTransformer3DModel`` config of the toy preset (dim 256, 4 layers, 4 heads)."""
    config = transformer_config(get_preset("toy-teacher"))
    config.update(text_dim=TEXT_DIM, freq_dim=64, rope_max_seq_len=64)
    return config


def toy_vae(latents_mean=None, latents_std=None):
    """The toy world's pixel VAE (fold of the toy preset's stride, coordinate channels)."""
    from fastwan.toy.pixel_vae import ToyPixelVAE

    return ToyPixelVAE(
        scale_factor_spatial=get_preset("toy-teacher").vae_stride[1],
        coord_channels=COORD_CHANNELS,
        latents_mean=latents_mean,
        latents_std=latents_std,
    )


def latent_stats(num_clips: int = 256, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the pixel VAE's latents over random training clips; the
    coordinate channels' std is divided by ``COORD_GAIN`` so that, normalised, they stand
    out of the noise earlier than the pixels do."""
    rng = np.random.default_rng(seed)
    combos = world.train_combos()
    picks = [combos[i] for i in rng.integers(0, len(combos), num_clips)]
    clips = world.render_batch(picks, rng.integers(0, 2**31, num_clips))  # [N, T, H, W, 3]
    x = torch.from_numpy(clips).permute(0, 4, 1, 2, 3) * 2 - 1  # [N, 3, T, H, W]
    z = toy_vae().encode(x).latent_dist.mean.double()  # [N, C, T, h, w]
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4))
    std[std.shape[0] - COORD_CHANNELS :] /= COORD_GAIN
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def build_toy_pipeline(path: str | Path, *, seed: int = 0, task: str = "t2v") -> Path:
    """Write a fresh toy Wan folder (random transformer and text encoder drawn from
    ``seed``) to ``path``: the starting point of the toy teacher's training. ``task``:
    ``"t2v"``, or ``"ti2v"`` for the image-to-video toy (Wan2.2 TI2V's way,
    ``expand_timesteps``: the given image is the clean first latent frame)."""
    if task not in ("t2v", "ti2v"):
        raise ValueError(f"task must be 't2v' or 'ti2v' (image-to-video), got {task!r}")
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

    preset = get_preset("toy-teacher")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mean, std = latent_stats()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # module constructors draw from the global generator
        tokenizer = toy_tokenizer()
        text_encoder = tiny_umt5(len(tokenizer), TEXT_DIM, d_kv=16, d_ff=128)
        transformer = WanTransformer3DModel(**toy_transformer_config()).eval()
    vae = toy_vae(mean, std)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=preset.flow_shift
    )
    tokenizer.save_pretrained(str(path / "tokenizer"))
    text_encoder.save_pretrained(str(path / "text_encoder"))
    transformer.save_pretrained(str(path / "transformer"))
    vae.save_pretrained(str(path / "vae"))
    scheduler.save_pretrained(str(path / "scheduler"))
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": _diffusers_version(),
        "expand_timesteps": task == "ti2v",
        "tokenizer": ["transformers", type(tokenizer).__name__],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": [None, None],
        "vae": ["fastwan.toy.pixel_vae", "ToyPixelVAE"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def ship_model(src: str | Path, role: str, *, dest_root: str | Path | None = None) -> Path:
    """Copy an exported toy folder to ``weights/toy-<role>`` with the transformer's weights
    stored in float16 (half the bytes; loading casts back to the requested dtype)."""
    import shutil

    from safetensors.torch import load_file, save_file

    if role not in TOY_ROLES:
        raise ValueError(f"role must be one of {', '.join(TOY_ROLES)}; got {role!r}")
    src = Path(src)
    if not (src / "model_index.json").is_file():
        raise ValueError(f"{str(src)!r} is not a pipeline folder (no model_index.json)")
    dest = Path(dest_root if dest_root is not None else WEIGHTS_DIR) / f"toy-{role}"
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    weights = tmp / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_file(half, str(weights), metadata={"format": "pt"})
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__

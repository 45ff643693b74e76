"""Builders of tiny Wan pipelines in the Diffusers folder layout, for fast CPU tests.

Every component is a real diffusers / transformers class (WanTransformer3DModel,
AutoencoderKLWan, UMT5EncoderModel, T5Tokenizer, UniPC or FlowMatchEuler scheduler), only
tiny, with random weights, saved with ``WanPipeline.save_pretrained``. Reusable by any test
that needs a Wan checkpoint on disk (loading, sampling, training, export).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# A small T5-style unigram vocabulary: whole words win over letters, so prompts tokenise
# into a few ids; <pad> must be id 0 (the Wan pipeline masks padding with it).
_WORDS = (
    "a an the cat dog bird fish red blue green small big runs jumps flies swims sits on in "
    "over under of and with sky field water road car ball tree house video walking slowly "
    "fast bright dark low quality static blurry"
).split()

TEXT_DIM = 32  # UMT5 d_model == the transformer's text_dim
MAX_TEXT_LEN = 16  # a short text context keeps cross-attention cheap


def tiny_tokenizer():
    from fastwan.toy.assets import word_tokenizer

    return word_tokenizer(list(_WORDS), MAX_TEXT_LEN)


def tiny_text_encoder(vocab_size: int):
    from fastwan.toy.assets import tiny_umt5

    return tiny_umt5(vocab_size, TEXT_DIM, d_kv=8, d_ff=64)


def tiny_transformer_config(variant: str = "wan2.1", num_layers: int = 2) -> dict:
    """Config of a tiny ``WanTransformer3DModel``: dim 32 (2 heads x 16), 2 layers."""
    channels = 48 if variant == "wan2.2" else 16
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=channels,
        out_channels=channels,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=64,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=64,
    )


def tiny_transformer(variant: str = "wan2.1", num_layers: int = 2):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**tiny_transformer_config(variant, num_layers)).eval()


def tiny_vae(variant: str = "wan2.1"):
    """Wan2.1: 16 channels, 4x8x8. Wan2.2 (TI2V 5B style): 48 channels, 4x16x16 with the
    VAE's own 2x2 patchify."""
    from diffusers import AutoencoderKLWan

    if variant == "wan2.2":
        return AutoencoderKLWan(
            base_dim=3,
            z_dim=48,
            in_channels=12,
            out_channels=12,
            is_residual=True,
            patch_size=2,
            latents_mean=[0.1 * (i % 5) for i in range(48)],
            latents_std=[1.0 + 0.05 * (i % 7) for i in range(48)],
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            scale_factor_spatial=16,
            scale_factor_temporal=4,
        ).eval()
    return AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()


def tiny_scheduler(kind: str = "unipc", shift: float = 3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if kind == "unipc":
        return UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift
        )
    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=shift)
    raise ValueError(f"scheduler kind must be 'unipc' or 'euler', got {kind!r}")


def build_tiny_wan(
    path: str | Path,
    *,
    variant: str = "wan2.1",
    num_layers: int = 2,
    scheduler: str = "unipc",
    gates: str | None = None,
    seed: int = 0,
) -> Path:
    """Build a tiny Wan pipeline and save it in the Diffusers layout under ``path``.

    gates: ``None`` (a plain Wan checkpoint) or ``"fastvideo"`` (random non-zero
    ``blocks.N.to_gate_compress.{weight,bias}`` added to the transformer's safetensors
    file, as FastWan releases store them). Returns ``path``.
    """
    from diffusers import WanPipeline

    if variant not in ("wan2.1", "wan2.2"):
        raise ValueError(f"variant must be 'wan2.1' or 'wan2.2', got {variant!r}")
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # module constructors draw from the global generator
        tokenizer = tiny_tokenizer()
        pipe = WanPipeline(
            tokenizer=tokenizer,
            text_encoder=tiny_text_encoder(len(tokenizer)),
            vae=tiny_vae(variant),
            scheduler=tiny_scheduler(scheduler),
            transformer=tiny_transformer(variant, num_layers),
            expand_timesteps=variant == "wan2.2",
        )
    pipe.save_pretrained(path)
    if gates == "fastvideo":
        add_fastvideo_gates(path / "transformer", seed=seed + 1)
    elif gates is not None:
        raise ValueError(f"gates must be None or 'fastvideo', got {gates!r}")
    return path


CLIP_DIM = 24  # the tiny CLIP vision encoder's hidden size (Wan2.1 I2V: 1280)
CLIP_TOKENS = 17  # its tokens per image: (32 / 8)^2 patches + CLS (Wan2.1 I2V: 257)


def tiny_image_encoder():
    """A tiny ``CLIPVisionModel`` (32 x 32 images, 8 x 8 patches: 17 tokens) and its
    ``CLIPImageProcessor``, as Wan2.1 I2V folders ship them in image_encoder/ and
    image_processor/."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=CLIP_DIM,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=CLIP_DIM,
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return CLIPVisionModel(config).eval(), processor


def build_tiny_wan_i2v(
    path: str | Path,
    *,
    variant: str = "wan2.1",
    num_layers: int = 2,
    seed: int = 0,
    flf2v: bool = False,
) -> Path:
    """A tiny image-to-video Wan pipeline saved by diffusers under ``path``: ``wan2.1`` is a
    ``WanImageToVideoPipeline`` (CLIP image encoder, transformer with image cross-attention
    and 16 + 4 + 16 = 36 input channels); ``wan2.2`` a TI2V folder (``expand_timesteps``,
    no image encoder). flf2v: a first-last-frame transformer (Wan2.1 FLF2V: positional
    embeddings over both images' CLIP tokens). Returns ``path``."""
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

    if variant == "wan2.2":
        return build_tiny_wan(path, variant="wan2.2", num_layers=num_layers, seed=seed)
    if variant != "wan2.1":
        raise ValueError(f"variant must be 'wan2.1' or 'wan2.2', got {variant!r}")
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_tokenizer()
        encoder, processor = tiny_image_encoder()
        config = dict(
            tiny_transformer_config("wan2.1", num_layers),
            in_channels=36,
            image_dim=CLIP_DIM,
            added_kv_proj_dim=32,  # the transformer's dim
        )
        if flf2v:  # two images' CLIP tokens: 2 x (16 patches + CLS)
            config["pos_embed_seq_len"] = 2 * CLIP_TOKENS
        pipe = WanImageToVideoPipeline(
            tokenizer=tokenizer,
            text_encoder=tiny_text_encoder(len(tokenizer)),
            vae=tiny_vae("wan2.1"),
            scheduler=tiny_scheduler("unipc"),
            image_processor=processor,
            image_encoder=encoder,
            transformer=WanTransformer3DModel(**config).eval(),
        )
    pipe.save_pretrained(path)
    return path


def add_fastvideo_gates(transformer_dir: str | Path, seed: int = 1) -> dict[str, torch.Tensor]:
    """Add random ``blocks.N.to_gate_compress.{weight,bias}`` to a saved transformer (the
    FastVideo layout) and return the added tensors."""
    from safetensors.torch import load_file, save_file

    transformer_dir = Path(transformer_dir)
    file = transformer_dir / "diffusion_pytorch_model.safetensors"
    config = json.loads((transformer_dir / "config.json").read_text())
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    state = load_file(file)
    g = torch.Generator().manual_seed(seed)
    added = {}
    for n in range(config["num_layers"]):
        added[f"blocks.{n}.to_gate_compress.weight"] = 0.2 * torch.randn(dim, dim, generator=g)
        added[f"blocks.{n}.to_gate_compress.bias"] = 0.2 * torch.randn(dim, generator=g)
    state.update(added)
    save_file(state, file, metadata={"format": "pt"})
    return added


# ----------------------------------------------------------------- random training data

TINY_LATENT = (16, 2, 8, 8)  # C, T, H, W of a 5 x 64 x 64 clip: a (2, 4, 4) token grid


def write_random_video_shard(root: str | Path, *, latent=TINY_LATENT, n: int = 4) -> Path:
    """One parquet ``video`` shard of ``n`` random latents and prompt embeddings (of
    ``3 + i`` tokens) under ``root``; returns ``root``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fastwan.data.schema import arrow_schema, video_row

    root = Path(root)
    rng = np.random.default_rng(0)
    rows = [
        video_row(
            id=f"clip_{i}",
            latent=rng.standard_normal(latent).astype(np.float32),
            text_embedding=rng.standard_normal((3 + i, TEXT_DIM)).astype(np.float32),
            caption=f"caption {i}",
            file_name=f"clip_{i}.mp4",
            width=64,
            height=64,
            num_frames=5,
            fps=16.0,
        )
        for i in range(n)
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema("video")), root / "s.parquet")
    return root


class RandomSamples(torch.utils.data.Dataset):
    """Random latents and text embeddings; keys are ``(index, epoch)`` like LatentDataset's."""

    def __init__(self, n: int, seed: int = 0, latent=TINY_LATENT):
        g = torch.Generator().manual_seed(seed)
        self.latents = torch.randn(n, *latent, generator=g)  # [N, C, T, H, W]
        self.text = torch.randn(n, MAX_TEXT_LEN, TEXT_DIM, generator=g)  # [N, L, dim]
        lengths = torch.randint(3, MAX_TEXT_LEN + 1, (n,), generator=g)  # [N]
        self.mask = torch.arange(MAX_TEXT_LEN)[None] < lengths[:, None]  # [N, L]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key
        return {
            "latents": self.latents[i],
            "text_embedding": self.text[i],
            "text_mask": self.mask[i],
        }


def collate_tensors(samples):
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}

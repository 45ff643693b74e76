"""Presets: the defaults each supported Wan / FastWan checkpoint is run with.

A preset names a checkpoint (its hub id), its architecture (to recognise a local folder)
and how to sample it: the few-step DMD timesteps and VSA for FastWan, many UniPC steps
with CFG and dense attention for the original Wan models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fastwan.choices import TASKS
from fastwan.shapes import latent_grid

# Wan's default negative prompt (English rendering, as in the diffusers Wan docs).
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, "
    "ugly, incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, "
    "disfigured, misshapen limbs, fused fingers, still picture, messy background, three "
    "legs, many people in the background, walking backwards"
)

FASTWAN_TIMESTEPS = (1000, 757, 522)


@dataclass(frozen=True)
class WanPreset:
    """Defaults of one checkpoint. ``timesteps`` set means few-step DMD sampling."""

    name: str
    hub_id: str
    # Architecture, used to recognise a local folder's transformer config.
    dim: int
    num_layers: int
    in_channels: int
    num_heads: int
    ffn_dim: int
    # Sampling defaults.
    flow_shift: float
    height: int
    width: int
    num_frames: int
    fps: int
    timesteps: tuple[int, ...] | None = None  # few-step DMD timesteps in [0, 1000]
    num_inference_steps: int = 50  # multi-step sampling when ``timesteps`` is None
    guidance_scale: float = 5.0  # > 1 enables CFG with the negative prompt
    attention: str = "dense"  # "vsa" or "dense"
    sparsity: float = 0.0  # VSA sparsity when attention == "vsa"
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    expand_timesteps: bool = False  # Wan2.2 TI2V: one timestep per latent token
    task: str = "t2v"  # fastwan.choices.TASKS
    vae_stride: tuple[int, int, int] = (4, 8, 8)  # VAE downsampling (t, h, w)
    patch_size: tuple[int, int, int] = (1, 2, 2)  # transformer patchify (t, h, w)
    # Wan2.1 I2V: width of the CLIP image features its cross-attention also attends (None:
    # no image cross-attention), and the latent channels it predicts (None: in_channels).
    image_dim: int | None = None
    out_channels: int | None = None
    tile_size: tuple[int, int, int] = (4, 4, 4)  # VSA tile in latent tokens (t, h, w)
    text_length: int = 512  # text tokens the model was trained with (padding included)
    bundled: bool = False  # weights ship inside fastwan (the toy world), no hub download
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def few_step(self) -> bool:
        return self.timesteps is not None

    def latent_shape(
        self, height: int | None = None, width: int | None = None, num_frames: int | None = None
    ) -> tuple[int, int, int, int]:
        """Latent ``[C, T, h, w]`` of a video (the preset's size by default)."""
        height = self.height if height is None else height
        width = self.width if width is None else width
        num_frames = self.num_frames if num_frames is None else num_frames
        grid = latent_grid(num_frames, height, width, self.vae_stride, self.patch_size)
        # Wan2.1 I2V takes 36 channels but generates the VAE's 16
        return (self.in_channels if self.out_channels is None else self.out_channels, *grid)

    def replace(self, **changes) -> WanPreset:
        """A copy with some fields changed (validated like a new preset)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown preset fields {unknown}; valid fields: {_field_names()}")
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        for name in (
            "height",
            "width",
            "num_frames",
            "fps",
            "num_inference_steps",
            "num_layers",
            "text_length",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"preset {self.name!r}: {name} must be a positive int, got {value!r}"
                )
        if self.task not in TASKS:
            raise ValueError(f"preset {self.name!r}: task must be one of {TASKS}")
        if self.attention not in ("vsa", "dense"):
            raise ValueError(f"preset {self.name!r}: attention must be 'vsa' or 'dense'")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"preset {self.name!r}: sparsity must be in [0, 1)")
        if self.flow_shift <= 0:
            raise ValueError(f"preset {self.name!r}: flow_shift must be > 0")


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(WanPreset)]


# Architectures (the checkpoints' transformer/config.json). flow_shift here is only a
# fallback: a folder's scheduler_config.json states its own (fastwan.models.identity).
_WAN21_13B = dict(
    dim=1536, num_layers=30, in_channels=16, num_heads=12, ffn_dim=8960, flow_shift=3.0
)
_WAN21_14B = dict(
    dim=5120, num_layers=40, in_channels=16, num_heads=40, ffn_dim=13824, flow_shift=3.0
)
# Wan2.1 I2V 14B: the T2V 14B with CLIP image cross-attention (image_dim 1280) and 36
# input channels (16 noise + 4 mask + 16 condition latents).
_WAN21_I2V_14B = dict(
    dim=5120,
    num_layers=40,
    in_channels=36,
    num_heads=40,
    ffn_dim=13824,
    image_dim=1280,  # CLIP ViT-H/14
    out_channels=16,
    flow_shift=3.0,
    task="i2v",
)
_WAN22_5B = dict(
    dim=3072,
    num_layers=30,
    in_channels=48,
    num_heads=24,
    ffn_dim=14336,
    vae_stride=(4, 16, 16),
    flow_shift=5.0,
    expand_timesteps=True,
    task="ti2v",
)
# Wan2.2's own negative prompt (FastVideo's Wan2_2_Base_SamplingParam, the Wan2.2 repo).
WAN22_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
# The toy world's tiny Wan (fastwan/toy): 16 x 16 pixels folded 2 x 2 into 12 channels
# plus 3 coordinate channels (ToyPixelVAE), 8 frames, 2 x 2 patches -> an 8 x 4 x 4 token
# grid, 16 VSA tiles of 2 x 2 x 2 tokens.
# A token carries 15 x 2 x 2 = 60 values (a 4 x 4 pixel block): the width must exceed
# that, or the noise outside the output projection's span is never removed by sampling.
# (An earlier 32 x 32 world with 192 values per token trained to noisy 4 x 4 blocks.)
_TOY = dict(
    dim=256,
    num_layers=4,
    in_channels=15,
    num_heads=4,
    ffn_dim=512,
    flow_shift=2.0,
    height=16,
    width=16,
    num_frames=8,
    fps=8,
    vae_stride=(1, 2, 2),
    tile_size=(2, 2, 2),
    text_length=16,
    negative_prompt="",
    bundled=True,
)
# Sampling defaults, each as FastVideo publishes it for the model
# (fastvideo/configs/sample/wan.py; DMD steps and shifts: fastvideo/configs/pipelines/wan.py).
_480P = dict(height=480, width=832, num_frames=81, fps=16)  # WanT2V_1_3B_SamplingParam
_720P = dict(height=720, width=1280, num_frames=81, fps=16)  # WanT2V_14B_SamplingParam
_704P = dict(height=704, width=1280, num_frames=121, fps=24)  # Wan2_2_TI2V_5B_SamplingParam
_FASTWAN_480P = dict(height=448, width=832, num_frames=61, fps=16)  # FastWanT2V480PConfig
_FEW_STEP = dict(timesteps=FASTWAN_TIMESTEPS, guidance_scale=1.0)  # dmd_denoising_steps

PRESETS: dict[str, WanPreset] = {
    p.name: p
    for p in (
        # WanT2V_1_3B_SamplingParam: 50 steps, guidance 3.0.
        WanPreset(
            "wan2.1-t2v-1.3b",
            "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
            **_WAN21_13B,
            **_480P,
            guidance_scale=3.0,
        ),
        # WanT2V_14B_SamplingParam: 720P, 50 steps, guidance 5.0.
        WanPreset("wan2.1-t2v-14b", "Wan-AI/Wan2.1-T2V-14B-Diffusers", **_WAN21_14B, **_720P),
        # WanI2V_14B_480P_SamplingParam: 480 x 832 x 81, 40 steps, guidance 5.0 (shift 3).
        WanPreset(
            "wan2.1-i2v-14b-480p",
            "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
            **_WAN21_I2V_14B,
            **_480P,
            num_inference_steps=40,
        ),
        # WanI2V_14B_720P_SamplingParam: 720 x 1280 x 81, 40 steps, guidance 5.0 (shift 5).
        WanPreset(
            "wan2.1-i2v-14b-720p",
            "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
            **{**_WAN21_I2V_14B, "flow_shift": 5.0},
            **_720P,
            num_inference_steps=40,
        ),
        # Wan2_2_TI2V_5B_SamplingParam: 50 steps, guidance 5.0, Wan2.2's negative prompt.
        WanPreset(
            "wan2.2-ti2v-5b",
            "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
            **_WAN22_5B,
            **_704P,
            negative_prompt=WAN22_NEGATIVE_PROMPT,
        ),
        # FastWan2_1_T2V_480P_Config (shift 8, DMD [1000, 757, 522]) + FastWanT2V480PConfig
        # (61 x 448 x 832, 16 fps); VSA 0.8 as FastVideo's FastWan 1.3B inference runs it.
        WanPreset(
            "fastwan2.1-t2v-1.3b",
            "FastVideo/FastWan2.1-T2V-1.3B-Diffusers",
            **{**_WAN21_13B, "flow_shift": 8.0},
            **_FASTWAN_480P,
            **_FEW_STEP,
            attention="vsa",
            sparsity=0.8,
        ),
        # The same configs as the 1.3B; trained and run at VSA 0.9 (FastVideo's 14B
        # sparse-distill scripts; recipes/wan2.1_t2v_14b_sparse_distill.yaml).
        WanPreset(
            "fastwan2.1-t2v-14b-480p",
            "FastVideo/FastWan2.1-T2V-14B-480P-Diffusers",
            **{**_WAN21_14B, "flow_shift": 8.0},
            **_FASTWAN_480P,
            **_FEW_STEP,
            attention="vsa",
            sparsity=0.9,
            aliases=("fastwan2.1-t2v-14b",),
        ),
        # FastWan2_2_TI2V_5B_Config (shift 5, DMD [1000, 757, 522]) with the 5B's sampling
        # size (704 x 1280, 121 frames, 24 fps); FullAttn: no gates, dense.
        WanPreset(
            "fastwan2.2-ti2v-5b-fullattn",
            "FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers",
            **_WAN22_5B,
            **_704P,
            **_FEW_STEP,
            negative_prompt=WAN22_NEGATIVE_PROMPT,
            attention="dense",
            aliases=("fastwan2.2-ti2v-5b",),
        ),
        WanPreset("toy-teacher", "", **_TOY, num_inference_steps=50, guidance_scale=2.0),
        WanPreset("toy-student", "", **_TOY, **_FEW_STEP, attention="vsa", sparsity=0.75),
        # the image-to-video toy: Wan2.2 TI2V's way (the given frame is the clean first
        # latent frame), same architecture and sampling as the text-to-video pair
        WanPreset(
            "toy-i2v-teacher",
            "",
            **_TOY,
            num_inference_steps=50,
            guidance_scale=2.0,
            expand_timesteps=True,
            task="ti2v",
        ),
        WanPreset(
            "toy-i2v-student",
            "",
            **_TOY,
            **_FEW_STEP,
            attention="vsa",
            sparsity=0.75,
            expand_timesteps=True,
            task="ti2v",
        ),
    )
}


def transformer_config(preset: WanPreset, num_layers: int | None = None) -> dict:
    """diffusers ``WanTransformer3DModel`` config of a preset's architecture (e.g. to build
    it with random weights for a benchmark); ``num_layers`` keeps only the first blocks."""
    layers = preset.num_layers if num_layers is None else num_layers
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    return dict(
        patch_size=preset.patch_size,
        num_attention_heads=preset.num_heads,
        attention_head_dim=preset.dim // preset.num_heads,
        in_channels=preset.in_channels,
        out_channels=preset.in_channels if preset.out_channels is None else preset.out_channels,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=preset.ffn_dim,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
        # Wan2.1 I2V: image keys / values projected from the image embedder's output (dim)
        **(
            {"image_dim": preset.image_dim, "added_kv_proj_dim": preset.dim}
            if preset.image_dim is not None
            else {}
        ),
    )


def _normalise(name: str) -> str:
    """'FastVideo/FastWan2.1-T2V-1.3B-Diffusers' -> 'fastwan2.1-t2v-1.3b'."""
    key = name.strip().rstrip("/").split("/")[-1].lower().replace("_", "-")
    return key[: -len("-diffusers")] if key.endswith("-diffusers") else key


def get_preset(name: str) -> WanPreset:
    """The preset called ``name`` (case-insensitive; a hub id or folder name works too)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"preset must be a non-empty string, got {name!r}")
    key = _normalise(name)
    for preset in PRESETS.values():
        hub = _normalise(preset.hub_id) if preset.hub_id else None
        if key == preset.name or key in preset.aliases or key == hub:
            return preset
    raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")


def infer_preset(source: str, transformer_config: dict, has_gates: bool) -> WanPreset:
    """Find the preset of a checkpoint: by its name (hub id or folder name), else by its
    architecture (a FastWan preset when the checkpoint carries VSA gates)."""
    try:
        return get_preset(source)
    except ValueError:
        pass
    dim = transformer_config.get("num_attention_heads", 0) * transformer_config.get(
        "attention_head_dim", 0
    )
    arch = (dim, transformer_config.get("num_layers"), transformer_config.get("in_channels"))
    matches = [p for p in PRESETS.values() if (p.dim, p.num_layers, p.in_channels) == arch]
    if matches:
        # A gated checkpoint was trained with VSA: prefer the FastWan preset of its size.
        preferred = [p for p in matches if (p.attention == "vsa") == has_gates]
        return (preferred or matches)[0]
    raise ValueError(
        f"cannot tell which model {source!r} is (transformer dim {dim}, "
        f"{transformer_config.get('num_layers')} layers, "
        f"{transformer_config.get('in_channels')} latent channels); pass preset= (--preset) one of "
        f"{sorted(PRESETS)}"
    )

"""Per-GPU memory estimate of a sparse-distillation run (``fastwan plan``), without weights.

A tool over the model code (it imports :mod:`fastwan.models` and :mod:`fastwan.shapes`,
nothing of distributed, methods or train). The three networks of DMD -- student
(generator, trainable), critic (fake score, trainable), teacher (real score, frozen) -- are
diffusers' ``WanTransformer3DModel`` built on the meta device from their configs (a
preset's for a hub id or preset name, ``transformer/config.json`` for a local folder), with
fastwan's VSA gates, and counted tensor by tensor (:class:`WanArch`); no formula of
diffusers' layers is written here, so image-to-video models (image cross-attention, 36
input channels) and future config fields count right by construction. They are planned
under the recipe's layout
``replicate x shard x sequence_parallel``. FSDP2 shards parameters, gradients and optimizer
states over ``shard x sequence_parallel`` ranks (fastwan's mesh: the ranks of an SP group
hold the same weights, see :mod:`fastwan.distributed.mesh`); ``replicate`` copies them.

What is counted, per GPU (bytes):

* parameters in their stored dtype (``model.dtype`` for student and critic, the fp32
  master weights of AdamW in the seed recipes; ``model.teacher_dtype`` for the teacher).
  Every network carries the VSA gates fastwan's loader adds (a ``dim x dim`` linear per
  block, :func:`fastwan.models.vsa.add_vsa_gates`);
* gradients of trainable parameters, in the stored dtype (the gates train only where
  VSA runs: the student with ``vsa.enabled``);
* AdamW states: two moments in the stored dtype (fp32 master weights: the parameters
  themselves are the master copy, so fp32 + 2 fp32 moments = 12 bytes per parameter with
  its gradient 16); an fp32 EMA copy of the student when ``train.ema_decay`` is set;
* activations saved for the backward of ONE trainable network at a time (DMD updates the
  generator and the critic in separate phases; the frozen teacher saves none), derived
  per token and block from what autograd keeps in diffusers' Wan block under bf16 autocast
  (see :func:`block_activation_bytes`, measured), for ``none`` / ``selective`` (block inputs and
  self-attention outputs kept) / ``full`` checkpointing (block inputs kept, one block
  recomputed at a time); tokens per GPU = clip tokens / SP size; times the micro-batch;
* working buffers: with FSDP, the unsharded compute-dtype parameters of two blocks
  (current and prefetched) and one block's unsharded fp32 gradient; without FSDP,
  autocast's compute-dtype copy of a trainable network's fp32 weights;
* a fixed overhead (CUDA context, NCCL buffers, allocator fragmentation).

LoRA (``lora.rank > 0``): the frozen base is counted once per copy held -- for ``dmd``
with ``lora.shared_base`` one copy, the teacher's row, in ``model.teacher_dtype`` -- and
the student and critic rows hold only their adapters (and the student's gates), counted
by injecting them into the meta-device model (:func:`lora_param_count`), in
``model.dtype`` with gradients and AdamW states; activations as for full training (a
frozen Linear saves no input, its adapter's first layer saves the same one).

With ``parallel.cpu_offload`` (FSDP2's ``CPUOffloadPolicy``, multi-GPU runs) the sharded
parameters, gradients, optimizer states and EMA live in host memory: they leave the GPU
total and are reported as host memory per rank.

It is an estimate from first principles, not a measurement: the structure (what scales
with what) and the parameter counts are exact; the activation constants are per-tensor
counts of what diffusers' block saves (re-measured by the tests).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastwan.choices import CHECKPOINT_MODES
from fastwan.shapes import latent_grid

if TYPE_CHECKING:  # torch is imported only when a model is built
    from torch import nn

    from fastwan.config import Recipe

GIB = 1024**3
ROLES = ("student", "critic", "teacher")
_DTYPE_BYTES = {"fp32": 4, "bf16": 2}
DEFAULT_TEXT_LENGTH = 512  # Wan's UMT5 context length (text embeddings are padded to it)


# --------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class WanArch:
    """The sizes of a diffusers ``WanTransformer3DModel`` (with fastwan's VSA gates) that
    memory depends on, read off the model itself: :meth:`from_config` builds it on the meta
    device (no memory, exact shapes) and counts its parameters tensor by tensor."""

    dim: int  # attention heads x head dim
    num_heads: int
    num_layers: int
    ffn_dim: int
    patch_size: tuple[int, int, int]
    image_attention: bool  # I2V: cross-attention also attends CLIP image tokens
    params: int  # every parameter, the VSA gates included
    gate_params: int  # the gates' share of ``params`` (``blocks.N.to_gate_compress``)
    block_params: int  # the largest block, its gate included
    root_params: int  # outside the blocks: patch and condition embedders, output

    @classmethod
    def from_model(cls, model: nn.Module) -> WanArch:
        """From a built ``WanTransformer3DModel`` (any device; gates counted if it has
        them: :func:`fastwan.models.vsa.add_vsa_gates`)."""
        from fastwan.models.vsa import GATE_NAME, transformer_blocks

        blocks = transformer_blocks(model)
        block_sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
        params = sum(p.numel() for p in model.parameters())
        gates = sum(p.numel() for name, p in model.named_parameters() if f".{GATE_NAME}." in name)
        c = model.config
        return cls(
            dim=int(c.num_attention_heads) * int(c.attention_head_dim),
            num_heads=int(c.num_attention_heads),
            num_layers=len(blocks),
            ffn_dim=int(c.ffn_dim),
            patch_size=tuple(int(p) for p in c.patch_size),
            image_attention=c.added_kv_proj_dim is not None,
            params=params,
            gate_params=gates,
            block_params=max(block_sizes, default=0),
            root_params=params - sum(block_sizes),
        )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> WanArch:
        """From a ``transformer/config.json`` dict: diffusers' class built from it on the
        meta device, with the VSA gates fastwan's loader adds (built once per config)."""
        try:
            key = json.dumps(config, sort_keys=True)
        except TypeError as err:
            raise ValueError(f"not a Wan transformer config ({err}): {config!r}") from None
        return _arch_of_config(key)


@functools.lru_cache(maxsize=32)
def _arch_of_config(config_json: str) -> WanArch:
    import torch
    from diffusers import WanTransformer3DModel

    from fastwan.models.vsa import add_vsa_gates

    config = json.loads(config_json)
    try:
        with torch.device("meta"):  # shapes only: a 14B model in a fraction of a second
            model = WanTransformer3DModel.from_config(config)
            add_vsa_gates(model)  # as fastwan's loader does: every network carries them
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"not a Wan transformer config ({err}): {config!r}") from None
    return WanArch.from_model(model)


# CLIP ViT-H/14 image tokens Wan2.1 I2V attends (16 x 16 patches of 224 px + the class
# token; diffusers' WanImageToVideoPipeline image embeddings are [B, 257, 1280]).
I2V_IMAGE_TOKENS = 257


def block_activation_bytes(
    arch: WanArch, compute_bytes: int, text_length: int, image_length: int = I2V_IMAGE_TOKENS
) -> tuple[float, float]:
    """Bytes autograd keeps for one block's backward: ``(per token, per sample)``.

    Counted with ``torch.autograd.graph.saved_tensors_hooks`` on diffusers'
    ``WanTransformerBlock`` under bf16 autocast (tests/test_plan.py re-measures it), per
    token:

    * fp32, ``12 dim``: the LayerNorm inputs and modulated outputs (norm1, norm2, norm3),
      q and k after their RMS norms (autocast runs norms in fp32) and through the rotation,
      the fp32 residual terms; plus norm statistics and per-head softmax statistics;
    * compute dtype, ``10 dim + 2 ffn_dim``: projection inputs, attention q, k, v and
      outputs of self- and cross-attention, the FFN input, GELU input and output;
    * I2V (image cross-attention), ``2 dim`` in the compute dtype and per-head softmax
      statistics more: the second attention over the image keys saves its own copy of
      the query, its output and its log-sum-exp.

    VSA saves no more than dense attention (measured with the torch backend), so the same
    count serves both. Per sample: keys and values of the ``text_length`` text tokens (and
    of the ``image_length`` image tokens under I2V).
    """
    d, f, h = arch.dim, arch.ffn_dim, arch.num_heads
    per_token = 4 * (12 * d + 9 + 2 * h) + compute_bytes * (10 * d + 2 * f)
    context = text_length
    if arch.image_attention:
        per_token += compute_bytes * 2 * d + 4 * h
        context += image_length
    per_sample = compute_bytes * 2 * context * d
    return per_token, per_sample


def rope_bytes_per_token(arch: WanArch) -> int:
    """The rotary cos / sin ``[1, S, 1, head_dim]`` in fp32, shared by all blocks."""
    return 2 * (arch.dim // arch.num_heads) * 4


# ------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Layout:
    """``replicate x shard x sequence_parallel`` ranks of ``nodes x gpus_per_node`` GPUs."""

    replicate: int
    shard: int
    sequence_parallel: int

    def __post_init__(self) -> None:
        for name in ("replicate", "shard", "sequence_parallel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{name} must be a positive int, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.replicate * self.shard * self.sequence_parallel

    @property
    def fsdp_size(self) -> int:
        """Ranks one parameter is sharded over (the SP group shares the shard dimension)."""
        return self.shard * self.sequence_parallel


@dataclass(frozen=True)
class NetworkSpec:
    """One network of the run: its architecture and how it is stored and trained."""

    role: str
    source: str
    arch: WanArch
    dtype: str  # stored dtype of the parameters: "fp32" or "bf16"
    trainable: bool
    vsa: bool  # self-attention runs VSA (its gates train when trainable)
    ema: bool = False  # an fp32 EMA copy is kept (the student)
    # LoRA: the trained parameters are an adapter of this many parameters (its gates
    # included) in adapter_dtype; the base is frozen, held by this row when ``base`` (its
    # ``base_params``, default every parameter of the architecture), else by another row
    adapter_params: int = 0
    adapter_dtype: str = "fp32"
    base: bool = True
    base_params: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_BYTES:
            raise ValueError(f"{self.role}: dtype must be one of {sorted(_DTYPE_BYTES)}")
        if self.adapter_dtype not in _DTYPE_BYTES:
            raise ValueError(f"{self.role}: adapter dtype must be one of {sorted(_DTYPE_BYTES)}")


# ------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class NetworkMemory:
    """Per-GPU bytes of one network."""

    spec: NetworkSpec
    params: int  # parameter count (with gates)
    trainable_params: int
    param_bytes: float
    grad_bytes: float
    optim_bytes: float
    ema_bytes: float
    activation_bytes: dict[str, float]  # by checkpoint mode; 0 for the frozen teacher
    working_bytes: float  # transient buffers while it computes

    @property
    def state_bytes(self) -> float:
        return self.param_bytes + self.grad_bytes + self.optim_bytes + self.ema_bytes


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate for one layout; :meth:`total_bytes` is the per-GPU peak."""

    layout: Layout
    gpu_memory_gb: float
    overhead_gb: float
    cpu_offload: bool  # sharded states in host memory (FSDP2 CPUOffloadPolicy)
    checkpointing: str  # the recipe's mode: the one :attr:`fits` judges
    micro_batch_size: int
    latent_grid: tuple[int, int, int]  # latent (T, H, W)
    tokens: int  # tokens of one clip
    tokens_per_gpu: int  # after the SP split (padded)
    networks: list[NetworkMemory] = field(default_factory=list)

    def activation_bytes(self, mode: str) -> float:
        """One trainable network's graph is alive at a time: the largest counts."""
        return max((n.activation_bytes[mode] for n in self.networks), default=0.0)

    @property
    def state_bytes(self) -> float:
        """Parameters, gradients, optimizer states and EMA of all networks (per rank)."""
        return sum(n.state_bytes for n in self.networks)

    @property
    def gpu_state_bytes(self) -> float:
        return 0.0 if self.cpu_offload else self.state_bytes

    @property
    def working_bytes(self) -> float:
        return max((n.working_bytes for n in self.networks), default=0.0)

    def total_bytes(self, mode: str | None = None) -> float:
        mode = self.checkpointing if mode is None else mode
        return (
            self.gpu_state_bytes
            + self.activation_bytes(mode)
            + self.working_bytes
            + self.overhead_gb * GIB
        )

    def fits_with(self, mode: str) -> bool:
        return self.total_bytes(mode) <= self.gpu_memory_gb * GIB

    @property
    def fits(self) -> bool:
        return self.fits_with(self.checkpointing)

    def table(self) -> str:
        """A text table: one row per network, then the totals per checkpoint mode."""

        def gb(x: float) -> str:
            return f"{x / GIB:9.2f}"

        head = (
            f"{'network':<8} {'params':>8} {'dtype':>5} {'train':>5} "
            f"{'params GB':>9} {'grads GB':>9} {'optim GB':>9} {'EMA GB':>9} "
            f"{'act none':>9} {'act sel.':>9} {'act full':>9}"
        )
        lines = [head, "-" * len(head)]
        for n in self.networks:
            s = n.spec
            train = "yes" if s.trainable else "no"
            dtype = s.dtype
            if s.adapter_params:  # LoRA: the adapter's dtype, or both with a base here
                dtype = "mixed" if s.base and s.adapter_dtype != s.dtype else s.adapter_dtype
            lines.append(
                f"{s.role:<8} {n.params / 1e9:7.2f}B {dtype:>5} {train:>5} "
                f"{gb(n.param_bytes)} {gb(n.grad_bytes)} {gb(n.optim_bytes)} {gb(n.ema_bytes)} "
                + " ".join(gb(n.activation_bytes[m]) for m in CHECKPOINT_MODES)
            )
        lines.append("-" * len(head))
        if self.cpu_offload:
            lines.append(
                f"CPU offload: states {self.state_bytes / GIB:.2f} GB per rank in host memory"
            )
        lines.append(
            f"per GPU: states {self.gpu_state_bytes / GIB:.2f} GB + working buffers "
            f"{self.working_bytes / GIB:.2f} GB + overhead {self.overhead_gb:.2f} GB + "
            "activations of one trainable network:"
        )
        for mode in CHECKPOINT_MODES:
            mark = "  <- recipe" if mode == self.checkpointing else ""
            lines.append(
                f"  checkpointing {mode:<9}: activations {self.activation_bytes(mode) / GIB:7.2f}"
                f" GB, total {self.total_bytes(mode) / GIB:7.2f} of {self.gpu_memory_gb:g} GB"
                f" -> {'fits' if self.fits_with(mode) else 'does NOT fit'}{mark}"
            )
        return "\n".join(lines)


# ------------------------------------------------------------------------------ estimate


def estimate_memory(
    networks: list[NetworkSpec],
    layout: Layout,
    *,
    latent_grid: tuple[int, int, int],
    micro_batch_size: int,
    gpu_memory_gb: float,
    checkpointing: str = "full",
    compute_dtype: str = "bf16",
    text_length: int = DEFAULT_TEXT_LENGTH,
    overhead_gb: float = 4.0,
    cpu_offload: bool = False,
) -> MemoryPlan:
    """Per-GPU memory of ``networks`` trained under ``layout`` (see the module docstring)."""
    if checkpointing not in CHECKPOINT_MODES:
        raise ValueError(
            f"parallel.activation_checkpointing must be one of {CHECKPOINT_MODES}, "
            f"got {checkpointing!r}"
        )
    if compute_dtype not in _DTYPE_BYTES:
        raise ValueError(f"train.mixed_precision must be one of {sorted(_DTYPE_BYTES)}")
    if isinstance(micro_batch_size, bool) or micro_batch_size < 1:
        raise ValueError(f"train.micro_batch_size must be >= 1, got {micro_batch_size!r}")
    if gpu_memory_gb <= 0:
        raise ValueError(f"--gpu-memory-gb must be > 0, got {gpu_memory_gb!r}")
    if overhead_gb < 0:
        raise ValueError(f"--overhead-gb must be >= 0, got {overhead_gb!r}")
    if not networks:
        raise ValueError("estimate_memory needs at least one network")
    archs = {n.arch.patch_size for n in networks}
    if len(archs) != 1:
        raise ValueError(f"the networks have different patch sizes {sorted(archs)}")
    p_t, p_h, p_w = networks[0].arch.patch_size
    T, H, W = latent_grid
    tokens = (T // p_t) * (H // p_h) * (W // p_w)
    if tokens < 1:
        raise ValueError(f"latent grid {latent_grid} holds no token of patch {(p_t, p_h, p_w)}")
    sp, fsdp = layout.sequence_parallel, layout.fsdp_size
    tokens_per_gpu = math.ceil(tokens / sp)
    cbytes = _DTYPE_BYTES[compute_dtype]

    out = []
    for spec in networks:
        arch = spec.arch
        heads = arch.num_heads
        if heads % sp:
            raise ValueError(
                f"{spec.role}: num_attention_heads ({heads}) must be divisible by "
                f"parallel.sequence_parallel ({sp})"
            )
        sbytes = _DTYPE_BYTES[spec.dtype]
        params = (
            arch.params if spec.base_params is None or spec.adapter_params else spec.base_params
        )
        trainable = 0
        if spec.trainable:
            trainable = params if spec.vsa else params - arch.gate_params
        # FSDP2 shards every parameter over `fsdp` ranks (dim-0 chunks, padded).
        param_bytes = params * sbytes / fsdp
        grad_bytes = trainable * sbytes / fsdp
        optim_bytes = 2 * trainable * sbytes / fsdp  # AdamW exp_avg, exp_avg_sq
        ema_bytes = params * 4 / fsdp if spec.ema else 0.0
        if spec.adapter_params:  # LoRA: a frozen base (when held here) and an adapter
            held = (
                (spec.base_params if spec.base_params is not None else params) if spec.base else 0
            )
            trainable = spec.adapter_params if spec.trainable else 0
            abytes = _DTYPE_BYTES[spec.adapter_dtype]
            params = held + spec.adapter_params
            param_bytes = (held * sbytes + spec.adapter_params * abytes) / fsdp
            grad_bytes = trainable * abytes / fsdp
            optim_bytes = 2 * trainable * abytes / fsdp
            ema_bytes = trainable * 4 / fsdp if spec.ema else 0.0

        acts = {m: 0.0 for m in CHECKPOINT_MODES}
        if spec.trainable:
            per_token, per_sample = block_activation_bytes(arch, cbytes, text_length)
            block_full = micro_batch_size * (tokens_per_gpu * per_token + per_sample)
            block_input = micro_batch_size * tokens_per_gpu * arch.dim * cbytes
            # self-attention output kept by the selective mode, with its softmax statistics
            attn_out = micro_batch_size * tokens_per_gpu * (arch.dim * cbytes + 4 * heads // sp)
            # outside the blocks: rotary tables, embeddings, final norm / modulation (fp32)
            root = (
                micro_batch_size * tokens_per_gpu * (4 * 3 * arch.dim + rope_bytes_per_token(arch))
            )
            L = arch.num_layers
            acts["none"] = root + L * block_full
            acts["selective"] = root + L * (block_input + attn_out) + block_full
            acts["full"] = root + L * block_input + block_full

        block = arch.block_params if spec.base or not spec.adapter_params else 0
        if fsdp > 1:
            # unsharded compute-dtype params of the current and the prefetched block, the
            # root's while the whole forward runs, one block's fp32 gradient before
            # its reduce-scatter
            working = (2 * block + arch.root_params) * cbytes
            if spec.trainable and not spec.adapter_params:
                working += block * 4
        elif spec.adapter_params:  # autocast's copies of the (small) fp32 adapter only
            working = (
                spec.adapter_params * cbytes if _DTYPE_BYTES[spec.adapter_dtype] != cbytes else 0.0
            )
        else:
            # autocast keeps compute-dtype copies of fp32 weights for the backward
            working = params * cbytes if (spec.trainable and sbytes != cbytes) else 0.0
        out.append(
            NetworkMemory(
                spec=spec,
                params=params,
                trainable_params=trainable,
                param_bytes=param_bytes,
                grad_bytes=grad_bytes,
                optim_bytes=optim_bytes,
                ema_bytes=ema_bytes,
                activation_bytes=acts,
                working_bytes=float(working),
            )
        )
    return MemoryPlan(
        layout=layout,
        gpu_memory_gb=float(gpu_memory_gb),
        overhead_gb=float(overhead_gb),
        cpu_offload=bool(cpu_offload) and layout.world_size > 1,  # FSDP runs only then
        checkpointing=checkpointing,
        micro_batch_size=micro_batch_size,
        latent_grid=tuple(latent_grid),
        tokens=tokens,
        tokens_per_gpu=tokens_per_gpu,
        networks=out,
    )


# ------------------------------------------------------------------------ from a recipe


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {str(path)!r}: {err}") from None


def resolve_model(source: str) -> tuple[WanArch, tuple[int, int, int], int]:
    """``(architecture, VAE stride (t, h, w), text length)`` of a model, without weights:
    a local Diffusers folder's ``transformer/config.json`` (and ``vae/config.json``), else
    the preset of a hub id or preset name."""
    from fastwan.models.presets import get_preset, infer_preset, transformer_config

    path = Path(source).expanduser()
    if path.exists():
        tdir = path / "transformer" if (path / "transformer").is_dir() else path
        if not (tdir / "config.json").is_file():
            raise ValueError(
                f"model {source!r} has no transformer/config.json; pass a Diffusers Wan folder"
            )
        config = _read_json(tdir / "config.json")
        arch = WanArch.from_config(config)
        stride: tuple[int, int, int] | None = None
        vae_config = tdir.parent / "vae" / "config.json"
        if vae_config.is_file():
            vae = _read_json(vae_config)
            if "scale_factor_temporal" in vae and "scale_factor_spatial" in vae:
                spatial = int(vae["scale_factor_spatial"])
                stride = (int(vae["scale_factor_temporal"]), spatial, spatial)
        text_length = DEFAULT_TEXT_LENGTH
        try:
            preset = infer_preset(str(path), config, has_gates=False)
            stride = stride or tuple(preset.vae_stride)
            text_length = preset.text_length
        except ValueError:
            pass
        return arch, stride or (4, 8, 8), text_length
    try:
        preset = get_preset(source)
    except ValueError:
        raise ValueError(
            f"model {source!r} is neither a local folder nor a known preset / hub id; `fastwan "
            "plan` reads no weights: pass a local Diffusers folder (its transformer/config.json "
            "is enough) or one of the presets' hub ids"
        ) from None
    arch = WanArch.from_config(transformer_config(preset))
    return arch, tuple(preset.vae_stride), preset.text_length


def lora_param_count(arch_config: dict[str, Any], lora: Any, *, gates: bool) -> int:
    """Parameters of one LoRA adapter (``lora``: the recipe's section) on the Wan of
    ``arch_config``, counted by injecting it (peft) into the meta-device model; ``gates``: the
    gates carry a rank-r adapter too."""
    return _lora_count(
        json.dumps(arch_config, sort_keys=True), lora.rank, tuple(lora.target_modules), gates
    )


@functools.lru_cache(maxsize=32)
def _lora_count(config_json: str, rank: int, targets: tuple[str, ...], gates: bool) -> int:
    import torch
    from diffusers import WanTransformer3DModel

    from fastwan.models.lora import adapter_parameters, add_adapter
    from fastwan.models.vsa import GATE_NAME, add_vsa_gates

    config = json.loads(config_json)
    layers = int(config.get("num_layers", 1))

    def count(num_layers: int) -> int:
        with torch.device("meta"):
            model = WanTransformer3DModel.from_config({**config, "num_layers": num_layers})
            add_vsa_gates(model)
        add_adapter(
            model, "plan", rank=rank, target_modules=[*targets, *([GATE_NAME] if gates else [])]
        )
        return sum(p.numel() for p in adapter_parameters(model, "plan").values())

    # The blocks are identical: one block's adapter and the rest (outside the blocks),
    # from a 1- and a 2-block model, give every depth exactly (a 40-block 14B is slow to
    # inject into).
    one = count(1)
    return one + (layers - 1) * (count(2) - one) if layers > 1 else one


def _model_config(source: str) -> dict[str, Any]:
    """The transformer config of ``source`` (a local folder's, else its preset's)."""
    from fastwan.models.presets import get_preset, transformer_config

    path = Path(source).expanduser()
    if path.exists():
        tdir = path / "transformer" if (path / "transformer").is_dir() else path
        return _read_json(tdir / "config.json")
    return transformer_config(get_preset(source))


def _lora_specs(recipe: Recipe) -> list[NetworkSpec]:
    """The rows of a LoRA recipe: each frozen base once per copy held, and the adapters
    (``lora.gates: full`` moves the student's gates from its base to its adapter)."""
    m, t, lora = recipe.model, recipe.train, recipe.lora
    vsa, dmd = recipe.vsa.enabled, t.method == "dmd"
    full_gates = vsa and lora.gates == "full"
    # where each trained role's adapter sits: its own base, or the teacher's (None)
    own = {"student": m.student_path if not dmd or (not lora.shared_base and m.student) else None}
    if dmd:
        own["critic"] = None if lora.shared_base else m.critic_path
    specs = []
    for role, source in own.items():
        gates = role == "student" and vsa
        src = source or m.teacher
        arch = resolve_model(src)[0]
        count = lora_param_count(_model_config(src), lora, gates=gates and lora.gates == "lora")
        count += arch.gate_params if gates and full_gates else 0
        specs.append(
            NetworkSpec(
                role, src, arch, m.teacher_dtype, True, gates,
                role == "student" and t.ema_decay is not None,
                adapter_params=count, adapter_dtype=m.dtype, base=source is not None,
                base_params=arch.params - (arch.gate_params if gates and full_gates else 0),
            )
        )  # fmt: skip
    if dmd:
        arch = resolve_model(m.teacher)[0]
        moved = full_gates and own["student"] is None  # the student's gates left this base
        specs.append(
            NetworkSpec(
                "teacher", m.teacher, arch, m.teacher_dtype, False, False,
                base_params=arch.params - (arch.gate_params if moved else 0),
            )
        )  # fmt: skip
    return specs


def _data_field(name: str) -> str:
    return f"data.{name}"


def plan_recipe(
    recipe: Recipe,
    *,
    nodes: int,
    gpus_per_node: int,
    gpu_memory_gb: float,
    overhead_gb: float = 4.0,
    shard: int | None = None,
) -> MemoryPlan:
    """The estimate for a :class:`fastwan.config.Recipe` on ``nodes x gpus_per_node``
    GPUs. The recipe's ``shard`` (or the ``shard`` argument) and ``sequence_parallel`` are kept;
    ``replicate`` follows the GPU count (it changes no per-GPU number)."""
    for name, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    p = recipe.parallel
    shard = p.shard if shard is None else shard
    world = nodes * gpus_per_node
    inner = shard * p.sequence_parallel
    if world % inner:
        raise ValueError(
            f"{nodes} x {gpus_per_node} = {world} GPUs cannot hold the recipe's parallel.shard "
            f"({shard}) x parallel.sequence_parallel ({p.sequence_parallel}) = {inner} ranks; "
            f"use a GPU count that is a multiple of {inner}, or override --parallel.shard / "
            "--parallel.sequence_parallel"
        )
    layout = Layout(world // inner, shard, p.sequence_parallel)
    m, t, d = recipe.model, recipe.train, recipe.data
    dmd = t.method == "dmd"
    roles = [
        ("student", m.student_path, m.dtype, True, recipe.vsa.enabled, t.ema_decay is not None)
    ]
    if dmd:
        roles += [
            ("critic", m.critic_path, m.dtype, True, False, False),
            ("teacher", m.teacher, m.teacher_dtype, False, False, False),
        ]
    specs, grids, text_length = [], set(), DEFAULT_TEXT_LENGTH
    for role, source, dtype, trainable, vsa, ema in roles:
        arch, stride, text_length = resolve_model(source)
        grids.add(latent_grid(d.num_frames, d.height, d.width, stride, name=_data_field))
        specs.append(NetworkSpec(role, source, arch, dtype, trainable, vsa, ema))
    if getattr(recipe, "lora", None) is not None and recipe.lora.enabled:
        specs = _lora_specs(recipe)
    if len(grids) != 1:
        raise ValueError(f"the networks' VAE strides give different latent grids {grids}")
    return estimate_memory(
        specs,
        layout,
        latent_grid=grids.pop(),
        micro_batch_size=t.micro_batch_size,
        gpu_memory_gb=gpu_memory_gb,
        checkpointing=p.activation_checkpointing,
        compute_dtype=t.mixed_precision,
        text_length=text_length,
        overhead_gb=overhead_gb,
        cpu_offload=bool(getattr(p, "cpu_offload", False)),
    )


def smallest_fitting_shard(
    recipe: Recipe,
    *,
    nodes: int,
    gpus_per_node: int,
    gpu_memory_gb: float,
    overhead_gb: float = 4.0,
) -> int | None:
    """The smallest ``parallel.shard`` (keeping ``sequence_parallel``) with which the
    recipe fits on the GPUs, or ``None`` when no shard size does."""
    world = nodes * gpus_per_node
    sp = recipe.parallel.sequence_parallel
    if world % sp:
        return None
    for shard in range(1, world // sp + 1):
        if (world // sp) % shard == 0:
            plan = plan_recipe(
                recipe,
                nodes=nodes,
                gpus_per_node=gpus_per_node,
                gpu_memory_gb=gpu_memory_gb,
                overhead_gb=overhead_gb,
                shard=shard,
            )
            if plan.fits:
                return shard
    return None

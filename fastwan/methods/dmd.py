"""``dmd``: sparse distillation (DMD2 + VSA) of a Wan teacher into a few-step student.

Three networks, all built from the teacher transformer:

* **generator** (student): a deep copy, VSA in self-attention at ``vsa.sparsity``
  (dense when ``vsa.enabled`` is false), trainable;
* **real score** (teacher): the given transformer itself, dense, frozen (``eval``,
  ``requires_grad`` false), queried with classifier-free guidance on the negative prompt;
* **fake score** (critic): a deep copy, dense, trainable.

A student sample at a training step ("rollout"): one of ``dmd.denoising_timesteps`` ``t_k``
is drawn; ``data``: a dataset latent is noised to ``t_k``; ``simulate``: the student runs
its own few-step sampler from pure noise down to ``t_k`` (no gradient before ``t_k``).
The student's x0 at ``t_k`` is the sample.

* :meth:`DMDMethod.critic_step`: the critic's flow-matching loss on a fresh no-grad
  student sample, re-noised at ``s`` from :func:`sample_dmd_timesteps` (DMD Sec. 3.2).
* :meth:`DMDMethod.generator_step`: the student sample with grad, re-noised at ``s``;
  the teacher's x0 with CFG, the critic's x0 without; :func:`dmd_generator_loss`
  (DMD eq. 7-8).

Image-to-video (batches with ``first_frame_latent``, :func:`fastwan.methods.flow.
image_condition_of`): teacher, critic and student see the same condition, and the teacher's
CFG keeps it in both branches, only the text changing to the negative prompt (as diffusers'
``WanImageToVideoPipeline``). For Wan2.2 TI2V the first latent frame is the clean given
frame everywhere: the rollout's x0 at every step, the re-noised ``x_t`` of both losses (it
is merged into every network input, timestep 0 on its tokens), and no loss is taken on it.
With ``rollout: simulate`` the images come from the (text-only, ``i2v_text``) dataset.

The schedule (:meth:`DMDMethod.updates`, DMD2's two time-scale update rule): the critic
steps on every training step, the generator on every ``dmd.generator_update_interval``-th
(steps 0, k, 2k, ...), before the critic and on the same micro-batches, so the critic
learns on the updated generator.

DMD2's GAN term (``dmd.gan_generator_weight`` > 0, DMD2 Sec. 4.3): a classifier head
(:class:`GANHead`, registered in the critic as ``gan_head``, so the critic's optimizer,
checkpoint and resume carry it) reads the output of one critic block
(``dmd.gan_feature_block``, default the middle one). The critic step adds
``gan_critic_weight x`` :func:`gan_critic_loss` on noised real latents (the batch's) and on
the noised student sample its flow-matching loss already ran on (same noise levels); the
generator step adds ``gan_generator_weight x`` :func:`gan_generator_loss`, its critic call
taken with gradient so that the noised student sample receives it (that one call also
gives the critic's x0 for the DMD loss). It needs batches with latents, also under
``rollout: simulate``. With ``dmd.gan_max_timestep_ratio`` the GAN draws noise levels of
its own, at most that high, and makes its own critic calls (two per critic step, one per
generator step).

All noise comes from the ``torch.Generator`` ``rng`` passed to each call (the
"generator" of DMD is the student network).

LoRA (``lora`` with ``rank > 0``, :mod:`fastwan.methods.adapters`): the student and the
critic are adapters named ``generator`` and ``critic``. With ``lora.shared_base`` both sit
on the teacher itself, one module in three roles: the teacher runs it with adapters off and
dense attention, the student with its adapter and VSA, the critic with its adapter, dense.
Each call switches the module to its role (adapter and cached attention processors), and
every loss returns with the module in the configuration of the role it trains, so that
activation checkpointing recomputes that role's forward in backward. Without
``shared_base`` the critic has a frozen base of its own (``critic``, or a copy of the
teacher), and so does the student when ``student`` is given. Only adapters (and the
student's gates) train.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from fastwan.config import DMDConfig, LoRAConfig, VSAConfig
from fastwan.diffusion.flow import NUM_TRAIN_TIMESTEPS, add_noise, x0_from_velocity
from fastwan.diffusion.image_condition import ImageCondition
from fastwan.methods.adapters import attach_adapter, freeze_except_adapters, role_parameters
from fastwan.methods.flow import (
    _check_rng,
    _param_device,
    call_transformer,
    draw_noise,
    generated_frames,
    image_condition_of,
    keep_given_frames,
    latents_of,
    text_condition,
)
from fastwan.methods.losses import (
    cfg_combine,
    dmd_generator_loss,
    flow_matching_loss,
    gan_critic_loss,
    gan_generator_loss,
    sample_dmd_timesteps,
)
from fastwan.models.lora import init_lora_weights, use_adapter
from fastwan.models.vsa import set_attention, transformer_blocks

__all__ = ["DMDMethod", "GANHead"]


class GANHead(nn.Module):
    """DMD2's GAN classifier on critic features: ``[B, S, D]`` block output -> ``[B]``
    logits (a per-token MLP, averaged over the S tokens; > 0 reads "real")."""

    def __init__(
        self,
        dim: int,
        seed: int = 0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, **kw)
        self.proj = nn.Linear(dim, dim, **kw)
        self.out = nn.Linear(dim, 1, **kw)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        """PyTorch's default ``nn.Linear`` draw (uniform in +-1/sqrt(fan_in)), from ``seed``."""
        rng = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for lin in (self.proj, self.out):
                bound = lin.in_features**-0.5
                for p in (lin.weight, lin.bias):
                    draw = torch.rand(p.shape, generator=rng, dtype=torch.float32) * 2 - 1
                    p.copy_(draw * bound)

    def forward(self, h_bsd: torch.Tensor) -> torch.Tensor:
        x = self.norm(h_bsd.to(self.proj.weight.dtype))  # [B, S, D]
        return self.out(nn.functional.silu(self.proj(x)))[..., 0].float().mean(1)  # [B]


def _same_on_all_ranks(value: int, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank. The rollout length decides how many times the
    student runs; FSDP2 all-gathers its parameters on every call, so ranks that drew
    different lengths would run mismatched collectives (a crash or a hang)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    on_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.int64, device=on_device)
    dist.broadcast(t, src=0)
    return int(t.item())


class DMDMethod:
    """DMD2 with a VSA student.

    Args:
        teacher: the Wan transformer to distil; becomes the frozen real score (its
            self-attention is set to dense). Student and critic are deep copies of it
            unless given.
        dmd: timesteps, timestep range, CFG scale, rollout, flow shift.
        vsa: the student's sparse attention (``enabled`` false: a dense student).
        negative_embedding: the negative prompt's embedding ``[L, dim]`` or ``[1, L, dim]``
            (the teacher's "uncond" branch); its valid tokens alone will do: it is
            zero-padded to the batch's text length, as the pipeline pads it.
        negative_mask: its token mask ``[L]`` or ``[1, L]`` (padding is zeroed); optional.
        latent_shape: ``(C, T, H, W)`` of the latents the student generates; needed by
            ``dmd.rollout: simulate`` on text-only batches (batches with latents give it).
        student, critic: separately loaded networks (``model.student`` / ``model.critic``,
            e.g. in the trainable dtype) to use instead of copies of the teacher; they are
            set to VSA / dense and made trainable here.
        expand_timesteps: Wan2.2 TI2V -- every network gets one timestep per latent token
            ``[B, S]`` (the folder's ``model_index.json`` ``expand_timesteps``).
        lora: train LoRA adapters instead of the networks (``rank > 0``; see the module
            docstring); ``lora_dtype``: the adapters' (and full gates') dtype (default:
            the base's); ``seed``: seeds their initialisation and the GAN head's
            (``train.seed``).
        vae_scale_temporal: pixel frames per latent frame of the folder's VAE (Wan2.1 I2V's
            frame mask; 4 for Wan).
    """

    name = "dmd"
    roles = ("generator", "critic")

    def __init__(
        self,
        teacher: nn.Module,
        dmd: DMDConfig,
        vsa: VSAConfig,
        negative_embedding: torch.Tensor,
        negative_mask: torch.Tensor | None = None,
        latent_shape: tuple[int, int, int, int] | None = None,
        student: nn.Module | None = None,
        critic: nn.Module | None = None,
        expand_timesteps: bool = False,
        lora: LoRAConfig | None = None,
        lora_dtype: torch.dtype | None = None,
        seed: int = 0,
        vae_scale_temporal: int = 4,
    ) -> None:
        if (
            isinstance(vae_scale_temporal, bool)
            or not isinstance(vae_scale_temporal, int)
            or (vae_scale_temporal < 1)
        ):
            raise ValueError(
                f"vae_scale_temporal must be a positive int (Wan: 4), got {vae_scale_temporal!r}"
            )
        self.vae_scale_temporal = vae_scale_temporal
        for role, net in (("teacher", teacher), ("student", student), ("critic", critic)):
            if (net is not None or role == "teacher") and not isinstance(net, nn.Module):
                raise ValueError(f"{role} must be a torch.nn.Module, got {type(net).__name__}")
        given = [net for net in (teacher, student, critic) if net is not None]
        if len({id(net) for net in given}) != len(given):
            raise ValueError(
                "teacher, student and critic must be distinct modules (pass None to copy the "
                "teacher)"
            )
        if not isinstance(dmd, DMDConfig):
            raise ValueError(f"dmd must be a DMDConfig, got {type(dmd).__name__}")
        if not isinstance(vsa, VSAConfig):
            raise ValueError(f"vsa must be a VSAConfig, got {type(vsa).__name__}")
        self.dmd = dmd
        self.vsa = vsa
        self.expand_timesteps = bool(expand_timesteps)
        self.compute_device: torch.device | None = None  # set under FSDP CPU offload
        self.negative = self._negative(negative_embedding, negative_mask)  # [1, L, dim]
        if latent_shape is not None:
            latent_shape = tuple(latent_shape)
            if len(latent_shape) != 4 or any(
                isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in latent_shape
            ):
                raise ValueError(
                    f"latent_shape must be four positive ints (C, T, H, W), got {latent_shape!r}"
                )
        self.latent_shape = latent_shape
        if lora is not None and not isinstance(lora, LoRAConfig):
            raise ValueError(f"lora must be a LoRAConfig, got {type(lora).__name__}")
        self.lora = lora if lora is not None and lora.enabled else None
        self._seed = int(seed)
        # role -> (module, its adapter or None, its self-attention processors): LoRA only
        self._configs: dict[str, tuple[nn.Module, str | None, list]] = {}
        if self.lora is not None:
            self._build_lora(teacher, student, critic, lora_dtype, seed)
            return

        self.student = student if student is not None else copy.deepcopy(teacher)
        if vsa.enabled:
            set_attention(
                self.student,
                "vsa",
                sparsity=vsa.sparsity,
                tile_size=vsa.tile_size,
                backend=vsa.backend,
            )
        else:
            set_attention(self.student, "dense")
        self.student.requires_grad_(True).train()

        self.critic = critic if critic is not None else copy.deepcopy(teacher)
        set_attention(self.critic, "dense")
        self.critic.requires_grad_(True).train()

        self.teacher = teacher
        set_attention(self.teacher, "dense")
        self.teacher.requires_grad_(False).eval()
        self._gan_block: nn.Module | None = None
        if dmd.gan:
            self._attach_gan_head()

    def _attach_gan_head(self) -> None:
        blocks = transformer_blocks(self.critic)
        k = self.dmd.gan_feature_block
        k = len(blocks) // 2 if k is None else k
        if k >= len(blocks):
            raise ValueError(
                f"dmd.gan_feature_block is {k} but the critic has {len(blocks)} blocks "
                f"(0 to {len(blocks) - 1}); set it lower, or null for the middle block"
            )
        self._gan_block = blocks[k]
        if not isinstance(getattr(self.critic, "gan_head", None), GANHead):
            ref = next(self.critic.parameters())
            dim = self.critic.config.num_attention_heads * self.critic.config.attention_head_dim
            head = GANHead(dim, seed=self._seed, device=ref.device, dtype=ref.dtype)
            self.critic.add_module("gan_head", head)

    def _critic_with_logits(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        image: ImageCondition | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The critic's velocity ``[B, C, T, H, W]`` and its GAN head's logits ``[B]`` from
        the same call (the head reads the output of ``dmd.gan_feature_block``)."""
        assert self._gan_block is not None
        captured: list[torch.Tensor] = []

        def keep(_module, _args, output):  # the first call only (not a checkpoint recompute)
            if not captured:
                captured.append(output[0] if isinstance(output, tuple) else output)

        handle = self._gan_block.register_forward_hook(keep)
        try:
            v = self._call("critic", x, t, cond, image)
        finally:
            handle.remove()
        return v, self.critic.gan_head(captured[0])  # [B, C, T, H, W], [B]

    def _build_lora(
        self,
        teacher: nn.Module,
        student: nn.Module | None,
        critic: nn.Module | None,
        dtype: torch.dtype | None,
        seed: int,
    ) -> None:
        lora, vsa = self.lora, self.vsa
        assert lora is not None
        if lora.shared_base and (student is not None or critic is not None):
            raise ValueError(
                "lora.shared_base: the student and the critic are adapters on the teacher; "
                "pass student=None and critic=None (model.student / model.critic: null), or "
                "set lora.shared_base: false to give them bases of their own"
            )
        self.teacher = teacher
        self.student = student if student is not None else teacher
        if lora.shared_base:
            self.critic = teacher
        else:
            self.critic = critic if critic is not None else copy.deepcopy(teacher)
        bases = list({id(n): n for n in (self.teacher, self.student, self.critic)}.values())
        for role, net in (("generator", self.student), ("critic", self.critic)):
            attach_adapter(net, role, lora, vsa_enabled=vsa.enabled, dtype=dtype, seed=seed)
        freeze_except_adapters(bases, [self.trained_parameters(r) for r in self.roles])
        for net in bases:
            net.train()  # no dropout in Wan's base; the adapters' dropout is on while training

        def processors(net: nn.Module, mode: str) -> list:
            if mode == "vsa":
                set_attention(
                    net, "vsa", sparsity=vsa.sparsity, tile_size=vsa.tile_size, backend=vsa.backend
                )
            else:
                set_attention(net, "dense")
            return [block.attn1.processor for block in transformer_blocks(net)]

        # Each module's processors per attention mode, built once (a processor reads its
        # own module's grid state): switching roles swaps these objects in.
        dense = {id(n): processors(n, "dense") for n in bases}
        student_procs = processors(self.student, "vsa") if vsa.enabled else dense[id(self.student)]
        self._configs = {
            "teacher": (self.teacher, None, dense[id(self.teacher)]),
            "critic": (self.critic, "critic", dense[id(self.critic)]),
            "student": (self.student, "generator", student_procs),
        }
        for name in ("teacher", "critic", "student"):  # every module in its last role
            self._configure(name)

    def _configure(self, name: str) -> nn.Module:
        """The module of ``name`` (``student``, ``critic``, ``teacher``), switched to that
        network's adapter and attention (LoRA; without it each network is its own)."""
        if not self._configs:
            return {"student": self.student, "critic": self.critic, "teacher": self.teacher}[name]
        net, adapter, procs = self._configs[name]
        use_adapter(net, adapter)
        for block, proc in zip(transformer_blocks(net), procs):
            block.attn1.set_processor(proc)
        return net

    @staticmethod
    def _negative(emb: Any, mask: Any) -> torch.Tensor:
        if not isinstance(emb, torch.Tensor) or emb.dim() not in (2, 3):
            raise ValueError(
                "negative_embedding must be the negative prompt's embedding [L, dim] or "
                f"[1, L, dim], got "
                f"{tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__}"
            )
        if emb.dim() == 3:
            if emb.shape[0] != 1:
                raise ValueError(
                    f"negative_embedding must hold one prompt ([1, L, dim]), got {tuple(emb.shape)}"
                )
            emb = emb[0]
        emb = emb.detach().clone()  # [L, dim]
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.reshape(-1).shape[0] != emb.shape[0]:
                raise ValueError(
                    f"negative_mask must be [L] with L = {emb.shape[0]} (the embedding's "
                    "length), or None"
                )
            emb = emb * mask.reshape(-1).bool()[:, None].to(emb.dtype)
        return emb[None]  # [1, L, dim]

    # ------------------------------------------------------------------ interface
    @property
    def device(self) -> torch.device:
        """Where the method computes: ``compute_device`` when set (FSDP CPU offload keeps
        the parameters on the CPU), else the device of the trained network."""
        if self.compute_device is not None:
            return self.compute_device
        return _param_device(self.student)

    def networks(self) -> dict[str, nn.Module]:
        """The trainable networks by optimizer role."""
        return {"generator": self.student, "critic": self.critic}

    def frozen_networks(self) -> dict[str, nn.Module]:
        """The frozen real score (none of its own when it is the LoRA roles' shared base)."""
        if self.teacher is self.student or self.teacher is self.critic:
            return {}
        return {"teacher": self.teacher}

    def trained_parameters(self, role: str) -> dict[str, nn.Parameter]:
        """What ``role`` trains: its whole network, or with LoRA its adapter (and for the
        generator of a VSA student its gates, ``lora.gates``)."""
        net = self.networks()[role]
        if self.lora is None:
            return {n: p for n, p in net.named_parameters() if p.requires_grad}
        return role_parameters(net, role, self.lora, vsa_enabled=self.vsa.enabled)

    def init_adapters(self) -> None:
        """(Re)initialise the adapters from the seed (LoRA; e.g. once networks built on the
        meta device have their memory: the same values on any mesh)."""
        if self.lora is None:
            raise ValueError("this DMDMethod trains no LoRA adapters (lora.rank is 0)")
        for role, net in self.networks().items():
            init_lora_weights(net, role, init=self.lora.init, seed=self._seed)

    def prepare(self, role: str) -> None:
        """Switch the (shared) network of ``role`` to run as that role (validation)."""
        self._configure("student" if role == "generator" else "critic")

    def set_step(self, step: int) -> None:
        """Nothing changes with the step: the student keeps ``vsa.sparsity`` throughout."""
        del step

    def updates(self, step: int) -> tuple[str, ...]:
        """The generator on every ``dmd.generator_update_interval``-th step (from step 0),
        then the critic on every step."""
        if step % self.dmd.generator_update_interval == 0:
            return ("generator", "critic")
        return ("critic",)

    def loss(
        self, role: str, batch: Mapping[str, Any], rng: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """:meth:`generator_step` (role ``generator``) or :meth:`critic_step` (``critic``)."""
        if role == "generator":
            out = self.generator_step(batch, rng)
        elif role == "critic":
            out = self.critic_step(batch, rng)
        else:
            raise ValueError(f"DMDMethod has the roles {self.roles}, not {role!r}")
        # a shared network is left as the trained role: backward's recomputation
        # (activation checkpointing) must run that role's forward again
        self.prepare(role)
        return out

    @property
    def sparsity(self) -> float:
        """The student's VSA sparsity (0 for a dense student)."""
        return float(self.vsa.sparsity) if self.vsa.enabled else 0.0

    def _call(
        self,
        name: str,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        image: ImageCondition | None = None,
    ) -> torch.Tensor:
        """Velocity of network ``name`` (``student``, ``critic``, ``teacher``; timesteps
        ``t`` [B], per token for Wan2.2) under the image condition ``image``, if any."""
        net = self._configure(name)
        return call_transformer(
            net, x, t, cond, expand_timesteps=self.expand_timesteps, image=image
        )

    # ------------------------------------------------------------------ pieces
    def _inputs(
        self, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, ImageCondition | None]:
        """(text condition [B, L, dim], negative [B, L', dim], data latents or None, the
        image condition or None)."""
        device = self.device
        dtype = next(self.student.parameters()).dtype
        cond = text_condition(batch, device, dtype)  # [B, L, dim]
        b = cond.shape[0]
        neg = self.negative.to(device=device, dtype=dtype)  # [1, L', dim]
        if neg.shape[-1] != cond.shape[-1]:
            raise ValueError(
                f"negative_embedding has dim {neg.shape[-1]} but the batch's text embeddings "
                f"have {cond.shape[-1]}; encode both with the same text encoder"
            )
        n_neg, n_text = neg.shape[1], cond.shape[1]
        if n_neg > n_text:
            raise ValueError(
                f"the negative prompt has {n_neg} tokens, more than the batch's {n_text} "
                "(data.text_length); raise data.text_length or shorten dmd.negative_prompt"
            )
        # Zero-padded to the condition's length, as the pipeline and the data pad every
        # prompt: Wan's cross-attention has no text mask, so padding tokens count.
        neg = F.pad(neg, (0, 0, 0, n_text - n_neg)).expand(b, -1, -1)  # [B, L, dim]
        latents = None
        if self.dmd.rollout == "data" or self.dmd.gan:  # the GAN term's real latents
            latents = latents_of(batch, device)  # [B, C, T, H, W]
            if latents.shape[0] != b:
                raise ValueError(f"batch has {latents.shape[0]} latents but {b} text embeddings")
        image = image_condition_of(
            batch,
            self.teacher,
            self._latent_shape(batch, b),
            expand_timesteps=self.expand_timesteps,
            vae_scale_temporal=self.vae_scale_temporal,
            device=device,
        )
        return cond, neg, latents, image

    def _latent_shape(self, batch: Mapping[str, Any], b: int) -> tuple[int, ...]:
        if batch.get("latents") is not None:
            return tuple(batch["latents"].shape)
        if self.latent_shape is None:
            raise ValueError(
                "dmd.rollout 'simulate' on a text-only batch needs latent_shape=(C, T, H, W) "
                "when building DMDMethod (the shape of the latents to generate)"
            )
        return (b, *self.latent_shape)

    def student_sample(
        self,
        batch: Mapping[str, Any],
        rng: torch.Generator,
        cond: torch.Tensor,
        latents: torch.Tensor | None,
        image: ImageCondition | None = None,
    ) -> tuple[torch.Tensor, float]:
        """The student's x0 ``[B, C, T, H, W]`` at a random denoising timestep ``t_k``
        (gradient flows only through the final student call); returns (x0, t_k). Under a
        TI2V ``image`` every x0 of the rollout keeps the given first frame."""
        steps = self.dmd.denoising_timesteps
        device = self.device
        k = _same_on_all_ranks(
            int(torch.randint(len(steps), (1,), generator=rng, device=rng.device)),
            device,
        )
        b = cond.shape[0]
        if self.dmd.rollout == "data":
            assert latents is not None
            s_k = steps[k] / NUM_TRAIN_TIMESTEPS
            eps = draw_noise(latents.shape, rng, device)  # [B, C, T, H, W]
            x = add_noise(latents, eps, s_k)  # [B, C, T, H, W]
        else:  # simulate: the student's own sampler from pure noise down to t_k
            x = draw_noise(self._latent_shape(batch, b), rng, device)
            with torch.no_grad():
                for j in range(k):
                    s_j = steps[j] / NUM_TRAIN_TIMESTEPS
                    t_j = torch.full((b,), float(steps[j]), device=device)  # [B]
                    v = self._call("student", x, t_j, cond, image)
                    x0 = keep_given_frames(x0_from_velocity(x, v, s_j), image)
                    eps = draw_noise(x0.shape, rng, device)
                    x = add_noise(x0, eps, steps[j + 1] / NUM_TRAIN_TIMESTEPS)
        t_k = torch.full((b,), float(steps[k]), device=device)  # [B]
        v = self._call("student", x, t_k, cond, image)  # [B, C, T, H, W]
        x0 = keep_given_frames(x0_from_velocity(x, v, steps[k] / NUM_TRAIN_TIMESTEPS), image)
        return x0, float(steps[k])

    def _dmd_noise(
        self, b: int, rng: torch.Generator, max_ratio: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise levels s [B] and timesteps t [B] of the losses (``max_ratio``: another
        upper clamp than ``dmd.max_timestep_ratio``, the GAN's own)."""
        return sample_dmd_timesteps(
            b,
            rng,
            self.dmd.flow_shift,
            self.dmd.min_timestep_ratio,
            self.dmd.max_timestep_ratio if max_ratio is None else max_ratio,
            self.device,
        )  # s [B], t [B]

    def _gan_own_levels(
        self,
        x0: torch.Tensor,
        rng: torch.Generator,
        cond: torch.Tensor,
        image: ImageCondition | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """GAN logits [B] of ``x0`` noised at levels of the GAN's own (at most
        ``dmd.gan_max_timestep_ratio``), with those levels s [B] and timesteps t [B]."""
        s, t = self._dmd_noise(x0.shape[0], rng, self.dmd.gan_max_timestep_ratio)
        x_t = add_noise(x0, draw_noise(x0.shape, rng, self.device), s)  # [B, C, T, H, W]
        return self._critic_with_logits(x_t, t, cond, image)[1], s, t

    # ------------------------------------------------------------------ losses
    def critic_step(
        self, batch: Mapping[str, Any], rng: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Critic (fake score) flow-matching loss on a fresh no-grad student sample."""
        _check_rng(rng)
        cond, _neg, latents, image = self._inputs(batch)
        with torch.no_grad():
            x0_gen, t_k = self.student_sample(batch, rng, cond, latents, image)  # [B, C, T, H, W]
        s, t = self._dmd_noise(x0_gen.shape[0], rng)  # [B], [B]
        eps = draw_noise(x0_gen.shape, rng, self.device)  # [B, C, T, H, W]
        x_t = add_noise(x0_gen, eps, s)  # [B, C, T, H, W] (TI2V: clean frame 0 merged in)
        info = {"rollout_timestep": t_k, "timestep": float(t.mean())}
        gan = None
        if not self.dmd.gan:
            v = self._call("critic", x_t, t, cond, image)  # [B, C, T, H, W]
        else:
            assert latents is not None
            if self.dmd.gan_max_timestep_ratio is None:  # the GAN reads this very call
                v, logits_fake = self._critic_with_logits(x_t, t, cond, image)
            else:  # the GAN's own (lower) noise levels
                v = self._call("critic", x_t, t, cond, image)
                logits_fake, s, t = self._gan_own_levels(x0_gen, rng, cond, image)
                info["gan_timestep"] = float(t.mean())
            x_real = add_noise(latents, draw_noise(latents.shape, rng, self.device), s)
            _, logits_real = self._critic_with_logits(x_real, t, cond, image)  # [B]
            gan = gan_critic_loss(logits_real, logits_fake)
            info.update(
                gan_loss=float(gan.detach()),
                gan_real_accuracy=float((logits_real > 0).float().mean()),
                gan_fake_accuracy=float((logits_fake < 0).float().mean()),
            )
        # TI2V: no loss on the given first frame
        loss = flow_matching_loss(*(generated_frames(y, image) for y in (v, x0_gen, eps)))
        if gan is not None:
            loss = loss + self.dmd.gan_critic_weight * gan
        return loss, info

    def generator_step(
        self, batch: Mapping[str, Any], rng: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Distribution-matching loss of the student (gradient only into the student)."""
        _check_rng(rng)
        cond, neg, latents, image = self._inputs(batch)
        x0_gen, t_k = self.student_sample(batch, rng, cond, latents, image)  # with grad
        s, t = self._dmd_noise(x0_gen.shape[0], rng)  # [B], [B]
        eps = draw_noise(x0_gen.shape, rng, self.device)  # [B, C, T, H, W]
        gan = v_fake = None
        info: dict[str, float] = {}
        if self.dmd.gan and self.dmd.gan_max_timestep_ratio is None:
            # one critic call with grad: the GAN logits and the DMD loss's x0
            x_t_grad = add_noise(x0_gen, eps, s)  # [B, C, T, H, W]
            v_fake, logits = self._critic_with_logits(x_t_grad, t, cond, image)
            gan = gan_generator_loss(logits)
        elif self.dmd.gan:  # the GAN's own (lower) noise levels
            logits, _, t_gan = self._gan_own_levels(x0_gen, rng, cond, image)
            gan = gan_generator_loss(logits)
            info["gan_timestep"] = float(t_gan.mean())
        with torch.no_grad():
            x_t = add_noise(x0_gen.detach(), eps, s)  # [B, C, T, H, W] (TI2V: frame 0 merged)
            x0_cond = x0_from_velocity(x_t, self._call("teacher", x_t, t, cond, image), s)
            w = self.dmd.guidance_scale
            if w == 1.0:
                x0_real = x0_cond
            else:  # the I2V pipeline's CFG: the same image in both branches, text negated
                v_neg = self._call("teacher", x_t, t, neg, image)
                x0_real = cfg_combine(x0_cond, x0_from_velocity(x_t, v_neg, s), w)
            if v_fake is None:
                v_fake = self._call("critic", x_t, t, cond, image)
            x0_fake = x0_from_velocity(x_t, v_fake.detach(), s)
        # TI2V: the distribution is matched on the generated frames, not the given one
        loss, g = dmd_generator_loss(
            *(generated_frames(y, image) for y in (x0_gen, x0_real, x0_fake)), return_grad=True
        )
        info.update(
            rollout_timestep=t_k, timestep=float(t.mean()), dmd_grad_abs=float(g.abs().mean())
        )
        if gan is not None:
            info["gan_loss"] = float(gan.detach())
            loss = loss + self.dmd.gan_generator_weight * gan
        return loss, info

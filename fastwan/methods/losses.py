"""Loss math of the training methods: pure tensor-in / tensor-out functions.

Conventions follow :mod:`fastwan.diffusion.flow`: a noise level ``s`` in [0, 1] and a
timestep ``t = 1000 s``; ``x_t = (1 - s) x0 + s eps``; networks predict the velocity
``v = eps - x0`` and ``x0 = x_t - s v``.

Papers cited below:

* DMD  -- Yin et al., "One-step Diffusion with Distribution Matching Distillation",
  CVPR 2024 (arXiv:2311.18828).
* DMD2 -- Yin et al., "Improved Distribution Matching Distillation for Fast Image
  Synthesis", NeurIPS 2024 (arXiv:2405.14867).
* CFG  -- Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022 (arXiv:2207.12598).
* SD3  -- Esser et al., "Scaling Rectified Flow Transformers", 2024 (timestep shift, eq. 23).
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from fastwan.diffusion.flow import NUM_TRAIN_TIMESTEPS, shift_sigma, velocity_target

__all__ = [
    "cfg_combine",
    "dmd_generator_loss",
    "dmd_gradient",
    "flow_matching_loss",
    "gan_critic_loss",
    "gan_generator_loss",
    "sample_dmd_timesteps",
    "standard_to_fastvideo_guidance",
    "fastvideo_to_standard_guidance",
]

# Smallest value the DMD normaliser mean|x0_gen - x0_real| is clamped to.
DMD_NORM_EPS = 1e-6


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64 ("float32 or better")."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point or dtype.is_complex:
        raise ValueError(f"expected real floating-point tensors, got {[t.dtype for t in tensors]}")
    return dtype


def _check_same_shape(**tensors: torch.Tensor) -> None:
    names = list(tensors)
    first = tensors[names[0]]
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 1:
            raise ValueError(f"{name} must have a leading batch dimension, got a 0-d tensor")
        if t.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {names[0]} has {tuple(first.shape)}; "
                "all inputs must have the same [B, ...] shape"
            )


def sample_dmd_timesteps(
    batch: int,
    rng: torch.Generator,
    shift: float,
    min_ratio: float = 0.02,
    max_ratio: float = 0.98,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise levels for the distribution-matching and critic losses.

    ``u ~ U(0, 1)`` per sample, timestep-shifted (SD3 eq. 23,
    ``s = shift u / (1 + (shift - 1) u)``), then clamped to ``[min_ratio, max_ratio]``
    (DMD2 trains on ``t`` in [0.02, 0.98] x 1000, away from the degenerate ends).

    Args:
        batch: number of samples ``B``.
        rng: the only source of randomness; draws happen on ``rng.device``.
        shift: timestep shift (> 0; 1 = none). Wan: 8 (1.3B), 3 (14B), 5 (5B).
        min_ratio, max_ratio: clamp range of ``s``, ``0 <= min_ratio <= max_ratio <= 1``.
        device: where the results go (default: ``rng``'s device).

    Returns:
        ``(s, t)``: noise levels ``s`` [B] float32 and timesteps ``t = 1000 s`` [B] float32.
    """
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if not isinstance(rng, torch.Generator):
        raise ValueError(
            f"rng must be a torch.Generator, got {type(rng).__name__}; "
            "pass torch.Generator().manual_seed(seed)"
        )
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (1 disables the shift), got {shift!r}")
    if not 0.0 <= min_ratio <= max_ratio <= 1.0:
        raise ValueError(
            f"need 0 <= min_ratio <= max_ratio <= 1, got min_ratio={min_ratio!r}, "
            f"max_ratio={max_ratio!r}"
        )
    u = torch.rand(batch, generator=rng, device=rng.device, dtype=torch.float64)
    s = shift_sigma(u, float(shift)).clamp(min_ratio, max_ratio)  # [B] float64
    s = s.to(device=device if device is not None else rng.device, dtype=torch.float32)
    return s, s * NUM_TRAIN_TIMESTEPS


def dmd_gradient(
    x0_gen: torch.Tensor,
    x0_real: torch.Tensor,
    x0_fake: torch.Tensor,
    eps: float = DMD_NORM_EPS,
) -> torch.Tensor:
    """Distribution-matching gradient on the generator's sample (DMD eq. 7 and 8).

    DMD eq. 7 moves a generator sample ``x`` along ``s_fake(x_t) - s_real(x_t)`` (the
    gradient of the approximate KL(p_fake || p_real)); with x0-predictions
    ``mu = E[x0 | x_t]`` the score difference is proportional to ``mu_fake - mu_real``.
    Eq. 8 normalises it per sample by the mean absolute error of the real model,
    ``w = C S / ||mu_real(x_t) - x||_1``, so:

        g = (x0_fake - x0_real) / mean_{non-batch dims} |x0_gen - x0_real|

    Descending ``g`` (see :func:`dmd_generator_loss`) moves ``x0_gen`` towards the real
    (teacher) prediction and away from the fake (critic) one.

    Args:
        x0_gen: [B, ...] the generator's sample ``x``.
        x0_real: [B, ...] the frozen teacher's x0-prediction at ``x_t`` (with CFG).
        x0_fake: [B, ...] the critic's x0-prediction at the same ``x_t``.
        eps: the per-sample normaliser is clamped to at least this (no division by zero).

    Returns:
        g: [B, ...], detached, in float32 (float64 if any input is float64); non-finite
        entries are replaced by 0.
    """
    _check_same_shape(x0_gen=x0_gen, x0_real=x0_real, x0_fake=x0_fake)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    dtype = _compute_dtype(x0_gen, x0_real, x0_fake)
    with torch.no_grad():
        gen, real, fake = (x.detach().to(dtype) for x in (x0_gen, x0_real, x0_fake))
        b = gen.shape[0]
        norm = (gen - real).abs().reshape(b, -1).mean(dim=1).clamp_min(eps)  # [B]
        norm = norm.view(b, *([1] * (gen.dim() - 1)))  # [B, 1, ...]
        g = (fake - real) / norm  # [B, ...]
        return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


@overload
def dmd_generator_loss(
    x0_gen: torch.Tensor,
    x0_real: torch.Tensor,
    x0_fake: torch.Tensor,
    return_grad: Literal[False] = ...,
    eps: float = ...,
) -> torch.Tensor: ...


@overload
def dmd_generator_loss(
    x0_gen: torch.Tensor,
    x0_real: torch.Tensor,
    x0_fake: torch.Tensor,
    return_grad: Literal[True],
    eps: float = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def dmd_generator_loss(
    x0_gen: torch.Tensor,
    x0_real: torch.Tensor,
    x0_fake: torch.Tensor,
    return_grad: bool = False,
    eps: float = DMD_NORM_EPS,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Generator loss of DMD / DMD2: ``0.5 * MSE(x0_gen, stopgrad(x0_gen - g))``.

    A surrogate whose gradient is the distribution-matching gradient of DMD eq. 7 with
    the eq. 8 weighting (``g`` from :func:`dmd_gradient`):
    ``d loss / d x0_gen = g / x0_gen.numel()``. Its value is ``0.5 * mean(g ** 2)``
    (useful for logging, not as a convergence measure). DMD2 (Sec. 4) trains with this
    loss alone (no regression loss), the critic updated more often than the generator.

    Computed in float32 (float64 if any input is float64) whatever the input dtype; only
    ``x0_gen`` receives gradient (``x0_real`` and ``x0_fake`` are treated as constants).

    Args:
        x0_gen: [B, ...] generator sample, attached to the generator's graph.
        x0_real: [B, ...] teacher x0-prediction (CFG applied), no grad needed.
        x0_fake: [B, ...] critic x0-prediction, no grad needed.
        return_grad: also return ``g`` for logging.
        eps: clamp of the normaliser, see :func:`dmd_gradient`.

    Returns:
        the scalar loss, or ``(loss, g)`` with ``g`` [B, ...] when ``return_grad``.
    """
    g = dmd_gradient(x0_gen, x0_real, x0_fake, eps=eps)  # [B, ...]
    gen = x0_gen.to(g.dtype)  # [B, ...], keeps the autograd graph
    target = (gen - g).detach()  # [B, ...]
    loss = 0.5 * torch.mean((gen - target) ** 2)
    return (loss, g) if return_grad else loss


def cfg_combine(
    cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float | torch.Tensor
) -> torch.Tensor:
    """Classifier-free guidance, standard convention: ``uncond + w (cond - uncond)``.

    This is the ``guidance_scale`` of diffusers and of Wan's own sampler. ``w = 1``
    returns ``cond``; ``w = 0`` returns ``uncond``. (The CFG paper, eq. 6, writes
    ``(1 + w_hs) cond - w_hs uncond``, i.e. ``w_hs = w - 1``, the same offset as FastVideo.)
    Valid for any prediction that is affine in the score (x0, v, eps), so the teacher's
    x0-predictions may be combined directly.

    FastVideo writes the same thing as ``cond + w' (cond - uncond)`` with ``w' = w - 1``;
    convert with :func:`fastvideo_to_standard_guidance`. The published FastWan recipes
    use FastVideo's ``real_score_guidance_scale = 3.5``, i.e. ``w = 4.5`` here.

    Args:
        cond, uncond: [B, ...] predictions with and without the text condition
            (the "uncond" branch uses the negative prompt).
        guidance_scale: ``w``, a float or a tensor broadcastable to ``cond``.

    Returns:
        [B, ...] in float32 or better (the promotion of the inputs with float32).
    """
    _check_same_shape(cond=cond, uncond=uncond)
    dtype = _compute_dtype(cond, uncond)
    cond, uncond = cond.to(dtype), uncond.to(dtype)
    return uncond + guidance_scale * (cond - uncond)


def fastvideo_to_standard_guidance(fastvideo_scale: float) -> float:
    """FastVideo's ``real_score_guidance_scale`` w' (``cond + w'(cond - uncond)``) -> w = w' + 1.

    Example: the published FastWan recipes' 3.5 is 4.5 in the standard convention.
    """
    return float(fastvideo_scale) + 1.0


def standard_to_fastvideo_guidance(guidance_scale: float) -> float:
    """Standard ``w`` (``uncond + w (cond - uncond)``) -> FastVideo's w' = w - 1."""
    return float(guidance_scale) - 1.0


def flow_matching_loss(
    v_pred: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flow-matching (rectified-flow) regression loss: ``mean(w (v_pred - (eps - x0))^2)``.

    The conditional flow-matching objective (Lipman et al. 2023, eq. 9 / rectified flow,
    Liu et al. 2023) for ``x_t = (1 - s) x0 + s eps``, whose velocity target is
    ``eps - x0``. Used as the critic ("fake score") loss of DMD / DMD2 -- the denoising
    loss that keeps the fake score on the current generator's distribution (DMD Sec. 3.2),
    on stop-gradient generator samples -- and as the ``flow`` fine-tuning loss.

    ``x0`` and ``eps`` are treated as constants (the target is detached), so a generator
    sample passed as ``x0`` never receives gradient from this loss. Computed in float32
    or better.

    Args:
        v_pred: [B, ...] predicted velocity at ``x_t``.
        x0: [B, ...] clean sample (data latents, or a generator sample for the critic).
        eps: [B, ...] the noise that built ``x_t``.
        weight: optional per-sample weight [B], or a tensor broadcastable to ``v_pred``.

    Returns:
        scalar loss (mean over all elements of the weighted squared error).
    """
    _check_same_shape(v_pred=v_pred, x0=x0, eps=eps)
    dtype = _compute_dtype(v_pred, x0, eps)
    target = velocity_target(x0.detach().to(dtype), eps.detach().to(dtype))  # [B, ...]
    sq = (v_pred.to(dtype) - target) ** 2  # [B, ...]
    if weight is None:
        return sq.mean()
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    weight = weight.to(dtype)
    if weight.dim() == 1 and weight.shape[0] == sq.shape[0] and sq.dim() > 1:
        weight = weight.view(-1, *([1] * (sq.dim() - 1)))  # [B, 1, ...]
    try:
        weighted = weight * sq
    except RuntimeError:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} does not broadcast to {tuple(sq.shape)}; "
            "pass a per-sample weight [B] or a tensor broadcastable to v_pred"
        ) from None
    if weighted.shape != sq.shape:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} would enlarge the loss to "
            f"{tuple(weighted.shape)}; pass a per-sample weight [B] or a tensor "
            "broadcastable to v_pred"
        )
    return weighted.mean()


def gan_critic_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's side of DMD2's GAN loss (DMD2 Sec. 4.3, in its non-saturating
    form): ``mean(softplus(-D(real))) + mean(softplus(D(fake)))``, i.e. the binary
    cross-entropy of "real" (logit > 0) on noised real latents and "fake" on noised
    generator samples. Minimised by the critic (its features and the classifier head).

    Args:
        logits_real: [B] logits of noised real latents.
        logits_fake: [B'] logits of noised (stop-gradient) generator samples.

    Returns:
        scalar loss in float32 or better; ``2 log 2`` when both logits are 0.
    """
    dtype = _compute_dtype(logits_real, logits_fake)
    real = torch.nn.functional.softplus(-logits_real.to(dtype)).mean()
    fake = torch.nn.functional.softplus(logits_fake.to(dtype)).mean()
    return real + fake


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's side of DMD2's GAN loss (DMD2 Sec. 4.3, non-saturating):
    ``mean(softplus(-D(G(z)_t)))`` = ``-mean(log sigmoid(D))``; the gradient reaches the
    generator through the noised sample its logits were computed on.

    Args:
        logits_fake: [B] logits of noised generator samples (with grad).

    Returns:
        scalar loss in float32 or better.
    """
    dtype = _compute_dtype(logits_fake)
    return torch.nn.functional.softplus(-logits_fake.to(dtype)).mean()

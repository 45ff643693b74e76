"""Distributed, resumable sampling.

:class:`DistributedSampler` orders a dataset for one data-parallel rank. Every epoch is a
permutation drawn from a ``torch.Generator`` seeded with (seed, epoch), the same on every
rank; consecutive global batches of ``dp_size x batch_size`` samples are cut from it and
data-parallel rank ``r`` takes the ``r``-th ``batch_size`` of each. Ranks of one
sequence-parallel group share a data-parallel rank (:meth:`DistributedSampler.for_rank`),
so they see the same samples.

The sampler yields keys ``(index, epoch)`` (see :class:`fastwan.data.dataset.LatentDataset`)
from its position in the current epoch; the position moves only when batches are consumed
(:meth:`~DistributedSampler.advance`). :class:`ResumableLoader` advances it as it hands
batches to the trainer -- not when workers prefetch them --, so its ``state_dict()``, saved
in a checkpoint, resumes exactly where the trainer stopped: a resumed run sees the samples
an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fastwan.data.dataset import LatentDataset, _mix_seed, collate_samples

__all__ = ["DistributedSampler", "ResumableLoader", "build_train_loader"]


class DistributedSampler(Sampler):
    """Keys ``(index, epoch)`` for data-parallel rank ``dp_rank`` of ``dp_size``.

    ``drop_last``: drop the tail that does not fill a global batch (else wrap around to the
    start of the epoch's permutation to fill it). Every rank yields
    :attr:`samples_per_epoch` keys per epoch, a multiple of ``batch_size``.
    """

    def __init__(
        self,
        dataset_size: int,
        *,
        batch_size: int = 1,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        for name, value, low in (
            ("dataset_size", dataset_size, 1),
            ("batch_size", batch_size, 1),
            ("dp_size", dp_size, 1),
            ("seed", seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank!r}")
        global_batch = batch_size * dp_size
        if drop_last and dataset_size < global_batch:
            raise ValueError(
                f"the dataset has {dataset_size} samples, fewer than one global batch "
                f"(batch_size {batch_size} x data-parallel size {dp_size} = {global_batch}); "
                "use more data, a smaller batch, or drop_last=False"
            )
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.position = 0  # samples of the current epoch this rank has consumed
        self._cache: tuple[int, list[int]] | None = None

    @classmethod
    def for_rank(
        cls,
        dataset_size: int,
        *,
        rank: int,
        world_size: int,
        sequence_parallel: int = 1,
        **kwargs: Any,
    ) -> DistributedSampler:
        """The sampler of global ``rank``: sequence-parallel groups are ``sequence_parallel``
        consecutive ranks (the innermost mesh dimension), so ``dp_rank = rank // sp``."""
        if sequence_parallel < 1 or world_size % sequence_parallel:
            raise ValueError(
                f"sequence_parallel ({sequence_parallel}) must divide world_size ({world_size})"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        return cls(
            dataset_size,
            dp_rank=rank // sequence_parallel,
            dp_size=world_size // sequence_parallel,
            **kwargs,
        )

    @property
    def samples_per_epoch(self) -> int:
        """Keys this rank yields in one epoch."""
        global_batch = self.batch_size * self.dp_size
        batches = self.dataset_size // global_batch
        if not self.drop_last and self.dataset_size % global_batch:
            batches += 1
        return batches * self.batch_size

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's dataset indices for ``epoch``, in order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n = self.dataset_size
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
            order = torch.randperm(n, generator=g)  # [n]
        else:
            order = torch.arange(n)
        global_batch = self.batch_size * self.dp_size
        total = self.samples_per_epoch * self.dp_size
        if total > n:  # wrap around to fill the last global batch
            order = torch.cat([order, order[: total - n]])
        order = order[:total].view(-1, self.dp_size, self.batch_size)  # [batches, dp, B]
        indices = order[:, self.dp_rank].reshape(-1).tolist()
        assert len(indices) == self.samples_per_epoch and total % global_batch == 0
        self._cache = (epoch, indices)
        return indices

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """The remaining keys of the current epoch (the state does not move)."""
        epoch = self.epoch
        for index in self.epoch_indices(epoch)[self.position :]:
            yield (index, epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch - self.position

    def advance(self, num_samples: int) -> None:
        """Mark ``num_samples`` keys as consumed; the epoch ends (and the next starts) when
        all of its keys are."""
        if num_samples < 0 or self.position + num_samples > self.samples_per_epoch:
            raise ValueError(
                f"cannot advance by {num_samples}: {len(self)} keys left in epoch {self.epoch}"
            )
        self.position += num_samples
        if self.position == self.samples_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "dataset_size": self.dataset_size,
            "batch_size": self.batch_size,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the settings that fix the order must match.

        Every rank advances in lockstep, so one rank's state (e.g. rank 0's, saved once in a
        checkpoint) resumes every rank: ``dp_rank`` is not compared."""
        for name in (
            "seed",
            "dataset_size",
            "batch_size",
            "dp_size",
            "shuffle",
            "drop_last",
        ):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(
                    f"sampler state has {name}={state[name]!r} but this sampler has "
                    f"{getattr(self, name)!r}: resuming would not replay the same samples; "
                    f"resume with the same {name} (dataset, batch size, mesh and seed)"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < max(self.samples_per_epoch, 1):
            raise ValueError(f"invalid sampler state: epoch {epoch}, position {position}")
        self.epoch, self.position = epoch, position


class ResumableLoader:
    """Batches from ``dataset`` in ``sampler``'s order, over epochs, without end.

    A ``torch.utils.data.DataLoader`` (``num_workers`` processes) runs per epoch on the keys
    left in that epoch; the sampler advances by each batch only when the batch is handed
    out, so :meth:`state_dict` is exactly "what the trainer has consumed".
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: DistributedSampler,
        *,
        num_workers: int = 0,
        collate_fn: Callable[[list], Any] = collate_samples,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        if len(dataset) != sampler.dataset_size:
            raise ValueError(
                f"sampler.dataset_size ({sampler.dataset_size}) != len(dataset) ({len(dataset)})"
            )
        self.dataset = dataset
        self.sampler = sampler
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor

    def _epoch_loader(self) -> DataLoader:
        keys = list(self.sampler)  # a snapshot: advancing does not disturb this epoch's loader
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0 and self.prefetch_factor is not None:
            kwargs["prefetch_factor"] = self.prefetch_factor
        return DataLoader(
            self.dataset,
            batch_size=self.sampler.batch_size,
            sampler=keys,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.pin_memory,
            drop_last=False,
            **kwargs,
        )

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield from self.iter_epoch()

    def iter_epoch(self) -> Iterator[Any]:
        """The batches left in the current epoch (the sampler then points at the next)."""
        epoch = self.sampler.epoch
        for batch in self._epoch_loader():
            self.sampler.advance(self.sampler.batch_size)
            yield batch
        assert self.sampler.epoch == epoch + 1 and self.sampler.position == 0

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def build_train_loader(
    data: Any,
    *,
    rank: int,
    world_size: int,
    sequence_parallel: int = 1,
    micro_batch_size: int,
    seed: int,
    latents_mean: Sequence[float] | None = None,
    latents_std: Sequence[float] | None = None,
    empty_embedding: Any = None,
    latent_shape: Sequence[int] | None = None,
    image_condition: bool = False,
) -> ResumableLoader:
    """The trainer's loader from a :class:`fastwan.config.DataConfig`: the dataset at
    ``data.path`` (text-only, text length, CFG dropout, error policy, latent bound and
    temporal crop from the config), this rank's sampler (SP groups share samples; shuffled
    by ``seed``) and ``data.num_workers`` worker processes. ``latents_mean`` /
    ``latents_std``: the VAE's (not needed text-only). ``latent_shape``: the recipe's
    ``[C, T, H, W]`` (:func:`fastwan.train.build.latent_shape_of`): longer latents are
    cropped in time, others skipped or refused (see :class:`LatentDataset`).
    ``image_condition``: read the image condition of ``i2v`` / ``i2v_text`` shards
    (image-to-video training; text-only, it is checked against ``latent_shape``).

    Under ``data.on_error: skip``, what is known to be skipped when the dataset opens --
    unreadable files, rows of another latent size -- is refused now when it exceeds
    ``data.max_skip_fraction`` (of the files, of the rows)."""
    if data.path is None:
        raise ValueError(
            "data.path is null: set it to the folder of parquet shards (--data.path=DIR)"
        )
    dataset = LatentDataset(
        data.path,
        text_length=data.text_length,
        text_only=data.text_only,
        latents_mean=latents_mean,
        latents_std=latents_std,
        cfg_dropout=data.cfg_dropout,
        empty_embedding=empty_embedding,
        seed=seed,
        on_error=data.on_error,
        # text-only: no latents to check, but an image condition is checked when read
        latent_shape=None if data.text_only and not image_condition else latent_shape,
        max_abs_latent=data.max_abs_latent,
        temporal_crop=data.temporal_crop,
        image_condition=image_condition,
    )
    limit = float(data.max_skip_fraction)
    files = len(dataset.files) + len(dataset.skipped_files)
    if dataset.skipped_files and len(dataset.skipped_files) > limit * files:
        named = "; ".join(reason for _file, reason in dataset.skipped_files[:3])
        raise ValueError(
            f"data.max_skip_fraction: {len(dataset.skipped_files)} of the {files} parquet "
            f"files under {str(data.path)!r} cannot be read "
            f"({len(dataset.skipped_files) / files:.1%} > {limit:.1%}): {named}; restore or "
            "delete those files, or raise data.max_skip_fraction"
        )
    shape_skips = sum(dataset.shape_skips.values())
    if shape_skips and shape_skips > limit * len(dataset):
        by_reason = ", ".join(f"{r} {n}" for r, n in sorted(dataset.shape_skips.items()))
        raise ValueError(
            f"data.max_skip_fraction: {shape_skips} of the {len(dataset)} rows under "
            f"{str(data.path)!r} have latents of another size than the recipe's "
            f"{list(dataset.latent_shape)} ({by_reason}; {shape_skips / len(dataset):.1%} > "
            f"{limit:.1%}) and would be skipped; set data.num_frames / data.height / "
            "data.width to the data's clip size, re-encode the clips, or raise "
            "data.max_skip_fraction"
        )
    sampler = DistributedSampler.for_rank(
        len(dataset),
        rank=rank,
        world_size=world_size,
        sequence_parallel=sequence_parallel,
        batch_size=micro_batch_size,
        seed=seed,
    )
    return ResumableLoader(dataset, sampler, num_workers=data.num_workers)

"""A training data loader that resumes exactly: batch ``k`` depends only on (seed, k).

Detectron2's ``TrainingSampler`` draws one infinite stream of dataset indices from a generator
that has to be replayed from the start to reach position ``p``, and the dataset mapper's
augmentations draw from whatever state each data worker's RNGs are in. Neither is stored in a
checkpoint, so a resumed run sees other data than the interrupted one would have.

Here the stream is *seekable* instead (same distribution as Detectron2's, other draws):

* order: position ``p`` of the global stream falls in epoch ``e``; the epoch's index list is a
  permutation of the dataset drawn from a generator seeded by (seed, e). With repeat factors
  (``RepeatFactorTrainingSampler``, e.g. LVIS) the epoch's list is the stochastic rounding of
  the factors, drawn with the same generator, then permuted. Rank ``r`` of ``W`` takes positions
  ``r, r + W, ...``, as Detectron2's samplers shard;
* augmentation: the mapper runs for position ``p`` with python/numpy/torch RNGs seeded by
  (seed, p), and the caller's RNG states are restored afterwards, so a mapped sample is a
  function of its position whatever the number of data workers;
* batching: Detectron2's ``AspectRatioGroupedDataset`` is greedy. To resume at iteration ``k``,
  the grouping of the first ``k`` batches is replayed from the records' width/height alone (no
  image is read); the resumed stream is the positions still waiting in the buckets, then the
  first position not yet consumed onwards. Fed to the same grouping, it yields exactly the
  batches ``k, k + 1, ...`` of the uninterrupted run.
"""

import contextlib
import logging
import operator
import random
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetFromList
from detectron2.data.build import worker_init_reset_seed
from detectron2.data.common import AspectRatioGroupedDataset
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.utils import comm
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .guards import (
    check_dataset_dicts,
    check_sem_seg_dataset_dicts,
    is_sem_seg_dataset,
    load_detection_dataset_dicts,
)

__all__ = [
    "ResumableTrainLoader",
    "SEEKABLE_SAMPLERS",
    "SeekableTrainingStream",
    "build_resumable_train_loader",
    "derive_seed",
    "seeded_rngs",
]

SEEKABLE_SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler")

# What a derived seed is for: the same (seed, number) never seeds two different things.
ORDER, AUGMENTATION, STEP = 0, 1, 2


def derive_seed(seed: int, purpose: int, *numbers: int) -> int:
    """A 63-bit seed that is a pure function of (seed, purpose, numbers), well mixed."""
    state = np.random.SeedSequence([seed, purpose, *numbers]).generate_state(
        2, np.uint32
    )
    return (int(state[0]) << 31) ^ int(state[1])


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed python's, numpy's and torch's (CPU) global RNGs; restore their states on exit."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class _EpochOrder:
    """Dataset index at each position of the global stream, epoch by epoch (cached forward)."""

    def __init__(
        self, size: int, seed: int, repeat_factors: Optional[torch.Tensor] = None
    ):
        self._size, self._seed = size, seed
        self._int_part = self._frac_part = None
        if repeat_factors is not None:
            self._int_part = torch.trunc(repeat_factors)
            self._frac_part = repeat_factors - self._int_part
        self._epoch, self._start, self._indices = -1, 0, []

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self._seed, ORDER, epoch))

    def _repeats(self, generator: torch.Generator) -> torch.Tensor:
        rands = torch.rand(self._size, generator=generator)
        return (self._int_part + (rands < self._frac_part).float()).long()

    def _epoch_length(self, epoch: int) -> int:
        if self._int_part is None:
            return self._size
        return int(self._repeats(self._generator(epoch)).sum())

    def _epoch_indices(self, epoch: int) -> List[int]:
        generator = self._generator(epoch)
        if self._int_part is None:
            return torch.randperm(self._size, generator=generator).tolist()
        indices = torch.repeat_interleave(
            torch.arange(self._size), self._repeats(generator)
        )
        return indices[torch.randperm(len(indices), generator=generator)].tolist()

    def __getitem__(self, position: int) -> int:
        if position < self._start:
            self._epoch, self._start, self._indices = -1, 0, []
        if position >= self._start + len(self._indices):
            epoch, start = self._epoch + 1, self._start + len(self._indices)
            length = self._epoch_length(epoch)
            while (
                position >= start + length
            ):  # skip whole epochs without permuting them
                epoch, start = epoch + 1, start + length
                length = self._epoch_length(epoch)
            self._epoch, self._start, self._indices = (
                epoch,
                start,
                self._epoch_indices(epoch),
            )
        return self._indices[position - self._start]


def _positions(resume: Tuple[List[int], int]) -> Iterator[int]:
    """Rank-local stream positions: the leftovers, then ``first`` onwards."""
    leftovers, first = resume
    yield from leftovers
    position = first
    while True:
        yield position
        position += 1


class SeekableTrainingStream(IterableDataset):
    """The mapped training samples of one rank, in stream order, from a resume point.

    Rank-local position ``j`` is global position ``rank + j * world_size``. Data worker ``w`` of
    ``K`` maps items ``w, w + K, ...`` of the sequence, so that the DataLoader's round-robin over
    the workers restores the sequence order.
    """

    def __init__(
        self,
        records: DatasetFromList,
        mapper: Callable[[dict], dict],
        order: _EpochOrder,
        seed: int,
        rank: int,
        world_size: int,
        resume: Tuple[List[int], int] = ([], 0),
        check_groups: bool = True,
    ):
        self._records, self._mapper, self._order = records, mapper, order
        self._seed, self._rank, self._world_size = seed, rank, world_size
        self._resume = resume
        self._check_groups = (
            check_groups  # aspect-ratio grouping replays the records' groups
        )

    def global_position(self, position: int) -> int:
        return self._rank + position * self._world_size

    def record(self, position: int) -> dict:
        """The dataset record at a rank-local position."""
        return self._records[self._order[self.global_position(position)]]

    def map(self, position: int) -> dict:
        """The mapped sample at a rank-local position, augmented with RNGs seeded by it."""
        record = self.record(position)
        global_position = self.global_position(position)
        with seeded_rngs(derive_seed(self._seed, AUGMENTATION, global_position)):
            sample = self._mapper(record)
        if sample is None:
            raise ValueError(
                f"The training mapper returned None for image {record.get('file_name')} "
                f"(stream position {global_position}); a resumable stream cannot skip samples."
            )
        if self._check_groups and _is_wide(sample) != _is_wide(record):
            raise ValueError(
                f"The mapper changed the aspect-ratio group of image {record.get('file_name')}: "
                f"record width/height {record['width']}/{record['height']}, mapped "
                f"{sample['width']}/{sample['height']}; resuming replays the grouping from records."
            )
        return sample

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        for i, position in enumerate(_positions(self._resume)):
            if i % num_workers == worker:
                yield self.map(position)


def _check_sizes_for_grouping(dataset_dicts: List[dict]) -> None:
    without = next(
        (r for r in dataset_dicts if "width" not in r or "height" not in r), None
    )
    if without is not None:
        raise ValueError(
            f"DATALOADER.ASPECT_RATIO_GROUPING needs 'height' and 'width' in every record; "
            f"{without.get('file_name')} has none (Detectron2's load_sem_seg records, e.g. "
            "ADE20K, have none: set DATALOADER.ASPECT_RATIO_GROUPING False, every crop has the "
            "same size)"
        )


def _is_wide(record: dict) -> bool:
    """AspectRatioGroupedDataset's bucket: 0 (wide) if width > height, else 1."""
    return record["width"] > record["height"]


def replay_grouping(
    wide: Callable[[int], bool], batch_size: int, num_batches: int
) -> Tuple[List[int], int]:
    """Where aspect-ratio grouping stands after ``num_batches`` batches of a rank's stream.

    Returns:
        (positions still waiting in the buckets, ascending; first position not yet read).
    """
    buckets: Tuple[List[int], List[int]] = ([], [])
    position, emitted = 0, 0
    while emitted < num_batches:
        bucket = buckets[0 if wide(position) else 1]
        bucket.append(position)
        if len(bucket) == batch_size:
            bucket.clear()
            emitted += 1
        position += 1
    return sorted(buckets[0] + buckets[1]), position


class _Batches:
    """Consecutive items of an iterable in lists of ``batch_size`` (no grouping)."""

    def __init__(self, items, batch_size: int):
        self._items, self._batch_size = items, batch_size

    def __iter__(self) -> Iterator[list]:
        batch = []
        for item in self._items:
            batch.append(item)
            if len(batch) == self._batch_size:
                yield batch
                batch = []


class ResumableTrainLoader:
    """An iterable of training batches (lists of mapped dicts) of this rank that can start at
    any iteration: ``seek(start_iter, seed)`` before iterating.

    See the module docstring for how the stream is defined. Unlike Detectron2's loader it is
    seekable, not Detectron2's ``TrainingSampler`` stream: the same distribution (a fresh
    permutation per epoch, or stochastic repeat factors) from other random draws.
    """

    def __init__(
        self,
        dataset_dicts: List[dict],
        mapper: Callable[[dict], dict],
        *,
        batch_size: int,
        seed: int,
        repeat_factors: Optional[torch.Tensor] = None,
        aspect_ratio_grouping: bool = True,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self._records = DatasetFromList(dataset_dicts, copy=False, serialize=True)
        if aspect_ratio_grouping:
            _check_sizes_for_grouping(dataset_dicts)
            self._wide = np.array([_is_wide(r) for r in dataset_dicts], dtype=bool)
        self._mapper, self._repeat_factors = mapper, repeat_factors
        self.batch_size, self.num_workers = batch_size, num_workers
        self._grouping = aspect_ratio_grouping
        self._rank, self._world_size = rank, world_size
        self._iterated = False
        self.seek(0, seed)

    def seek(self, start_iter: int, seed: Optional[int] = None) -> None:
        """Make the first batch of the next iteration batch ``start_iter`` of the stream of
        ``seed`` (default: the current seed). Only before iterating: workers copy the stream.
        """
        if self._iterated:
            raise RuntimeError("ResumableTrainLoader.seek() after iteration started")
        self.seed = int(self.seed if seed is None else seed)
        self.start_iter = int(start_iter)
        order = _EpochOrder(len(self._records), self.seed, self._repeat_factors)
        self._stream = SeekableTrainingStream(
            self._records,
            self._mapper,
            order,
            self.seed,
            self._rank,
            self._world_size,
            resume=self._resume_point(order),
            check_groups=self._grouping,
        )

    def _resume_point(self, order: _EpochOrder) -> Tuple[List[int], int]:
        if not self._grouping:
            return [], self.start_iter * self.batch_size
        rank, world_size = self._rank, self._world_size
        return replay_grouping(
            lambda p: bool(self._wide[order[rank + p * world_size]]),
            self.batch_size,
            self.start_iter,
        )

    def __iter__(self) -> Iterator[list]:
        self._iterated = True
        loader = DataLoader(
            self._stream,
            num_workers=self.num_workers,
            collate_fn=operator.itemgetter(0),  # single samples; batching happens below
            worker_init_fn=worker_init_reset_seed,
            # its own generator: creating the iterator must not draw from torch's global RNG
            generator=torch.Generator().manual_seed(self.seed),
        )
        if self._grouping:
            return iter(AspectRatioGroupedDataset(loader, self.batch_size))
        return iter(_Batches(loader, self.batch_size))


def training_seed(cfg: CfgNode) -> int:
    """``cfg.SEED`` if it is >= 0, else a random seed shared by all ranks (all must call)."""
    return int(cfg.SEED) if cfg.SEED >= 0 else int(comm.shared_random_seed())


def train_dataset_dicts(cfg: CfgNode) -> List[dict]:
    """The training records of ``cfg.DATASETS.TRAIN``, loaded and filtered as Detectron2's
    ``build_detection_train_loader`` does, then checked (``check_dataset_dicts``)."""
    dataset_dicts = load_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(
            cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
            if cfg.MODEL.KEYPOINT_ON
            else 0
        ),
        proposal_files=(
            cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None
        ),
    )
    if is_sem_seg_dataset(dataset_dicts):
        check_sem_seg_dataset_dicts(
            dataset_dicts,
            cfg.DATASETS.TRAIN,
            _num_classes(cfg),
            cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        )
    else:
        check_dataset_dicts(dataset_dicts, cfg.DATASETS.TRAIN, _num_classes(cfg))
    return dataset_dicts


def _num_classes(cfg: CfgNode) -> int:
    if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
        return cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    if cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
        return cfg.MODEL.RETINANET.NUM_CLASSES
    return cfg.MODEL.ROI_HEADS.NUM_CLASSES


def build_resumable_train_loader(
    cfg: CfgNode, mapper: Callable[[dict], dict], seed: int
) -> ResumableTrainLoader:
    """The :class:`ResumableTrainLoader` of a config (``DATALOADER.SAMPLER_TRAIN`` one of
    :data:`SEEKABLE_SAMPLERS`), at iteration 0."""
    sampler = cfg.DATALOADER.SAMPLER_TRAIN
    if sampler not in SEEKABLE_SAMPLERS:
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN: expected one of {SEEKABLE_SAMPLERS} for a resumable "
            f"loader, got {sampler!r}"
        )
    world_size = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be divisible by the number "
            f"of processes ({world_size})"
        )
    dataset_dicts = train_dataset_dicts(cfg)
    repeat_factors = None
    if sampler == "RepeatFactorTrainingSampler":
        repeat_factors = (
            RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
                dataset_dicts,
                cfg.DATALOADER.REPEAT_THRESHOLD,
                sqrt=cfg.DATALOADER.REPEAT_SQRT,
            )
        )
    logging.getLogger(__name__).info(
        f"Resumable training stream: {len(dataset_dicts)} images, {sampler} order, seed {seed}"
    )
    return ResumableTrainLoader(
        dataset_dicts,
        mapper,
        batch_size=cfg.SOLVER.IMS_PER_BATCH // world_size,
        seed=seed,
        repeat_factors=repeat_factors,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        rank=comm.get_rank(),
        world_size=world_size,
    )

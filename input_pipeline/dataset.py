"""tf.data loader over a prepared dataset: per-host split, seeded shuffle, official augmentations.

Training streams epochs forever. Each epoch is a permutation of the host's clips drawn from
(seed, epoch) (or the official balanced sampler's draws), cut into full batches
(``drop_remainder``, as the official loader); each record is read by itself (``records``), so
``start_batch`` enters the stream at its position and reads nothing before it. Every random draw
of a clip is keyed by (seed, epoch, position), so the stream is deterministic and resumes
exactly. Order per clip (official behaviours 21-25, docs/official_behaviour.md): frame choice,
(mixup), SpecAugment, normalise, noise + roll.
Mixup mixes waveforms exactly as the official loader when the dataset stores them
(``cavmae prepare --keep-waveform``), and mel energies otherwise (``augment.mix_fbanks``).
Evaluation reads the split in shard order. Batches are NumPy dicts: ``audio`` [B, 1024, 128],
``image`` [B, 224, 224, 3] (or [B, 10, 224, 224, 3] with ``all_frames``), ``label`` [B, K],
``id`` [B].
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cavmae_jax import paths
from cavmae_jax.errors import UserError
from input_pipeline import augment, verify
from input_pipeline.audio import DATASET_MEAN, DATASET_STD, mixed_fbank
from input_pipeline.records import MARK, RecordError, Table
from input_pipeline.video import IMAGENET_MEAN, IMAGENET_STD, NUM_FRAMES


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """The official dataset-config keys (official behaviours 21-25), the stream's seed, hosts."""

    batch_size: int  # per host
    num_classes: int
    train: bool = True
    seed: int = 0
    process_index: int = 0
    process_count: int = 1
    frame: int = 5  # evaluation frame (``frame_use``); training draws 0..9
    all_frames: bool = False  # evaluation: all 10 frames per clip
    freqm: int = 0
    timem: int = 0
    mixup: float = 0.0
    label_smooth: float = 0.0
    noise: bool = False
    mean: float = DATASET_MEAN
    std: float = DATASET_STD
    skip_norm: bool = False
    drop_remainder: bool | None = None  # default: True in training, False in evaluation
    # Balanced sampling (official ``--bal bal``): per-clip weights in split order, or None.
    sample_weights: tuple[float, ...] | None = None


def host_split(split: str, config: LoaderConfig) -> str:
    """This host's disjoint share of ``split``: equal shares in training, every clip (shares
    differing by at most one) in evaluation."""
    return _shares(split, config)[config.process_index]


def host_offset(builder, split: str, config: LoaderConfig) -> int:
    """Where this host's share of ``split`` starts in it (the shares are consecutive)."""
    earlier = _shares(split, config)[: config.process_index]
    return sum(builder.info.splits[share].num_examples for share in earlier)


def _shares(split: str, config: LoaderConfig) -> list[str]:
    if config.process_count == 1:
        return [split]
    return tfds.even_splits(split, n=config.process_count, drop_remainder=config.train)


IN_SHARD_ORDER = tfds.ReadConfig(interleave_cycle_length=1)


def _split_field(builder, split: str, field: str = "label") -> list:
    """Every clip's ``field`` in a split, in shard order; the media are skipped, not decoded."""
    skip = {name: tfds.decode.SkipDecoding() for name in builder.info.features if name != field}
    records = builder.as_dataset(split=split, decoders=skip, read_config=IN_SHARD_ORDER)
    return [r[field] for r in tfds.as_numpy(records)]


def label_sample_weights(data_dir: str, split: str, share: str | None = None) -> np.ndarray:
    """The official balanced-sampling weights (``gen_weight_file.py``) of a prepared split:
    with ``c_k`` the clips of ``split`` labelled k, a clip weighs the sum of
    ``1000 / (c_k + 0.01)`` over its labels. Returns the weights of the clips of ``share`` (a
    host's part of ``split``, counts still over the whole split), by default of every clip.
    Reads the labels only (the media are skipped, not decoded)."""
    builder = open_dataset(data_dir)
    labels = _split_field(builder, split)
    counts = np.bincount(np.concatenate(labels), minlength=1) if labels else np.zeros(1)
    class_weight = 1000.0 / (counts + 0.01)
    if share not in (None, split):
        labels = _split_field(builder, share)
    return np.array([class_weight[clip].sum() for clip in labels])


def _image(jpeg: tf.Tensor) -> tf.Tensor:
    """Stored 224x224 JPEG -> normalised float32 [224, 224, 3]. INTEGER_ACCURATE decoding equals
    PIL's, which the official loader uses; its resize and crop are no-ops at 224."""
    image = tf.cast(tf.io.decode_jpeg(jpeg, channels=3, dct_method="INTEGER_ACCURATE"), tf.float32)
    return (image / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


class DatasetError(UserError):
    """A dataset directory that is missing, or lacks the split or the clips asked for."""


def open_dataset(data_dir) -> tfds.core.DatasetBuilder:
    """The builder of a ``cavmae prepare`` output, or one line saying what is wrong."""
    if not (paths.path(data_dir) / "dataset_info.json").exists():
        raise DatasetError(
            f"{data_dir}: not a prepared dataset (no dataset_info.json); make one with "
            f"cavmae prepare --input VIDEOS --output {data_dir}"
        )
    return tfds.builder_from_directory(str(data_dir))


class Loader:
    """Iterable of batches from ``data_dir`` (a ``cavmae prepare`` output)."""

    def __init__(self, data_dir: str, split: str, config: LoaderConfig):
        self.config, self.data_dir, self.split_name = config, data_dir, split
        self.builder = open_dataset(data_dir)
        missing = [s for s in split.split("+") if s.strip() not in self.builder.info.splits]
        if missing:
            known = ", ".join(self.builder.info.splits)
            raise DatasetError(f"{data_dir}: no split {missing[0]!r} (it has {known})")
        self.split = host_split(split, config)
        self.first_position = host_offset(self.builder, split, config)  # of this host's clips
        self.num_examples = self.builder.info.splits[self.split].num_examples  # this host's
        self.split_examples = self.builder.info.splits[split].num_examples  # all hosts'
        self.has_waveform = "waveform" in self.builder.info.features
        weights = config.sample_weights
        if weights is not None and len(weights) != self.num_examples:
            raise DatasetError(
                f"{data_dir}: {len(weights)} sample weights for {self.num_examples} clips in "
                f"split {self.split}"
            )
        if config.train and self.num_examples < config.batch_size:
            raise DatasetError(
                f"{data_dir}: split {self.split} has {self.num_examples} clips, fewer than one "
                f"batch of {config.batch_size}"
            )
        self.table = self._table() if config.train else None

    def _table(self) -> Table:
        try:
            return Table(self.builder, self.split, self.data_dir)
        except RecordError as err:
            raise DatasetError(self._bad_shard(str(err))) from err

    def _bad_shard(self, message: str) -> str:
        """The line for a shard that could not be read: the shard and its rebuild command, or,
        when every shard reads whole, the record offsets that do not match them."""
        found = verify.shard_problems(self.data_dir, self.split_name)
        if found:
            return found[0]
        record = re.search(rf"\[([^\[\]]*{re.escape(MARK)}[^\[\]]*)\]", message)
        if record:
            return (
                f"{record.group(1)}; every shard reads whole, so the record offsets do not "
                f"match them: remove {self.data_dir}/offsets-*.npy (they are then read from "
                "the shards)"
            )
        return f"{self.data_dir}: {message.splitlines()[0]}"

    @property
    def batches_per_epoch(self) -> int:
        return self.num_examples // self.config.batch_size

    def labels(self) -> list[list[int]]:
        """Every clip's label indices, in the order evaluation batches read them."""
        return [r.tolist() for r in _split_field(self.builder, self.split)]

    def ids(self) -> list[str]:
        """Every clip's id, in the order evaluation batches read them."""
        return [clip.decode() for clip in _split_field(self.builder, self.split, "id")]

    def _records(self) -> tf.data.Dataset:
        decoders = {"frames": tfds.decode.SkipDecoding()}
        return self.builder.as_dataset(
            split=self.split, decoders=decoders, read_config=IN_SHARD_ORDER
        )

    def _example(self, record, partner, seed) -> dict:
        cfg = self.config
        fbank = tf.cast(record["fbank"], tf.float32)
        if cfg.train:
            frame = tf.random.stateless_uniform(
                (), augment.sub_seed(seed, 0), 0, NUM_FRAMES, tf.int32
            )
        else:
            frame = tf.constant(cfg.frame)
        if cfg.all_frames:
            image = tf.map_fn(_image, record["frames"], fn_output_signature=tf.float32)
        else:
            image = _image(record["frames"][frame])
        label = augment.labels(record["label"], None, 1.0, cfg.num_classes, cfg.label_smooth)
        if partner is not None:
            mix = augment.uniform(augment.sub_seed(seed, 1)) < cfg.mixup
            lam = augment.mixup_lambda(augment.sub_seed(seed, 2))
            other = tf.random.stateless_uniform(
                (), augment.sub_seed(seed, 3), 0, NUM_FRAMES, tf.int32
            )
            mixed_fbank = self._mixed_fbank(fbank, record, partner, lam)
            mixed_image = lam * image + (1 - lam) * _image(partner["frames"][other])
            mixed_label = augment.labels(
                record["label"], partner["label"], lam, cfg.num_classes, cfg.label_smooth
            )
            fbank = tf.where(mix, mixed_fbank, fbank)
            image = tf.where(mix, mixed_image, image)
            label = tf.where(mix, mixed_label, label)
        fbank = augment.spec_augment(fbank, cfg.freqm, cfg.timem, augment.sub_seed(seed, 4))
        if not cfg.skip_norm:
            fbank = (fbank - cfg.mean) / cfg.std
        if cfg.noise:
            fbank = augment.noise_and_roll(fbank, augment.sub_seed(seed, 5))
        return {"audio": fbank, "image": image, "label": label, "id": record["id"]}

    def _mixed_fbank(self, fbank, record, partner, lam) -> tf.Tensor:
        """Waveform mixup exactly as the official loader when the dataset stores waveforms,
        else the fbank-domain stand-in (``augment.mix_fbanks``)."""
        if self.has_waveform:

            def mix(first, second, lam):
                first, second = first / 32768.0, second / 32768.0
                return mixed_fbank(first, second, float(lam), fbank.shape[0])

            waves = (record["waveform"], partner["waveform"], lam)
            out = tf.numpy_function(mix, waves, tf.float32, stateful=False)
            return tf.ensure_shape(out, fbank.shape)
        return augment.mix_fbanks(
            fbank,
            record["audio_frames"],
            tf.cast(partner["fbank"], tf.float32),
            partner["audio_frames"],
            lam,
        )

    def epoch_rows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Which record each position of an epoch reads, and its mixup partner (rows of this
        host's share). Either a permutation of the share, or, with sample weights, the official
        ``WeightedRandomSampler(weights, N, replacement=True)``: N independent draws by weight.
        A partner is any clip of the share, drawn uniformly (the official ``randint``). Both
        depend only on (seed, epoch), so an epoch can be entered at any position."""
        cfg = self.config
        draws = np.random.default_rng([cfg.seed, epoch])
        if cfg.sample_weights is None:
            rows = draws.permutation(self.num_examples)
        else:
            cumulative = np.cumsum(cfg.sample_weights)
            rows = np.searchsorted(cumulative, draws.random(self.num_examples) * cumulative[-1])
        partners = draws.integers(0, self.num_examples, self.num_examples)
        return rows.astype(np.int64), partners.astype(np.int64)

    def _record(self, row: tf.Tensor) -> dict:
        """The record at ``row`` of this host's share, read by itself and parsed."""
        read = self.table.read_or_problem
        serialized, problem = tf.numpy_function(read, [row], (tf.string, tf.string), stateful=False)
        with tf.control_dependencies([tf.debugging.assert_equal(problem, "", message=problem)]):
            serialized = tf.ensure_shape(tf.identity(serialized), [])
        decoders = {"frames": tfds.decode.SkipDecoding()}
        return self.builder.info.features.deserialize_example(serialized, decoders=decoders)

    def _epoch(self, epoch: tf.Tensor, start: tf.Tensor) -> tf.data.Dataset:
        """An epoch's full batches from position ``start`` on: the positions before it are
        never read."""
        cfg = self.config
        rows, partners = tf.numpy_function(self.epoch_rows, [epoch], (tf.int64, tf.int64))
        end = self.batches_per_epoch * cfg.batch_size
        positions = tf.data.Dataset.range(start, end)

        def build(position):
            seed = tf.stack([tf.cast(cfg.seed, tf.int64), epoch * (1 << 32) + position])
            partner = self._record(partners[position]) if cfg.mixup else None
            return self._example(self._record(rows[position]), partner, seed)

        ds = positions.map(build, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.batch(cfg.batch_size, drop_remainder=True)

    def dataset(self, start_batch: int = 0) -> tf.data.Dataset:
        """The tf.data pipeline; training starts ``start_batch`` batches into the stream."""
        cfg = self.config
        if not cfg.train:
            drop = bool(cfg.drop_remainder)
            seed = tf.constant([0, 0], tf.int64)
            ds = self._records().map(
                lambda r: self._example(r, None, seed), num_parallel_calls=tf.data.AUTOTUNE
            )
            return ds.batch(cfg.batch_size, drop_remainder=drop).prefetch(tf.data.AUTOTUNE)
        first_epoch, skip_batches = divmod(start_batch, self.batches_per_epoch)
        epochs = tf.data.Dataset.range(first_epoch, 1 << 40)
        start = tf.constant(skip_batches * cfg.batch_size, tf.int64)
        ds = epochs.flat_map(
            lambda e: self._epoch(e, tf.where(e == first_epoch, start, tf.constant(0, tf.int64)))
        )
        return ds.prefetch(tf.data.AUTOTUNE)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.iterate_from(0)

    def iterate_from(self, start_batch: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches from ``start_batch`` on; a shard that cannot be read stops the stream with a
        line naming it and the command that rebuilds it."""
        try:
            yield from tfds.as_numpy(self.dataset(start_batch))
        except tf.errors.DataLossError as err:
            raise DatasetError(self._bad_shard(err.message)) from err
        except tf.errors.InvalidArgumentError as err:
            if MARK not in err.message:
                raise
            raise DatasetError(self._bad_shard(err.message)) from err

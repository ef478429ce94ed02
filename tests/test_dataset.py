"""The tf.data loader: official augmentations, determinism, exact resumption, host split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import audio, augment, prepare, records, synthetic, video
from input_pipeline.dataset import DatasetError, Loader, LoaderConfig

CLIPS = 12


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    clips = synthetic.generate(root / "videos", clips=CLIPS, classes=4, seed=1)
    out = root / "ds"
    prepare.prepare(clips, out, labels=root / "videos" / "labels.csv", shard_size=5, progress=False)
    return out


def batches(loader, count, start=0):
    stream = loader.iterate_from(start)
    return [next(stream) for _ in range(count)]


def train_config(**changes):
    base = dict(
        batch_size=4,
        num_classes=4,
        seed=3,
        noise=True,
        freqm=24,
        timem=96,
        mixup=0.5,
        label_smooth=0.1,
    )
    base.update(changes)
    return LoaderConfig(**base)


def test_batches_have_the_documented_shapes(data_dir):
    (batch,) = batches(Loader(data_dir, "train", train_config()), 1)
    assert batch["audio"].shape == (4, 1024, 128) and batch["audio"].dtype == np.float32
    assert batch["image"].shape == (4, 224, 224, 3) and batch["label"].shape == (4, 4)


def test_stream_is_deterministic_and_resumes_exactly(data_dir):
    loader = Loader(data_dir, "train", train_config())
    assert loader.batches_per_epoch == 3
    straight = batches(loader, 8)
    again = batches(Loader(data_dir, "train", train_config()), 8)
    resumed = batches(loader, 3, start=5)  # mid-epoch, across an epoch boundary
    for a, b in zip(straight, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    for a, b in zip(straight[5:], resumed, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    ids = lambda bs: sorted(x for b in bs for x in b["id"])  # noqa: E731
    assert ids(straight[:3]) == ids(straight[3:6])  # each epoch sees every clip once
    assert [b["id"].tolist() for b in straight[:3]] != [b["id"].tolist() for b in straight[3:6]]
    other_seed = batches(Loader(data_dir, "train", train_config(seed=4)), 3)
    assert [b["id"].tolist() for b in other_seed] != [b["id"].tolist() for b in straight[:3]]


def test_resuming_late_in_an_epoch_reads_only_the_records_of_its_batches(data_dir, tmp_path):
    """Every record that the resumed batch does not use is overwritten (its CRC no longer
    matches): the resumed batch is still read and equals the uninterrupted stream's."""
    import shutil

    config = train_config(batch_size=2)
    late = CLIPS // 2 - 1  # the last batch of epoch 0
    expected = batches(Loader(data_dir, "train", config), late + 1)[late]
    broken = tmp_path / "ds"
    shutil.copytree(data_dir, broken)
    loader = Loader(broken, "train", config)
    rows, partners = loader.epoch_rows(0)
    used = set(rows[late * 2 :]) | set(partners[late * 2 :])
    assert len(used) < CLIPS
    for row in set(range(CLIPS)) - used:
        number, offset, size = loader.table.rows[row]
        shard = Path(loader.table.files[number])
        data = bytearray(shard.read_bytes())
        data[offset + records.HEADER : offset + size - records.FOOTER] = bytes(size - 16)
        shard.write_bytes(bytes(data))
    resumed = next(loader.iterate_from(late))
    for key in expected:
        np.testing.assert_array_equal(resumed[key], expected[key])
    with pytest.raises(DatasetError, match="rebuild it: rm") as error:
        next(loader.iterate_from(0))
    assert str(error.value).startswith(str(broken / "clips-train.tfrecord-"))


def test_offsets_that_miss_the_records_are_named_and_without_them_the_headers_are_read(
    data_dir, tmp_path
):
    """Record offsets that do not describe the shards (the shards read whole): one line saying
    so. Without the offsets file (a dataset prepared before it existed) the shards' headers
    give the same stream."""
    import shutil

    expected = batches(Loader(data_dir, "train", train_config()), 4)
    older = tmp_path / "ds"
    shutil.copytree(data_dir, older)
    offsets = np.load(older / "offsets-train.npy")
    offsets[:, 0] += 4
    np.save(older / "offsets-train.npy", offsets)
    with pytest.raises(DatasetError, match="the record offsets do not match them"):
        batches(Loader(older, "train", train_config()), 1)
    (older / "offsets-train.npy").unlink()
    resumed = batches(Loader(older, "train", train_config()), 2, start=2)
    for a, b in zip(expected[2:], resumed, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_hosts_read_disjoint_shares(data_dir):
    shares = []
    for index in range(2):
        config = LoaderConfig(
            batch_size=2, num_classes=4, train=False, process_index=index, process_count=2
        )
        shares.append({x for b in Loader(data_dir, "train", config) for x in b["id"]})
    assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == CLIPS


def test_eval_batches_are_the_official_preprocessing(data_dir, tmp_path):
    config = LoaderConfig(batch_size=5, num_classes=4, train=False)
    batch = next(iter(Loader(data_dir, "train", config)))
    clip = batch["id"][0].decode()
    path = data_dir.parent / "videos" / f"{clip}.mp4"
    fbank = audio.compute_fbank(audio.load_audio(path))
    np.testing.assert_allclose(batch["audio"][0], audio.normalize_fbank(fbank), atol=1e-5)
    frame = video.decode_jpeg(video.encode_jpeg(video.extract_frames(path)[5]))
    np.testing.assert_allclose(batch["image"][0], video.preprocess_frame(frame), atol=1e-5)
    label = batch["label"][0]
    assert sorted(np.unique(label)) == [0.0, 1.0] and label.sum() == 1.0
    sizes = [len(b["id"]) for b in Loader(data_dir, "train", config)]
    assert sizes == [5, 5, 2]  # no drop_remainder in evaluation
    every = LoaderConfig(batch_size=2, num_classes=4, train=False, all_frames=True)
    assert next(iter(Loader(data_dir, "train", every)))["image"].shape == (2, 10, 224, 224, 3)


def test_labels_follow_the_official_smoothing_and_mixup():
    plain = augment.labels(tf.constant([1, 3]), None, 1.0, 5, 0.1).numpy()
    np.testing.assert_allclose(plain, [0.02, 0.9, 0.02, 0.9, 0.02], rtol=1e-6)  # set, not added
    mixed = augment.labels(tf.constant([1]), tf.constant([1, 2]), 0.7, 5, 0.1).numpy()
    np.testing.assert_allclose(
        mixed, [0.02, 0.02 + 0.63 + 0.27, 0.02 + 0.27, 0.02, 0.02], rtol=1e-5
    )


def test_specaugment_masks_like_torchaudio():
    fbank = tf.ones((1024, 128))
    seed = tf.constant([1, 2], tf.int64)
    out = augment.spec_augment(fbank, 48, 192, seed).numpy()

    def expected_span(param, size, s):
        width = augment.uniform(augment.sub_seed(s, 0)).numpy() * param
        start = int(np.floor(augment.uniform(augment.sub_seed(s, 1)).numpy() * (size - width)))
        return start, start + int(np.floor(width))

    f0, f1 = expected_span(48, 128, augment.sub_seed(seed, 0))
    t0, t1 = expected_span(192, 1024, augment.sub_seed(seed, 1))
    masked = np.zeros((1024, 128), bool)
    masked[:, f0:f1] = True
    masked[t0:t1, :] = True
    np.testing.assert_array_equal(out == 0, masked)
    assert f1 - f0 <= 48 and t1 - t0 <= 192


def test_noise_and_roll_shift_time_and_add_bounded_noise():
    fbank = tf.tile(tf.range(1024, dtype=tf.float32)[:, None], [1, 4])
    out = augment.noise_and_roll(fbank, tf.constant([5, 6], tf.int64)).numpy()
    base = np.floor(out[:, 0])
    shift = int((base[0] - 0) % 1024)
    np.testing.assert_array_equal(base, np.roll(np.arange(1024), -shift))
    assert np.all(out - np.floor(out) < 0.1)


def test_fbank_mixup_keeps_padding_and_mixes_energies():
    fb1 = tf.constant(np.log([[4.0], [4.0], [1.0]]), tf.float32)  # 2 real frames + padding
    fb2 = tf.constant(np.log([[16.0], [1.0], [1.0]]), tf.float32)  # 1 real frame
    out = augment.mix_fbanks(fb1, 2, fb2, 1, tf.constant(0.5)).numpy()[:, 0]
    np.testing.assert_allclose(
        out, [np.log(0.25 * 4 + 0.25 * 16), np.log(0.25 * 4), 0.0], rtol=1e-6
    )


def test_waveform_mixup_is_the_official_computation(tmp_path):
    """Four clips of four classes, no smoothing: each label row gives lambda and the partner."""
    clips = synthetic.generate(tmp_path / "videos", clips=4, classes=4, seed=2)
    out = tmp_path / "ds"
    options = prepare.Options(keep_waveform=True)
    prepare.prepare(
        clips, out, labels=tmp_path / "videos" / "labels.csv", options=options, progress=False
    )
    config = train_config(mixup=1.0, noise=False, freqm=0, timem=0, label_smooth=0.0)
    loader = Loader(out, "train", config)
    assert loader.has_waveform
    batch = next(iter(loader))
    waves = [audio.load_audio(tmp_path / "videos" / f"clip_{i:05d}.mp4") for i in range(4)]
    for clip_id, fbank, label in zip(batch["id"], batch["audio"], batch["label"], strict=True):
        own = int(clip_id.decode()[-1])  # clip_0000k has class k
        lam = label[own]
        others = [c for c in range(4) if c != own and label[c] > 0]
        partner = others[0] if others else own
        expected = audio.normalize_fbank(audio.mixed_fbank(waves[own], waves[partner], lam))
        np.testing.assert_allclose(fbank, expected, atol=2e-3)


def test_float16_storage_error_is_small(tmp_path):
    clips = synthetic.generate(tmp_path / "videos", clips=2, classes=2, seed=5)
    with pytest.raises(ValueError, match="lists labels: give the label CSV"):
        prepare.prepare(clips, tmp_path / "ds", progress=False)
    options = prepare.Options(fbank_dtype="float16")
    labels = tmp_path / "videos" / "labels.csv"
    prepare.prepare(clips, tmp_path / "ds", labels=labels, options=options, progress=False)
    config = LoaderConfig(batch_size=2, num_classes=2, train=False, skip_norm=True)
    batch = next(iter(Loader(tmp_path / "ds", "train", config)))
    exact = audio.compute_fbank(
        audio.load_audio(tmp_path / "videos" / f"{batch['id'][0].decode()}.mp4")
    )
    error = np.abs(batch["audio"][0] - exact)
    assert error.max() <= 0.008  # float16 spacing is 2^-7 for |x| in [8, 16)


def test_balanced_sampling_draws_by_weight_with_official_label_weights(data_dir):
    from input_pipeline.dataset import host_split, label_sample_weights

    records = list(
        Loader(data_dir, "train", LoaderConfig(4, 4, train=False))._records().as_numpy_iterator()
    )
    labels = [list(r["label"]) for r in records]
    assert Loader(data_dir, "train", LoaderConfig(4, 4, train=False)).labels() == labels
    counts = {}
    for clip in labels:
        for k in clip:
            counts[k] = counts.get(k, 0) + 1
    expected = [sum(1000 / (counts[k] + 0.01) for k in clip) for clip in labels]
    np.testing.assert_allclose(label_sample_weights(data_dir, "train"), expected, rtol=1e-12)
    # on 5 hosts: each host's 2 clips weigh what they weigh on one machine (counts over all 12)
    shares = [host_split("train", train_config(process_index=i, process_count=5)) for i in range(5)]
    on_hosts = np.concatenate([label_sample_weights(data_dir, "train", s) for s in shares])
    np.testing.assert_allclose(on_hosts, expected[:10], rtol=1e-12)

    ids = [r["id"] for r in records]
    weights = tuple([500.0] + [1.0] * (CLIPS - 1))  # clip 0 is ~98% of the draws
    loader = Loader(data_dir, "train", train_config(mixup=0.0, sample_weights=weights))
    epochs = 4
    drawn = np.concatenate([b["id"] for b in batches(loader, epochs * CLIPS // 4)])
    assert len(drawn) == epochs * CLIPS
    assert np.mean(drawn == ids[0]) > 0.9
    again = np.concatenate([b["id"] for b in batches(loader, epochs * CLIPS // 4)])
    np.testing.assert_array_equal(drawn, again)
    with pytest.raises(ValueError, match="2 sample weights for 12 clips"):
        Loader(data_dir, "train", train_config(sample_weights=(1.0, 2.0)))

"""Runs whose files live in Cloud Storage (``gs://``), against a local Cloud Storage server.

The server (``gcp-storage-emulator``) speaks the Cloud Storage JSON API on localhost; our code
reaches it through the same clients it uses on a TPU pod: ``etils.epath`` over ``gcsfs``
(``STORAGE_EMULATOR_HOST``) and TensorStore for Orbax's arrays (``TENSORSTORE_GCS_HTTP_URL``).
Two things cannot be pointed at it: TensorFlow's own Cloud Storage client (``tf.data`` reading
the prepared shards; it has no endpoint setting), so training reads a local copy of the bucket's
dataset; and TensorStore's OCDBT checkpoint format, whose manifest updates need the generation
preconditions (``ifGenerationNotMatch`` -> 304) that the emulator ignores ("Malformed
StorageGeneration"), so the runs here save one folder per array (``checkpoint_ocdbt=False``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from runs import ROOT, logged_steps, pretrain_command

from cavmae_jax import convert, paths
from input_pipeline import prepare, synthetic

BUCKET = "cavmae-test"
STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bucket():
    """A local Cloud Storage server with one bucket; the environment points every client at it
    (inherited by the runs started as subprocesses)."""
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("localhost", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://localhost:{port}"
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url)
    yield f"gs://{BUCKET}"
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key)
        else:
            os.environ[key] = value
    server.stop()


def copy_tree(source: paths.Path, destination: paths.Path) -> None:
    for item in paths.files(source):
        target = destination / item.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(item.read_bytes())


@pytest.fixture(scope="module")
def datasets(bucket, tmp_path_factory):
    """The same generated clips prepared twice: from a bucket into the bucket, and locally."""
    root = tmp_path_factory.mktemp("cloud-data")
    listing = synthetic.generate(root / "videos", clips=8, classes=4, seed=5)
    remote_videos = paths.path(f"{bucket}/videos")
    copy_tree(paths.path(root / "videos"), remote_videos)  # clips.csv names resolve beside it
    labels = root / "videos" / "labels.csv"
    remote = paths.path(f"{bucket}/dataset")
    assert prepare.prepare(
        remote_videos / "clips.csv", remote, labels=remote_videos / "labels.csv", progress=False
    ) == (8, 0)
    local = root / "local"
    prepare.prepare(listing, local, labels=labels, progress=False)
    return remote, local


def test_a_dataset_prepared_from_and_into_a_bucket_equals_the_local_one(datasets, tmp_path):
    remote, local = datasets
    names = sorted(p.name for p in remote.iterdir())
    assert "dataset_info.json" in names and "failures.jsonl" in names
    shards = [name for name in names if ".tfrecord-" in name]
    assert shards and all((remote / n).read_bytes() == (local / n).read_bytes() for n in shards)


def test_bytes_ending_in_a_carriage_return_reach_the_bucket_whole(bucket):
    """A binary file (an event record's CRC, an array) may end in CR: appended, published and
    saved as an array, every byte arrives."""
    for tail in (b"\r", b"\n\r", b"\r\r", b"\r\n"):
        log = paths.path(f"{bucket}/ends/{tail.hex()}.log")
        paths.append(log, b"first" + tail)
        paths.append(log, b"second" + tail)
        assert log.read_bytes() == b"first" + tail + b"second" + tail
        whole = paths.path(f"{bucket}/ends/{tail.hex()}.bin")

        def write(local: str, data: bytes = b"whole" + tail) -> None:
            with open(local, "wb") as f:
                f.write(data)

        paths.publish(whole, write)
        assert whole.read_bytes() == b"whole" + tail
    array = np.frombuffer(bytes(7) + b"\r", np.float64)  # the .npy file ends in CR
    paths.save_array(f"{bucket}/ends/array.npy", array)
    with paths.path(f"{bucket}/ends/array.npy").open("rb") as f:
        np.testing.assert_array_equal(np.load(f), array)


def test_metrics_in_a_bucket_upload_what_each_write_adds(bucket, monkeypatch):
    """Thirty logged steps, then a resumed writer adds five: the bucket ends with every line
    once, and the bytes uploaded are the bytes the files hold (each sent once, not the whole
    history again at every write)."""
    from cavmae_jax.train.metrics import MetricsWriter

    sent = []
    append = paths.append

    def counting_append(destination, data):
        sent.append(len(data))
        append(destination, data)

    monkeypatch.setattr(paths, "append", counting_append)
    workdir = paths.path(f"{bucket}/metrics-run")
    for steps in (range(1, 31), range(31, 36)):
        writer = MetricsWriter(workdir, active=True)
        for step in steps:
            writer.write(step, {"step": step, "loss": 1.0 / step})
        writer.close()
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 36))
    assert sum(sent) == sum(len(f.read_bytes()) for f in paths.files(workdir))


def run_command(workdir: str, data: paths.Path) -> list[str]:
    return pretrain_command(workdir, data, STEPS, "--config.checkpoint_ocdbt=False")


def test_a_run_in_a_bucket_is_killed_resumes_from_its_checkpoint_and_is_evaluated(
    bucket, datasets, tmp_path
):
    """Workdir in the bucket (checkpoints, metrics, TensorBoard, model, figures): SIGKILL once
    step 3 is logged and a checkpoint is committed, restart: it resumes from the bucket's
    checkpoint and ends with the parameters of an uninterrupted local run; then ``cavmae
    retrieval`` evaluates the model in the bucket."""
    remote, _ = datasets
    data = tmp_path / "data"  # TensorFlow reads the shards: a local copy of the bucket's
    copy_tree(remote, paths.path(data))
    workdir = f"{bucket}/run"
    run = paths.path(workdir)
    committed = run / "checkpoints" / "2" / "commit_success.txt"  # a bucket has no rename
    process = subprocess.Popen(run_command(workdir, data), cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (committed.exists() and logged_steps(run)[-1:] >= [3]):
        assert process.poll() is None and time.monotonic() < deadline, "ended before the kill"
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert not (run / "model").exists()
    resumed_run = subprocess.run(
        run_command(workdir, data), cwd=ROOT, capture_output=True, text=True
    )
    assert resumed_run.returncode == 0, resumed_run.stderr[-2000:]
    assert "resuming from the checkpoint of step" in resumed_run.stdout
    assert logged_steps(run) == list(range(1, STEPS + 1))
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert any(p.name.startswith("events.out") for p in (run / "tensorboard").iterdir())

    local = tmp_path / "local-run"
    subprocess.run(run_command(str(local), data), cwd=ROOT, check=True, capture_output=True)
    resumed = convert.to_torch_state_dict(convert.load_model(f"{workdir}/model"))
    straight = convert.to_torch_state_dict(convert.load_model(local / "model"))
    for name, value in straight.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)

    evaluated = subprocess.run(
        [sys.executable, "-m", "cavmae_jax.cli", "retrieval", "--model", f"{workdir}/model"]
        + ["--data", str(data), "--split", "train", "--batch-size", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "audio->visual R@1" in evaluated.stdout

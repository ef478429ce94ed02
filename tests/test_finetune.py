"""Finetuning and evaluation: the recipe end to end, weight averaging, resume, sharded eval."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from worker_env import fake_devices_env

from cavmae_jax import convert, evaluation
from input_pipeline import prepare, synthetic
from input_pipeline.dataset import Loader, LoaderConfig

ROOT = Path(__file__).resolve().parents[1]
EVAL_WORKER = Path(__file__).with_name("eval_worker.py")
CLIPS, CLASSES, BATCH, EPOCHS = 12, 4, 4, 3  # 3 steps per epoch, 9 steps


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft-data")
    clips = synthetic.generate(root / "videos", clips=CLIPS, classes=CLASSES, seed=6)
    prepare.prepare(clips, root / "ds", labels=root / "videos" / "labels.csv", progress=False)
    return root / "ds"


def command(workdir: Path, dataset: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cavmae_jax.cli",
        "finetune",
        "--config",
        "configs/finetune.py:as20k,tiny",
        "--workdir",
        str(workdir),
        f"--config.data.dir={dataset}",
        f"--config.data.classes={CLASSES}",
        f"--config.model.label_dim={CLASSES}",
        f"--config.batch_size={BATCH}",
        f"--config.epochs={EPOCHS}",
        "--config.log_every=1",
        "--config.checkpoint_every=3",
        "--config.data.balanced=True",
        "--config.eval_frames=1",
    ]


def flat(tree) -> dict[str, np.ndarray]:
    """Leaves by path, with Orbax's ``value`` wrappers and key quoting removed."""
    return {
        re.sub(r"\['value'\]|'", "", jax.tree_util.keystr(path)): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def saved_params(workdir: Path, step: int) -> dict[str, np.ndarray]:
    with ocp.StandardCheckpointer() as checkpointer:
        return flat(checkpointer.restore(workdir / "checkpoints" / str(step) / "state")["params"])


def model_params(workdir: Path) -> dict[str, np.ndarray]:
    return flat(nnx.to_pure_dict(nnx.state(convert.load_model(workdir / "model"), nnx.Param)))


@pytest.fixture(scope="module")
def finetuned(dataset, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ft")
    subprocess.run(command(workdir, dataset), cwd=ROOT, check=True, capture_output=True)
    return workdir


def validation_rows(workdir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "validation/mAP" in r]


def test_finetune_validates_each_epoch_and_averages_the_recipe_epochs(finetuned):
    rows = validation_rows(finetuned)
    assert [r["step"] for r in rows] == [3, 6, 9]
    names = {"validation/" + n for n in ("mAP", "mAUC", "d_prime", "acc", "valid_loss")}
    assert names <= set(rows[0])
    detail = json.loads((finetuned / "validation" / "step_6.json").read_text())
    assert len(detail["AP"]) == CLASSES and detail["mAP"] == rows[1]["validation/mAP"]
    # tiny recipe: weight averaging over epochs 2..3 = the parameters saved at steps 6 and 9
    epoch2, epoch3, averaged = (
        saved_params(finetuned, 6),
        saved_params(finetuned, 9),
        model_params(finetuned),
    )
    assert averaged.keys() == epoch3.keys()
    for name, value in averaged.items():
        np.testing.assert_allclose(value, (epoch2[name] + epoch3[name]) / 2, rtol=1e-6, atol=1e-7)
    result = json.loads((finetuned / "evaluation.json").read_text())
    assert [f["frame"] for f in result["per_frame"]] == [5] and result["clips"] == CLIPS
    assert len(result["AP"]) == CLASSES and (finetuned / "loss.png").exists()


def test_weight_averaging_that_never_reached_its_window_saves_no_model(dataset, tmp_path):
    """One epoch with averaging from epoch 2: the end says so in one line and saves no
    "averaged" model; the same command with wa off saves the final checkpoint's parameters."""
    short = command(tmp_path, dataset) + ["--config.epochs=1", "--config.wa_start=2"]
    done = subprocess.run(short, cwd=ROOT, capture_output=True, text=True)
    last_line = done.stderr.strip().splitlines()[-1]  # after the progress bar
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "weight averaging over epochs 2..3 averaged no epoch" in last_line
    assert "ended after epoch 1" in last_line and not (tmp_path / "model").exists()
    subprocess.run(short + ["--config.wa=False"], cwd=ROOT, check=True, capture_output=True)
    last = saved_params(tmp_path, 3)
    for name, value in model_params(tmp_path).items():
        np.testing.assert_array_equal(value, last[name], err_msg=name)


def test_mixup_without_stored_waveforms_is_refused_unless_the_approximation_is_asked(
    dataset, tmp_path
):
    """The official recipes mix waveforms; on a dataset prepared without them the run stops
    in one line naming the dataset and the three ways on (the tiny recipe asks for the
    approximation, as every other finetuning test here runs)."""
    refused = subprocess.run(
        command(tmp_path, dataset) + ["--config.data.mixup_approx=False"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    line = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"{dataset}: mixup 0.5 mixes waveforms as the official loader does" in line
    assert "--keep-waveform" in line and "mixup_approx=True" in line
    assert not (tmp_path / "checkpoints").exists()


def direct_logits(model, dataset: Path) -> tuple[np.ndarray, np.ndarray]:
    """Logits [10 frames, N, K] and labels of every clip, batch by batch on one device, without
    the mesh code (one pass reading all ten frames of each clip)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, a, v: nnx.merge(graphdef, state)(a, v))
    config = LoaderConfig(6, CLASSES, train=False, all_frames=True)
    logits, labels = [], []
    for batch in Loader(dataset, "train", config):
        frames = [forward(state, batch["audio"], batch["image"][:, f]) for f in range(10)]
        logits.append(np.stack(frames))
        labels.append(batch["label"])
    return np.concatenate(logits, axis=1), np.concatenate(labels)


def test_evaluate_command_matches_direct_model_statistics(
    finetuned, dataset, capsys, tmp_path, monkeypatch
):
    """One frame: the statistics of directly computed logits, and the run's own final
    evaluation; ten frames: the statistics of the mean of the ten frames' sigmoids (NumPy),
    and of each frame, from one read of the split."""
    from cavmae_jax import cli

    evaluate = ["evaluate", "--model", str(finetuned / "model"), "--data", str(dataset)]
    evaluate += ["--split", "train", "--batch-size", "8"]
    cli.main([*evaluate, "--frames", "1"])
    one = json.loads(capsys.readouterr().out.splitlines()[0])
    model = convert.load_model(finetuned / "model")
    logits, labels = direct_logits(model, dataset)
    expected = evaluation.classification_stats(logits[5], labels)
    assert one["clips"] == CLIPS
    for name in ("mAP", "mAUC", "acc"):
        assert one[name] == pytest.approx(expected[name], abs=1e-6)
    final = json.loads((finetuned / "evaluation.json").read_text())
    assert one["mAP"] == pytest.approx(final["mAP"], abs=1e-6)
    output = tmp_path / "e.json"
    reads = []
    iterate_from = Loader.iterate_from
    monkeypatch.setattr(
        Loader, "iterate_from", lambda self, start: reads.append(start) or iterate_from(self, start)
    )
    cli.main([*evaluate, "--output", str(output)])
    assert reads == [0]  # ten frames, one pass over the split
    ten = json.loads(output.read_text())
    mean_sigmoid = evaluation.average_frame_predictions(logits, multilabel=True)
    expected = evaluation.classification_stats(mean_sigmoid, labels)
    assert [f["frame"] for f in ten["per_frame"]] == list(range(10))
    for frame, stats in enumerate(ten["per_frame"]):
        reference = evaluation.classification_stats(logits[frame], labels)
        assert stats["mAP"] == pytest.approx(reference["mAP"], abs=1e-6)
    assert ten["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    np.testing.assert_allclose(ten["AP"], expected["AP"], atol=1e-6)


def test_sigkill_during_finetuning_resumes_to_the_same_model(finetuned, dataset, tmp_path):
    """Killed after the epoch-2 checkpoint (which holds the averaging sum), then restarted."""
    process = subprocess.Popen(
        command(tmp_path, dataset), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = tmp_path / "metrics.jsonl"
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 7:
        time.sleep(0.01)
        assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    subprocess.run(command(tmp_path, dataset), cwd=ROOT, check=True, capture_output=True)
    resumed, straight = model_params(tmp_path), model_params(finetuned)
    for name, value in straight.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)
    strip = ("clips_per_s", "tflops", "mfu", "first_update_s")  # timings differ between runs
    resumed_rows, straight_rows = validation_rows(tmp_path), validation_rows(finetuned)
    for row in resumed_rows + straight_rows:
        for name in strip:
            row.pop(name, None)
    assert resumed_rows == straight_rows


def run_eval_worker(dataset: Path, devices: int, meshes=(), **extra_env: str):
    env = fake_devices_env(devices, **extra_env)
    command = [sys.executable, str(EVAL_WORKER), str(dataset), "8", *map(str, meshes)]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def results_of(process) -> list[dict]:
    """The worker's JSON with rows in a canonical order (hosts interleave rows: compare sets)."""
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-2000:]
    return [canonical(result) for result in json.loads(out.strip().splitlines()[-1])]


def canonical(result: dict) -> dict:
    by_logits = np.lexsort(np.asarray(result["logits"]).T)
    by_audio = np.lexsort(np.asarray(result["audio"]).T)
    commands = {k: result[k] for k in ("classify", "embed_videos", "embed_dataset") if k in result}
    return commands | {
        "devices": result["devices"],
        "logits": np.asarray(result["logits"])[by_logits],
        "label": np.asarray(result["label"])[by_logits],
        "audio": np.asarray(result["audio"])[by_audio],
        "visual": np.asarray(result["visual"])[by_audio],
        "gamma": np.asarray(result["gamma"]),
        "sizes": sorted(result["sizes"]),
        "recall": result["recall"],
        "validation": np.asarray(result["validation"]),
        "prototype_clips": result["prototype_clips"],
        "clip_labels": result["clip_labels"],
        "bank_rows": result["bank_rows"],
    }


def test_evaluation_embed_and_classify_on_a_mesh_and_on_two_processes_see_every_clip_once(
    dataset,
):
    """12 clips, global batch 8: one device, 8 fake devices and 2 processes x 2 devices give the
    same logits for every clip (the short last batches are padded, then dropped), the same
    per-epoch validation (the split's first full global batch, in order), and the same
    PCAV-MAE memory bank and prototypes (its refresh runs through the same batched path), and
    the same retrieval recall ranked in blocks on each mesh. ``embed`` and ``classify`` on the
    two processes share the 12 videos (6 each: a full and a padded batch) and give what one
    process gives, in input order: classify's paths and logits on every process, embed's ids
    and joint embeddings (of the videos and of the prepared dataset) written by process 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hosts = [
        run_eval_worker(
            dataset,
            2,
            CAVMAE_COORDINATOR=f"127.0.0.1:{port}",
            CAVMAE_PROCESSES="2",
            CAVMAE_PROCESS_ID=str(pid),
        )
        for pid in range(2)
    ]
    single, eight = results_of(run_eval_worker(dataset, 8, meshes=(1, 8)))
    first, second = (results_of(p)[0] for p in hosts)
    assert single["devices"] == 1 and len(single["logits"]) == CLIPS
    for result in (eight, first, second):
        assert result["devices"] in (8, 4)
        np.testing.assert_allclose(result["logits"], single["logits"], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(result["label"], single["label"])
        for name in ("audio", "visual"):
            np.testing.assert_allclose(result[name], single[name], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(result["gamma"], single["gamma"], rtol=1e-4)
        assert result["sizes"] == single["sizes"]
        # the same prototype clips and every clip's prototype, the bank split over the devices
        assert result["prototype_clips"] == single["prototype_clips"]
        assert result["clip_labels"] == single["clip_labels"]
        total, per_device = result["bank_rows"]
        assert total >= CLIPS and per_device == total // result["devices"] < CLIPS
        assert result["recall"] == pytest.approx(single["recall"])
        # the same 8 clips, in the same order, whatever the hosts and devices
        assert len(single["validation"]) == 8
        np.testing.assert_allclose(result["validation"], single["validation"], rtol=1e-4, atol=1e-5)
    paths = [path for path, _ in single["classify"]]
    assert len(paths) == CLIPS and paths == sorted(paths)
    for result in (first, second):
        assert [path for path, _ in result["classify"]] == paths
        np.testing.assert_allclose(
            [logits for _, logits in result["classify"]],
            [logits for _, logits in single["classify"]],
            rtol=1e-4,
            atol=1e-5,
        )
    assert "embed_videos" not in second
    for source in ("embed_videos", "embed_dataset"):
        ids, joint = first[source]
        assert ids == single[source][0] and len(ids) == CLIPS
        np.testing.assert_allclose(joint, single[source][1], rtol=1e-4, atol=1e-5)

"""Faults a user meets end in one line, a non-zero exit and no traceback, and nothing is lost:
the same command run again with the fault gone resumes from what was complete."""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import os

import pytest

from cavmae_jax import cli, paths
from cavmae_jax.train.checkpoint import Checkpointer
from input_pipeline import prepare, synthetic

TINY = "configs/pretrain.py:as-base,tiny"
STEPS = 4


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-clips")
    return synthetic.generate(root / "videos", clips=8, classes=2, seed=12), root / "videos"


@pytest.fixture(scope="module")
def dataset(clips, tmp_path_factory):
    listing, videos = clips
    out = tmp_path_factory.mktemp("fault-data") / "ds"
    prepare.prepare(listing, out, labels=videos / "labels.csv", shard_size=2, progress=False)
    return out


def pretrain(workdir, data, *extra: str) -> list[str]:
    return [
        *("pretrain", "--config", TINY, "--workdir", str(workdir)),
        f"--config.data.dir={data}",
        *("--config.batch_size=4", f"--config.num_steps={STEPS}", "--config.log_every=1"),
        "--config.checkpoint_every=2",
        *extra,
    ]


def one_line(argv: list[str], capsys) -> str:
    """Run the command; it must exit 2 with its message as the last line of stderr, the only
    one from ``cavmae`` (the progress bar may have drawn before), and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    ours = [line for line in err.splitlines() if line.startswith("cavmae ")]
    assert ours == [err.rstrip("\n").splitlines()[-1]] and ours[0].startswith(f"cavmae {argv[0]}: ")
    return ours[0]


def no_space(destination) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(destination))


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--config.lr=x"], "expected float"),
        (["--config.lrr=1"], "no field 'lrr'"),
        (["--config.data.dir={tmp}/missing"], "not a prepared dataset"),
        (["--config.init={tmp}/missing-model"], "not a cavmae-jax model directory"),
        (["--config.data.train_split=other"], "no split 'other'"),
    ],
)
def test_mistakes_on_the_command_line(dataset, tmp_path, capsys, extra, says):
    argv = pretrain(tmp_path / "run", dataset, *(e.format(tmp=tmp_path) for e in extra))
    assert says in one_line(argv, capsys)


def test_a_truncated_shard_is_named_with_its_rebuild_command(dataset, tmp_path, capsys):
    broken = tmp_path / "ds"
    broken.mkdir()
    for item in dataset.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    shard = sorted(broken.glob("clips-train.tfrecord-*"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    line = one_line(pretrain(tmp_path / "run", broken), capsys)
    assert f"{shard}: " in line and "rebuild it: rm" in line


def test_divergence_names_the_step_the_checkpoint_kept_and_what_to_try(dataset, tmp_path, capsys):
    """The same diverging run logged every update, and logged only at the end: both name the
    same first non-finite update (watched on the device at every update), and no checkpoint
    was saved from it or after it."""
    reported = []
    for log_every in (1, 100):
        workdir = tmp_path / f"run-{log_every}"
        argv = pretrain(workdir, dataset, "--config.lr=1e6", f"--config.log_every={log_every}")
        argv[2] = "configs/demo.py"
        line = one_line(argv, capsys)
        assert "diverged at step " in line and "loss=" in line
        reported.append(int(line.split("diverged at step ")[1].split()[0]))
        kept = Checkpointer(workdir / "checkpoints").manager.all_steps()
        assert all(step < reported[-1] for step in kept)
        newest = f"newest checkpoint kept: step {max(kept)}" if kept else "no checkpoint kept yet"
        assert newest in line and "--config.lr" in line and "--config.clip_norm" in line
    assert reported[0] == reported[1] < STEPS


def test_a_full_disk_while_preparing_resumes_with_every_clip(clips, tmp_path, capsys, monkeypatch):
    """The disk fills while the third of four shards is written (half a file left behind):
    one line; run again with room, every clip is prepared and every record reads."""
    listing, videos = clips
    out = tmp_path / "ds"
    argv = ["prepare", "--input", str(listing), "--output", str(out), "--shard-size", "2"]
    argv += ["--labels", str(videos / "labels.csv")]
    publish, written = paths.publish, []

    def filling(destination, write):
        if ".tfrecord-" in str(destination) and len(written) == 2:
            with open(f"{destination}.tmp", "wb") as f:
                f.write(b"half a shard")
            raise no_space(destination)
        written.append(destination)
        publish(destination, write)

    monkeypatch.setattr(paths, "publish", filling)
    line = one_line(argv, capsys)
    assert "no space left" in line and str(out) in line and "run the same command again" in line
    monkeypatch.setattr(paths, "publish", publish)
    cli.main(argv)
    assert "prepared 8 clips, 0 failed" in capsys.readouterr().out
    cli.main(["prepare", "--verify", str(out)])
    assert "train: every record read" in capsys.readouterr().out


def test_a_full_disk_while_training_resumes_from_the_last_whole_checkpoint(
    dataset, tmp_path, capsys, monkeypatch
):
    """The disk fills at the step-4 checkpoint, with the metrics line being written cut short;
    run again, it fills while the model is saved; run again with room: the run ends with every
    step logged once and the model saved."""
    workdir = tmp_path / "run"
    argv = pretrain(workdir, dataset)
    save = Checkpointer.save

    def filling(self, step, state, meta, force=False):
        if step == STEPS:
            with (workdir / "metrics.jsonl").open("a") as f:
                f.write('{"step": 5, "lo')
            raise no_space(self.directory / str(step))
        save(self, step, state, meta, force)

    monkeypatch.setattr(Checkpointer, "save", filling)
    line = one_line(argv, capsys)
    assert "no space left" in line and "checkpoints/4" in line
    monkeypatch.setattr(Checkpointer, "save", save)

    def no_room(model, directory, finetuning=None, fbank_norm=None):
        raise no_space(directory)

    monkeypatch.setattr("cavmae_jax.convert.save_model", no_room)
    assert "no space left" in one_line(argv, capsys)
    monkeypatch.undo()
    cli.main(argv)
    logged = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, STEPS + 1))
    assert (workdir / "model" / "model.json").exists()


def test_a_profile_of_chosen_updates_is_written_to_the_workdir(dataset, tmp_path):
    """``config.profile`` traces updates 2 and 3 (each one step of the trace) into
    ``W/profile``, for TensorBoard's profile plugin; the run ends as usual."""
    workdir = tmp_path / "run"
    argv = pretrain(workdir, dataset, "--config.profile.start_step=2", "--config.profile.steps=2")
    cli.main(argv)
    traces = list((workdir / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert (workdir / "model").is_dir()


def test_the_loop_logs_an_update_behind_and_sends_batches_two_updates_ahead(
    dataset, tmp_path, monkeypatch
):
    """Reading an update's metrics waits for it; the loop reads them once the next update is
    queued, so the device never idles on a log. Every update is still logged, in order. When an
    update is dispatched, the batches of the next two are already read and sent."""
    from cavmae_jax.train import loop

    events, build, write = [], loop.build, loop.MetricsWriter.write
    updates, batches = itertools.count(1), itertools.count(1)

    def counted(local_batches):
        for local in local_batches:
            events.append(("batch", next(batches)))
            yield local

    def recorded(phase_step):
        def step(state, batch):
            events.append(("update", next(updates)))
            return phase_step(state, batch)

        return step

    def recording_build(config, workdir, **options):
        setup, state = build(config, workdir, **options)
        steps = [(last, recorded(step)) for last, step in setup.steps]
        batches_from = lambda start: counted(setup.batches_from(start))  # noqa: E731
        return dataclasses.replace(setup, steps=steps, batches_from=batches_from), state

    def recording_write(self, step, values):
        events.append(("log", step))
        write(self, step, values)

    monkeypatch.setattr(loop, "build", recording_build)
    monkeypatch.setattr(loop.MetricsWriter, "write", recording_write)
    workdir = tmp_path / "run"
    cli.main([*pretrain(workdir, dataset), "--config.checkpoint_every=100"])
    assert [step for kind, step in events if kind == "log"] == list(range(1, STEPS + 1))
    for step in range(1, STEPS):
        assert events.index(("update", step + 1)) < events.index(("log", step))
    for step in range(1, STEPS + 1):
        assert events.index(("batch", step + 2)) < events.index(("update", step))


def test_a_resumed_run_restores_into_shapes_and_never_makes_the_initial_state(
    dataset, tmp_path, monkeypatch
):
    """A fresh run makes its initial state once (created sharded, ``init`` loaded); a resumed
    one restores into the state's shapes and shardings alone, so the initial state never sits
    in memory beside the restored one."""
    from cavmae_jax.train import setup as setup_lib

    made, initial_state = [], setup_lib.initial_state

    def recording(*args, abstract):
        made.append(abstract)
        return initial_state(*args, abstract=abstract)

    monkeypatch.setattr(setup_lib, "initial_state", recording)
    workdir = tmp_path / "run"
    cli.main(pretrain(workdir, dataset))
    assert made == [True, False]
    made.clear()
    cli.main([*pretrain(workdir, dataset), f"--config.num_steps={STEPS + 2}"])
    assert made == [True]
    logged = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, STEPS + 3))

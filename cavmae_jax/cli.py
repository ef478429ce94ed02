"""The ``cavmae`` command.

A MODEL argument is one of our model directories (``WORKDIR/model``, a ``cavmae convert``
output), an official ``.pth`` file, or the name of a released checkpoint (``cavmae convert
--list``; downloaded once). A mistake (a missing file, a bad option) prints one line and exits
with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from cavmae_jax.errors import RunStopped, UserError, out_of_space

EXTRAS = {
    "tensorflow": "data",
    "tensorflow_datasets": "data",
    "av": "data",
    "PIL": "data",
    "tensorboard": "data",
    "torch": "torch",
    "apache_beam": "beam",
}


def _quiet_libraries() -> None:
    """Keep TensorFlow's, TFDS's and absl's notices out of the commands' output: start-up
    banners, and TFDS's own deprecated ``map_fn`` call when frames are read undecoded."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # set either way, TF prints no notice
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def _join_processes(args) -> None:
    """Multi-host runs: ``--coordinator`` for explicit addresses, ``--distributed`` for
    environments JAX detects by itself (TPU pods, SLURM)."""
    import jax

    if args.coordinator:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=args.init_timeout,
        )
    elif args.distributed:
        jax.distributed.initialize(initialization_timeout=args.init_timeout)


def _no_overrides(args, overrides) -> None:
    if overrides:
        raise UserError(
            f"unrecognised arguments {' '.join(overrides)} (see cavmae {args.command} -h)"
        )


def _load(spec: str, **overrides):
    from cavmae_jax import pretrained

    return pretrained.load(spec, **overrides)


def _train(args, overrides):
    """``cavmae train`` (and ``pretrain`` / ``finetune``): the trainer the config names."""
    from cavmae_jax.config_loading import apply_overrides, load_config
    from cavmae_jax.train.loop import run

    config = load_config(args.config)
    apply_overrides(config, overrides)
    expected = {"pretrain": ("pretrain", "pcav"), "finetune": ("finetune",)}.get(args.command)
    if expected and config.trainer not in expected:
        raise UserError(f"{args.config} trains {config.trainer!r}; use cavmae train")
    _join_processes(args)
    if getattr(args, "folds", 0):
        from cavmae_jax.train.folds import cross_validate

        cross_validate(config, args.workdir, args.folds, run)
        return
    result = run(config, args.workdir)
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, int | float)}))
    if "mAP" in result:
        print(f"mAP {result['mAP']:.4f}, accuracy {result['acc']:.4f} over {result['clips']} clips")


def _evaluate(args, overrides):
    import jax

    from cavmae_jax import paths
    from cavmae_jax.evaluators import Classification
    from cavmae_jax.inference import EVAL_FRAME, replicated_state
    from cavmae_jax.sharding import make_mesh

    _no_overrides(args, overrides)
    _join_processes(args)
    loaded = _load(args.model)
    loss = {"mAP": "bce", "acc": "ce"}.get(args.metric)
    mode, loss = loaded.classifier_settings(args.mode, loss, "--metric mAP|acc")
    metric = "mAP" if loss == "bce" else "acc"
    mesh = make_mesh({"data": -1})
    frames = tuple(range(10)) if args.frames == 10 else (EVAL_FRAME,)
    graphdef, state = replicated_state(loaded.model, mesh)
    classes = loaded.model.cfg.label_dim
    evaluator = Classification(
        graphdef,
        mesh,
        args.data,
        args.split,
        args.batch_size,
        classes,
        mode,
        loss,
        frames,
        norm=loaded.fbank_norm,
    )
    result = evaluator.run(state)
    if args.output and jax.process_index() == 0:
        paths.path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("AP", "AUC")}))
    print(
        f"{metric} {result[metric]:.4f} over {result['clips']} clips, {len(frames)} frame(s), "
        f"mode {mode}"
    )


def _list_releases() -> None:
    from cavmae_jax.pretrained import RELEASES

    for r in RELEASES.values():
        what = f"finetuned on {r.finetune_data}, {r.mode}" if r.finetune_data else "pretrained"
        print(f"{r.name:34s} {r.file:26s} {what}; {r.reported or r.model}")


def _convert(args, overrides):
    from cavmae_jax import convert

    _no_overrides(args, overrides)
    if args.list:
        _list_releases()
        return
    if not (args.input and args.output):
        raise UserError("convert needs INPUT and OUTPUT (or --list)")
    if args.to_torch:
        convert.save_pth(convert.load_model(args.input), args.output)
    elif args.mae_init:
        from cavmae_jax.pth import load_pth

        init = convert.mae_imagenet_init(load_pth(args.input), args.seed)
        convert.save_model(init, args.output)
    else:
        sizes = {
            "kind": args.kind,
            "num_heads": args.num_heads,
            "decoder_num_heads": args.decoder_num_heads,
            "num_mel_bins": args.num_mel_bins,
            "norm_pix_loss": True if args.norm_pix_loss else None,
        }
        loaded = _load(args.input, **{k: v for k, v in sizes.items() if v is not None})
        convert.save_model(loaded.model, args.output, loaded.finetuning, loaded.fbank_norm)
    print(f"wrote {args.output}")


def _verify(data_dir: str) -> None:
    from input_pipeline.dataset import open_dataset
    from input_pipeline.verify import verify

    open_dataset(data_dir)  # one line if it is not a prepared dataset
    bad = 0
    for split, problems in verify(data_dir).items():
        print(
            f"{split}: {'every record read' if not problems else f'{len(problems)} bad shard(s)'}"
        )
        for problem in problems:
            print(f"  {problem}")
        bad += len(problems)
    if bad:
        raise SystemExit(1)


def _demo_videos(args) -> tuple[str, str]:
    """Generate ``--demo`` clips under OUTPUT/videos once; their list and label CSV."""
    from cavmae_jax import paths
    from input_pipeline import synthetic

    if args.input or not args.output:
        raise UserError("--demo makes its own videos: give --output only, not --input")
    if paths.is_remote(args.output):
        raise UserError(f"{args.output}: the demo videos are generated on a local disk")
    videos = paths.path(args.output) / "videos"
    if not (videos / "clips.csv").exists():
        synthetic.generate(videos, clips=args.demo, classes=args.demo_classes, seed=0)
    return str(videos / "clips.csv"), str(videos / "labels.csv")


def _prepare(args, overrides):
    from input_pipeline.prepare import Options, prepare

    if args.runner == "local":
        _no_overrides(args, overrides)
    if args.verify:
        _verify(args.verify)
        return
    if args.demo:
        args.input, args.labels = _demo_videos(args)
    if not (args.input and args.output):
        raise UserError("prepare needs --input and --output (or --verify DIR, or --demo N)")
    if args.fold_column and args.folds:
        raise UserError("give --fold-column (folds from the CSV) or --folds K (dealt), not both")
    options = Options(
        fbank_dtype=args.fbank_dtype,
        keep_waveform=args.keep_waveform,
        audio_length=args.audio_length,
        no_audio=args.no_audio,
        no_video=args.no_video,
    )
    prepared, failed = prepare(
        args.input,
        args.output,
        labels=args.labels,
        workers=args.workers,
        split=args.split,
        shard_size=args.shard_size,
        options=options,
        videos=args.videos,
        coverage_threshold=args.coverage_threshold,
        runner=args.runner,
        beam_args=tuple(overrides),
        label_column=args.label_column,
        fold_column=args.fold_column,
        folds=args.folds,
        media_dir=args.media_dir,
    )
    print(f"prepared {prepared} clips, {failed} failed (report: {args.output}/failures.jsonl)")
    if args.videos:
        from cavmae_jax import paths
        from input_pipeline.official_lists import summary

        report = json.loads((paths.path(args.output) / "coverage.json").read_text())[args.split]
        print(summary(report) + f" (report: {args.output}/coverage.json)")
    if not prepared:
        raise SystemExit(1)


def _explain(args, overrides):
    import numpy as np

    from cavmae_jax.explain import explain

    _no_overrides(args, overrides)
    result = explain(args.workdir, args.output, args.data, args.split, args.clips)
    for level in result["levels"]:
        known = [p["purity"] for p in level["prototypes"] if p["purity"] is not None]
        mean_purity = f", mean purity {np.mean(known):.3f}" if known else ""
        print(
            f"granularity {level['granularity']}: {len(level['prototypes'])} prototypes"
            f"{mean_purity}"
        )
    print(f"wrote {args.output}/prototypes.json, tsne.png and {args.clips} clip figures")


def _export(args, overrides):
    from cavmae_jax import convert

    _no_overrides(args, overrides)
    loaded = _load(args.model)
    encoder = convert.export_encoder(loaded.model, args.label_dim, args.seed)
    convert.save_model(encoder, args.output, fbank_norm=loaded.fbank_norm)
    print(f"wrote {args.output} (CAVMAEFT, {args.label_dim} classes)")


def _retrieval(args, overrides):
    import jax

    from cavmae_jax.evaluators import Retrieval
    from cavmae_jax.inference import replicated_state
    from cavmae_jax.sharding import make_mesh

    _no_overrides(args, overrides)
    _join_processes(args)
    mesh = make_mesh({"data": -1})
    graphdef, state = replicated_state(_load(args.model).model, mesh)
    result = Retrieval(graphdef, mesh, args.data, args.split, args.batch_size).run(state)
    if jax.process_index():
        return
    print(json.dumps(result))
    print(
        f"audio->visual R@1 {result['a2v_r1']:.3f}, visual->audio R@1 {result['v2a_r1']:.3f} "
        f"over {result['clips']} clips (chance {result['chance_r1']:.3f})"
    )


def _embed(args, overrides):
    import jax

    from cavmae_jax.embed import embed

    _no_overrides(args, overrides)
    _join_processes(args)
    loaded = _load(args.model)
    shapes = embed(
        loaded.model,
        args.inputs,
        args.output,
        args.batch_size,
        args.tokens,
        args.split,
        loaded.fbank_norm,
    )
    if jax.process_index():
        return
    clips = next(iter(shapes.values()))[0]
    listed = ", ".join(f"{name}.npy {list(shape)}" for name, shape in shapes.items())
    print(f"{clips} clips -> {args.output}: ids.txt, {listed}")


def _probe(args, overrides):
    from cavmae_jax import paths
    from cavmae_jax.probe import NEIGHBOURS, probe, probe_folds
    from cavmae_jax.train.folds import fold_splits
    from input_pipeline import metadata

    _no_overrides(args, overrides)
    loaded = _load(args.model)
    model = loaded.model
    folds = fold_splits(args.data, args.folds) if args.folds else None
    norm = loaded.fbank_norm if args.norm == "model" else None
    if args.norm == "dataset":
        norm = metadata.fbank_statistics(args.data, "+".join(folds or [args.train_split]))
    if folds:
        result = probe_folds(model, args.data, folds, args.batch_size, norm)
    else:
        result = probe(model, args.data, args.train_split, args.eval_split, args.batch_size, norm)
    if args.output:
        paths.path(args.output).write_text(json.dumps(result, indent=1))
    metric = result["metric"]
    for note in result["fitted"]:
        print(f"model: {note}")
    print(f"{'embedding':10s} {'linear ' + metric:>18s} {f'{NEIGHBOURS}-NN ' + metric:>18s}")
    for name in ("audio", "visual", "joint"):
        if name in result:
            row = result[name]
            cells = [
                f"{row[k]['mean']:.4f} ± {row[k]['sd']:.4f}" if folds else f"{row[k]:.4f}"
                for k in ("linear", "knn")
            ]
            print(f"{name:10s} {cells[0]:>18s} {cells[1]:>18s}")


def _classify(args, overrides):
    import jax

    from cavmae_jax.classify import classify

    _no_overrides(args, overrides)
    _join_processes(args)
    loaded = _load(args.model)
    loss = {"sigmoid": "bce", "softmax": "ce"}.get(args.activation)
    mode, loss = loaded.classifier_settings(args.mode, loss, "--activation sigmoid|softmax")
    results = classify(
        loaded.model,
        args.inputs,
        mode,
        loss,
        args.top_k,
        args.labels,
        args.batch_size,
        args.split,
        loaded.fbank_norm,
    )
    for result in results if jax.process_index() == 0 else []:
        if args.json:
            print(json.dumps(result))
            continue
        print(f"{result['path']} ({mode})")
        for top in result["top"]:
            name = top["name"] if top["name"] is not None else f"class {top['index']}"
            print(f"  {top['score']:.3f}  {name}")


def _reconstruct(args, overrides):
    from cavmae_jax.reconstruct import reconstruct

    _no_overrides(args, overrides)
    losses = reconstruct(
        _load(args.model).model,
        args.video,
        args.output,
        args.mask_ratio_a,
        args.mask_ratio_v,
        args.mask_mode,
        args.seed,
    )
    print(
        f"wrote {args.output}: masked-patch MSE audio {losses['loss_mae_a']:.4f}, "
        f"visual {losses['loss_mae_v']:.4f}"
    )


def _add_process_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", help="host:port of process 0 (multi-host runs)")
    p.add_argument("--num-processes", type=int, default=1, help="processes in a multi-host run")
    p.add_argument("--process-id", type=int, default=0, help="this process's index")
    p.add_argument(
        "--distributed", action="store_true", help="multi-host run JAX detects (TPU pod, SLURM)"
    )
    p.add_argument("--init-timeout", type=int, default=300, help="seconds to wait for peers")


def _add_inputs(p: argparse.ArgumentParser, batch: int) -> None:
    p.add_argument("model", help="model directory, official .pth, or released name")
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="video files, folders of videos, or one dataset"
    )
    p.add_argument("--split", default="eval", help="split, when INPUT is a prepared dataset")
    p.add_argument("--batch-size", type=int, default=batch, help="clips per batch on the mesh")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="cavmae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    top.add_argument("--debug", action="store_true", help="show tracebacks of mistakes")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, what: str, run) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=what, description=what)
        p.set_defaults(run=run)
        return p

    for name, what in (
        ("train", "run the trainer the config names"),
        ("pretrain", "pretrain CAV-MAE or PCAV-MAE"),
        ("finetune", "finetune a classifier"),
    ):
        p = command(name, f"{what}; options --config.x=y override config fields", _train)
        p.add_argument(
            "--config",
            required=True,
            help="recipe[:variant] (demo, pretrain:as-base, finetune:as20k, pcav:as) or a file",
        )
        p.add_argument("--workdir", required=True, help="run folder, local or gs://")
        if name == "finetune":
            p.add_argument(
                "--folds",
                type=int,
                default=0,
                help="k-fold cross-validation over the dataset's fold<k> splits (W/fold<k>)",
            )
        _add_process_arguments(p)

    p = command("probe", "linear probe and k-NN of a frozen model's embeddings", _probe)
    p.add_argument("model", help="model directory, official .pth, or released name")
    p.add_argument("--data", required=True, help="prepared dataset")
    p.add_argument("--train-split", default="train", help="split(s) the probes learn from")
    p.add_argument("--eval-split", default="eval", help="split they are scored on")
    p.add_argument("--folds", type=int, default=0, help="over the dataset's K fold<k> splits")
    p.add_argument(
        "--norm",
        choices=["model", "audioset", "dataset"],
        default="model",
        help="fbank statistics: the model's own (else AudioSet's), AudioSet's or the dataset's",
    )
    p.add_argument("--batch-size", type=int, default=8, help="clips per inference batch")
    p.add_argument("--output", help="write the figures as JSON here")

    p = command("evaluate", "classification statistics of a finetuned model", _evaluate)
    p.add_argument("--model", required=True, help="model directory, official .pth, or name")
    p.add_argument("--data", required=True, help="prepared dataset")
    p.add_argument("--split", default="eval", help="split of the dataset")
    p.add_argument("--mode", help="finetuning mode (default: the model's, else multimodal)")
    p.add_argument(
        "--metric", choices=["mAP", "acc"], help="sigmoid or softmax (default: the model's)"
    )
    p.add_argument("--frames", type=int, choices=[1, 10], default=10, help="10-frame ensemble")
    p.add_argument("--batch-size", type=int, default=48, help="global batch")
    p.add_argument("--output", help="write the full statistics (per-class AP/AUC) as JSON")
    _add_process_arguments(p)

    p = command("retrieval", "audio<->visual recall@1/5/10 of a model on a dataset", _retrieval)
    p.add_argument("--model", required=True, help="model directory, official .pth, or name")
    p.add_argument("--data", required=True, help="prepared dataset")
    p.add_argument("--split", default="eval", help="split of the dataset")
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    _add_process_arguments(p)

    p = command("embed", "audio, visual and joint embeddings of clips (.npy)", _embed)
    _add_inputs(p, 8)
    p.add_argument("--output", required=True, help="folder for ids.txt and <name>.npy")
    p.add_argument("--tokens", action="store_true", help="also every token's features")
    _add_process_arguments(p)

    p = command("classify", "top-k labels of clips from a finetuned model", _classify)
    _add_inputs(p, 8)
    p.add_argument("--top-k", type=int, default=5, help="labels shown per clip")
    p.add_argument("--labels", help="label CSV (index,mid,display_name); AudioSet's by default")
    p.add_argument("--json", action="store_true", help="one JSON object per clip")
    p.add_argument("--mode", help="finetuning mode (default: the model's, else multimodal)")
    p.add_argument(
        "--activation", choices=["sigmoid", "softmax"], help="default: how the model was trained"
    )
    _add_process_arguments(p)

    p = command("reconstruct", "inpainting figure of one clip (pretrained model)", _reconstruct)
    p.add_argument("model", help="model directory, official .pth, or released name")
    p.add_argument("video", help="a video file")
    p.add_argument("--output", required=True, help="PNG file")
    p.add_argument("--mask-ratio-a", type=float, default=0.75, help="audio patches masked")
    p.add_argument("--mask-ratio-v", type=float, default=0.75, help="visual patches masked")
    p.add_argument(
        "--mask-mode",
        choices=["unstructured", "time", "freq", "tf"],
        default="unstructured",
        help="audio masking (visual masking is unstructured)",
    )
    p.add_argument("--seed", type=int, default=2, help="of the masks (official: 2)")

    p = command(
        "convert", "released name or .pth -> model directory; back with --to-torch", _convert
    )
    p.add_argument("input", nargs="?", help="released name, .pth, or model dir (--to-torch)")
    p.add_argument("output", nargs="?", help="model directory (.pth with --to-torch)")
    p.add_argument("--list", action="store_true", help="list the released checkpoints")
    p.add_argument("--to-torch", action="store_true", help="model directory -> official .pth")
    p.add_argument("--mae-init", action="store_true", help="ImageNet MAE .pth -> CAV-MAE init")
    p.add_argument("--kind", choices=["CAVMAE", "CAVMAEFT", "CAVMAEFTAudio"], help="else inferred")
    p.add_argument("--norm-pix-loss", action="store_true", help="the model was pretrained with it")
    p.add_argument("--num-heads", type=int, help="encoder heads (default: width / 64)")
    p.add_argument("--decoder-num-heads", type=int, help="decoder heads (default: width / 32)")
    p.add_argument("--num-mel-bins", type=int, help="fbank bins (default 128)")
    p.add_argument(
        "--seed", type=int, default=0, help="for the random modality tokens (--mae-init)"
    )

    p = command("prepare", "videos -> TFDS dataset of fbanks and frames", _prepare)
    p.add_argument(
        "--input",
        help="folder of videos, folder of class folders (labelled by folder), CSV list, "
        "official JSON; with --videos an official list (AudioSet segment CSV, VGGSound CSV, "
        "JSON datafile)",
    )
    p.add_argument("--videos", help="folder or bucket of downloaded videos, found by clip id")
    p.add_argument(
        "--coverage-threshold",
        type=float,
        default=0.2,
        help="name the classes missing more than this fraction of their listed clips",
    )
    p.add_argument("--output", help="dataset folder, local or gs://")
    p.add_argument("--verify", metavar="DIR", help="read back every record of a dataset")
    p.add_argument(
        "--demo",
        type=int,
        metavar="N",
        help="generate N demo clips (a coloured shape with a sound per class) and prepare them",
    )
    p.add_argument("--demo-classes", type=int, default=8, help="classes of the --demo clips")
    p.add_argument(
        "--labels",
        help="official label CSV (index,mid,display_name); else written from the label names",
    )
    p.add_argument("--label-column", help="CSV with a header: the column of the labels")
    p.add_argument("--media-dir", help="where a CSV's relative paths are (default: its folder)")
    p.add_argument("--fold-column", help="CSV with a header: the fold column (splits fold<k>)")
    p.add_argument("--folds", type=int, default=0, help="deal K folds per class (splits fold<k>)")
    p.add_argument(
        "--audio-length", type=int, default=1024, help="fbank frames kept (1024: 10.24 s)"
    )
    p.add_argument(
        "--no-audio",
        choices=["skip", "silent"],
        default="skip",
        help="a clip without an audio track: skipped and reported, or kept with silent audio "
        "(reported, audio_frames 0)",
    )
    p.add_argument(
        "--no-video",
        choices=["skip", "blank"],
        default="skip",
        help="a clip without a video track (an audio file): skipped and reported, or kept with "
        "black frames (reported; for audio-only finetuning)",
    )
    p.add_argument("--workers", type=int, default=1, help="decoding processes (local runner)")
    p.add_argument(
        "--runner",
        default="local",
        help="local (a process pool), beam (Beam's DirectRunner) or a Beam runner's name "
        "(DataflowRunner, FlinkRunner, SparkRunner); Beam pipeline options follow the command",
    )
    p.add_argument("--split", default="train", help="split name")
    p.add_argument("--shard-size", type=int, default=256, help="clips per shard (resume unit)")
    p.add_argument(
        "--fbank-dtype", choices=["float32", "float16"], default="float32", help="storage type"
    )
    p.add_argument("--keep-waveform", action="store_true", help="also store int16 audio (mixup)")

    p = command("explain", "PCAV-MAE prototypes: report, t-SNE, per-clip figures", _explain)
    p.add_argument("--workdir", required=True, help="a finished PCAV-MAE pretraining run")
    p.add_argument("--output", required=True, help="folder for the report and figures")
    p.add_argument("--data", help="prepared dataset (default: the run's)")
    p.add_argument("--split", default="train", help="split of the dataset")
    p.add_argument("--clips", type=int, default=4, help="clips to explain one by one")

    p = command("export", "pretrained model -> encoder-only finetuning model", _export)
    p.add_argument("model", help="model directory, official .pth, or released name")
    p.add_argument("output", help="model directory")
    p.add_argument("--label-dim", type=int, required=True, help="classes (527 AS, 309 VGG)")
    p.add_argument("--seed", type=int, default=0, help="for the fresh classification head")
    return top


def _full_disk(err: BaseException, args) -> str:
    named = (getattr(err, "filename", None), getattr(args, "output", None))
    where = next((n for n in (*named, getattr(args, "workdir", None)) if n), "the output")
    return (
        f"no space left on the device of {where}: make room and run the same command again; "
        "it resumes from what was complete (nothing half-written is used)"
    )


def _mistake(err: BaseException, args) -> str | None:
    """The one line for a user's mistake or a stopped run; None for anything else (a bug:
    traceback)."""
    if out_of_space(err):
        return _full_disk(err, args)
    if isinstance(err, UserError | FileNotFoundError | RunStopped):
        return str(err)
    if isinstance(err, ModuleNotFoundError) and err.name:
        extra = EXTRAS.get(err.name.split(".")[0])
        if extra:
            return f"this needs {err.name}: pip install 'cavmae-jax[{extra}]'"
    return None


def _quiet_full_disk_in_threads() -> None:
    """A full disk met by a background writer (Orbax's asynchronous save) is reported by the
    main thread as one line when it waits for the save: the traceback the writer logs, and
    what its unfinished writes report while the process winds down (tracebacks printed
    from TensorStore's threads, asyncio's unretrieved futures), would only repeat it."""

    def not_full_disk(record: logging.LogRecord) -> bool:
        return not (record.exc_info and out_of_space(record.exc_info[1]))

    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(not_full_disk)
    shown = sys.unraisablehook

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            shown(unraisable)

    sys.unraisablehook = hook


def _winding_down_quietly() -> None:
    sys.excepthook = lambda *error: None
    logging.disable(logging.CRITICAL)


def main(argv: list[str] | None = None) -> None:
    """The ``cavmae`` program (``argv`` None: the process's own arguments). Called with
    ``argv`` from Python (tests, notebooks), it leaves the process's hooks and logging as it
    found them."""
    program = argv is None
    args, overrides = parser().parse_known_args(argv)
    _quiet_libraries()
    if program and not args.debug:
        _quiet_full_disk_in_threads()
    try:
        args.run(args, overrides)
    except Exception as err:
        message = None if args.debug else _mistake(err, args)
        if message is None:
            raise
        print(f"cavmae {args.command}: {message}", file=sys.stderr)
        if program and out_of_space(err):
            _winding_down_quietly()
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

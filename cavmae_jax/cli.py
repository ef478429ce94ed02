"""The ``cavmae`` command: ``train`` (``pretrain``, ``finetune``), ``evaluate``, ``retrieval``,
``explain``, ``export``, ``convert``, ``prepare``."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from cavmae_jax.config_loading import apply_overrides, load_config


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


def _train(args, overrides):
    """``cavmae train`` (and ``pretrain`` / ``finetune``): the trainer the config names."""
    from cavmae_jax.train.loop import run

    _join_processes(args)
    config = load_config(args.config)
    apply_overrides(config, overrides)
    expected = {"pretrain": ("pretrain", "pcav"), "finetune": ("finetune",)}.get(args.command)
    if expected and config.trainer not in expected:
        raise SystemExit(
            f"cavmae {args.command}: {args.config} trains {config.trainer!r}; use cavmae train"
        )
    result = run(config, args.workdir)
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, int | float)}))
    if "mAP" in result:
        print(f"mAP {result['mAP']:.4f}, accuracy {result['acc']:.4f} over {result['clips']} clips")


def _evaluate(args, overrides):
    import jax

    from cavmae_jax import convert
    from cavmae_jax.train.evaluators import EVAL_FRAME, Classification
    from cavmae_jax.train.inference import replicated_state
    from cavmae_jax.train.sharding import make_mesh

    if overrides:
        raise SystemExit(f"cavmae evaluate: unrecognised arguments {overrides}")
    _join_processes(args)
    model = convert.load_checkpoint(args.model)
    mesh = make_mesh({"data": -1})
    frames = tuple(range(10)) if args.frames == 10 else (EVAL_FRAME,)
    graphdef, state = replicated_state(model, mesh)
    loss = "bce" if args.metric == "mAP" else "ce"
    evaluator = Classification(
        graphdef,
        mesh,
        args.data,
        args.split,
        args.batch_size,
        model.cfg.label_dim,
        args.mode,
        loss,
        frames,
    )
    result = evaluator.run(state)
    if args.output and jax.process_index() == 0:
        from cavmae_jax import paths

        paths.path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("AP", "AUC")}))
    print(
        f"{args.metric} {result[args.metric]:.4f} over {result['clips']} clips, "
        f"{len(frames)} frame(s)"
    )


def _convert(args, overrides):
    from cavmae_jax import convert

    if overrides:
        raise SystemExit(f"cavmae convert: unrecognised arguments {overrides}")
    if args.to_torch:
        model = convert.load_checkpoint(args.input)
        convert.save_torch_checkpoint(model, args.output)
    elif args.mae_init:
        from cavmae_jax.pth import load_pth

        convert.save_checkpoint(
            convert.mae_imagenet_init(load_pth(args.input), args.seed), args.output
        )
    else:
        model = convert.load_torch_checkpoint(
            args.input, kind=args.kind, **({"norm_pix_loss": True} if args.norm_pix_loss else {})
        )
        convert.save_checkpoint(model, args.output)
    print(f"wrote {args.output}")


def _prepare(args, overrides):
    from input_pipeline.prepare import Options, prepare

    if overrides:
        raise SystemExit(f"cavmae prepare: unrecognised arguments {overrides}")
    options = Options(fbank_dtype=args.fbank_dtype, keep_waveform=args.keep_waveform)
    prepared, failed = prepare(
        args.input,
        args.output,
        labels=args.labels,
        workers=args.workers,
        split=args.split,
        shard_size=args.shard_size,
        options=options,
    )
    print(f"prepared {prepared} clips, {failed} failed (report: {args.output}/failures.jsonl)")
    if not prepared:
        raise SystemExit(1)


def _explain(args, overrides):
    from cavmae_jax.explain import explain

    if overrides:
        raise SystemExit(f"cavmae explain: unrecognised arguments {overrides}")
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

    if overrides:
        raise SystemExit(f"cavmae export: unrecognised arguments {overrides}")
    model = convert.load_checkpoint(args.model)
    convert.save_checkpoint(convert.export_encoder(model, args.label_dim, args.seed), args.output)
    print(f"wrote {args.output} (CAVMAEFT, {args.label_dim} classes)")


def _retrieval(args, overrides):
    from cavmae_jax import convert, paths
    from cavmae_jax.train.evaluators import Retrieval
    from cavmae_jax.train.inference import replicated_state
    from cavmae_jax.train.sharding import make_mesh

    if overrides:
        raise SystemExit(f"cavmae retrieval: unrecognised arguments {overrides}")
    workdir = paths.path(args.workdir)
    data = args.data or workdir / "data" / "dataset"
    mesh = make_mesh({"data": -1})
    graphdef, state = replicated_state(convert.load_checkpoint(workdir / "model"), mesh)
    result = Retrieval(graphdef, mesh, data, args.split, args.batch_size).run(state)
    print(json.dumps(result))
    print(
        f"audio->visual R@1 {result['a2v_r1']:.3f}, visual->audio R@1 {result['v2a_r1']:.3f} "
        f"over {result['clips']} clips (chance {result['chance_r1']:.3f})"
    )


def _add_process_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", help="host:port of process 0 (multi-host runs)")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--distributed", action="store_true", help="auto-detected multi-host run")
    p.add_argument("--init-timeout", type=int, default=300, help="seconds to wait for peers")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cavmae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, what in (
        ("train", "run the trainer the config names"),
        ("pretrain", "pretrain CAV-MAE or PCAV-MAE"),
        ("finetune", "finetune a classifier"),
    ):
        p = sub.add_parser(name, help=f"{what} (overrides: --config.x=y)")
        p.add_argument("--config", required=True, help="config file, optionally path:variant")
        p.add_argument("--workdir", required=True)
        _add_process_arguments(p)
        p.set_defaults(run=_train)
    v = sub.add_parser("evaluate", help="classification statistics of a finetuned model")
    v.add_argument("--model", required=True, help="model directory (e.g. WORKDIR/model)")
    v.add_argument("--data", required=True, help="prepared dataset")
    v.add_argument("--split", default="eval")
    v.add_argument("--mode", default="multimodal", help="finetuning mode of the model")
    v.add_argument("--metric", choices=["mAP", "acc"], default="mAP", help="sigmoid or softmax")
    v.add_argument("--frames", type=int, choices=[1, 10], default=10, help="10-frame ensemble")
    v.add_argument("--batch-size", type=int, default=48)
    v.add_argument("--output", help="write the full statistics (per-class AP/AUC) as JSON")
    _add_process_arguments(v)
    v.set_defaults(run=_evaluate)
    c = sub.add_parser("convert", help="official .pth -> Orbax model, or back with --to-torch")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--to-torch", action="store_true", help="Orbax model dir -> official .pth")
    c.add_argument("--mae-init", action="store_true", help="ImageNet MAE .pth -> CAV-MAE init")
    c.add_argument("--kind", choices=["CAVMAE", "CAVMAEFT", "CAVMAEFTAudio"])
    c.add_argument("--norm-pix-loss", action="store_true", help="the model was pretrained with it")
    c.add_argument(
        "--seed", type=int, default=0, help="for the random modality tokens (--mae-init)"
    )
    c.set_defaults(run=_convert)
    r = sub.add_parser("prepare", help="videos -> TFDS dataset of fbanks and frames")
    r.add_argument("--input", required=True, help="folder of videos, CSV list, or official JSON")
    r.add_argument("--output", required=True)
    r.add_argument("--labels", help="official label CSV (index,mid,display_name)")
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--split", default="train")
    r.add_argument("--shard-size", type=int, default=256, help="clips per shard (resume unit)")
    r.add_argument("--fbank-dtype", choices=["float32", "float16"], default="float32")
    r.add_argument("--keep-waveform", action="store_true", help="also store int16 audio (mixup)")
    r.set_defaults(run=_prepare)
    t = sub.add_parser("retrieval", help="audio<->visual recall@1/5/10 of a trained model")
    t.add_argument("--workdir", required=True, help="holds model/ (from cavmae pretrain)")
    t.add_argument("--data", help="prepared dataset (default: WORKDIR/data/dataset)")
    t.add_argument("--split", default="train")
    t.add_argument("--batch-size", type=int, default=32)
    t.set_defaults(run=_retrieval)
    x = sub.add_parser("explain", help="PCAV-MAE prototypes: report, t-SNE, per-clip figures")
    x.add_argument("--workdir", required=True, help="a finished PCAV-MAE pretraining run")
    x.add_argument("--output", required=True)
    x.add_argument("--data", help="prepared dataset (default: the run's)")
    x.add_argument("--split", default="train")
    x.add_argument("--clips", type=int, default=4, help="clips to explain one by one")
    x.set_defaults(run=_explain)
    e = sub.add_parser("export", help="pretrained model -> encoder-only finetuning model")
    e.add_argument("model", help="a model directory (e.g. WORKDIR/model)")
    e.add_argument("output")
    e.add_argument("--label-dim", type=int, required=True, help="classes (527 AS, 309 VGG)")
    e.add_argument("--seed", type=int, default=0, help="for the fresh classification head")
    e.set_defaults(run=_export)
    args, overrides = parser.parse_known_args(argv)
    args.run(args, overrides)


if __name__ == "__main__":
    main(sys.argv[1:])

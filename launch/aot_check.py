"""Ahead-of-time check of a recipe: compile its full-size training step, allocate nothing.

Before a long run, this builds the run through the trainers' own setup (``train/setup.py``,
abstractly: no data read, no parameter allocated), lowers and compiles the exact sharded step
(model, optimizer, accumulation, extra state, mesh, sharding rules, global batch) of every
phase of the run (PCAV-MAE's warm-up, decoder and encoder-only phases each have their own) and
reports what the compiled programs need per device: memory (arguments, temporaries, peak: of
the phase that needs most, and per phase; also of the evaluators, the final evaluation and
PCAV-MAE's memory-bank refresh at ``--clips`` rows, AS-2M's by default: the verdict covers
them all, and the whole run's peak names the part that needs it), and for the first phase
matmul FLOPs (read from the compiled program, loops weighed by their trip counts) against the
analytic count, the collectives it runs, the time of those FLOPs at the chip's peak (a lower
bound on the step) and of its estimated HBM traffic.

Targets:
  * ``--topology NAME``: a TPU slice compiled for from any machine (``jax[tpu]`` installed),
    e.g. ``v5e-16``, ``v5p-64``, ``v6e-256``, ``"2x v5p-64"`` (two slices over DCN): the memory
    is the TPU's own and the verdict says whether it fits the chip's HBM;
  * ``--devices N``: N CPU stand-ins, to catch sharding mistakes (indivisible batch, mesh that
    does not fit) without libtpu;
  * neither: the devices of this host (run it on the GPU or TPU host itself).

    python launch/aot_check.py configs/pretrain.py:as-scale++ --topology v5e-16
    python launch/aot_check.py configs/pcav.py:as --topology v5p-8 --config.model.attention=xla
    python launch/aot_check.py configs/finetune.py:as20k --devices 8

The last line printed is one JSON object (for scripts and ``docs/tpu.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

# training clips: the PCAV-MAE memory bank's rows (durations do not change shapes); AS-2M's
AS2M_CLIPS = 1_772_023
GIB = 2.0**30


def _figure(value: float) -> float:
    return float(f"{value:.4g}")


def _memory_exhausted(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "Ran out of memory" in str(error)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="config file[:variant]")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--topology", help="TPU slice to compile for, e.g. v5e-16, '2x v5p-64'")
    target.add_argument("--devices", type=int, help="stand in for N devices on this CPU")
    parser.add_argument(
        "--breakdown", action="store_true", help="HBM traffic and matmul FLOPs by model source"
    )
    parser.add_argument(
        "--clips", type=int, default=AS2M_CLIPS, help="training clips (the memory bank's rows)"
    )
    args, overrides = parser.parse_known_args(argv)

    from cavmae_jax import tpu

    slice_ = tpu.parse(args.topology) if args.topology else None
    if slice_:
        tpu.compile_only_environment(slice_)
    elif args.devices:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.devices}"
        )
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from cavmae_jax import hlo_stats
    from cavmae_jax.config_loading import apply_overrides, load_config
    from cavmae_jax.train.setup import abstract_batch, build

    config = load_config(args.config)
    apply_overrides(config, overrides)
    devices = tpu.devices(slice_) if slice_ else None
    setup, state = build(config, abstract_clips=args.clips, devices=devices)
    count = setup.mesh.size
    report = {
        "config": args.config,
        "topology": slice_.name if slice_ else jax.default_backend(),
        "chips": count,
        "trainer": config.trainer,
        "mesh": {k: v for k, v in setup.mesh.shape.items()},
        "sharding": config.sharding,
        "global_batch": config.batch_size,
        "grad_accum": config.grad_accum,
        "attention": setup.cfg.attention,
        "remat": setup.cfg.remat,
        "mlp": setup.cfg.mlp,
        "hbm_gib": slice_.chip.hbm_gib if slice_ else None,
        "tflop_per_chip_analytic": _figure(setup.flops_at(1) * config.batch_size / count / 1e12),
    }
    batch = abstract_batch(config, setup)
    phases, first_update = [], 1
    for last, step in setup.steps:  # each phase's own step (PCAV-MAE: up to three)
        if last < first_update:  # a phase of no update
            continue
        started = time.perf_counter()
        try:
            compiled = step.lower(state, batch).compile()
        except Exception as error:  # the compiler's verdict on memory is the check's result
            if not (slice_ and _memory_exhausted(error)):
                raise
            first = next(line for line in str(error).splitlines() if line.strip())
            phases.append({"updates": [first_update, last], "compile_error": first[:300]})
            report.update(fits=False, phases=phases)
            print(json.dumps(report))
            return report
        phases.append(
            {
                "updates": [first_update, last],
                "compile_s": round(time.perf_counter() - started, 1),
                **_memory(compiled),
                "tflop_per_chip_analytic": _figure(
                    setup.flops_at(first_update) * config.batch_size / count / 1e12
                ),
            }
        )
        if first_update == 1:
            first_compiled = compiled
        first_update = last + 1
    compiled = first_compiled
    report["compile_s"] = phases[0]["compile_s"]
    worst = max(phases, key=lambda phase: phase["peak_gib"])  # the verdict is the whole run's
    report.update({k: worst[k] for k in ("arguments_gib", "temporaries_gib", "peak_gib")})
    if len(phases) > 1:
        report["phases"] = phases
    programs = {}
    for name, lowered in _other_programs(config, setup, state, args.clips).items():
        try:
            programs[name] = _memory(lowered.compile())
        except Exception as error:
            if not (slice_ and _memory_exhausted(error)):
                raise
            first = next(line for line in str(error).splitlines() if line.strip())
            programs[name] = {"compile_error": first[:300]}
    if programs:
        report["programs"] = programs
    parts = {"training step": worst["peak_gib"]}
    parts.update({name: p.get("peak_gib", math.inf) for name, p in programs.items()})
    report["run_peak_part"] = max(parts, key=parts.get)
    peak = parts[report["run_peak_part"]] * GIB
    report["run_peak_gib"] = peak / GIB if math.isfinite(peak) else None  # None: out of memory
    stats = hlo_stats.analyze(compiled.as_text())
    report.update(
        tflop_per_chip_compiled=_figure(stats.matmul_flops / 1e12),
        hbm_traffic_gib=_figure(stats.bytes_accessed / GIB),
        hbm_only_traffic_gib=_figure(stats.hbm_bytes / GIB),
        async_copy_gib=_figure(stats.async_copy_bytes / GIB),
        xla_bytes_accessed_gib=_figure(compiled.cost_analysis()["bytes accessed"] / GIB),
        collectives={
            kind: {"count": c["count"], "gib": round(c["bytes"] / GIB, 3)}
            for kind, c in sorted(stats.collectives.items())
        },
    )
    if stats.unknown_trip_counts:
        report["loops_counted_once"] = stats.unknown_trip_counts
    if slice_:
        chip = slice_.chip
        compute_ms = stats.matmul_flops / (chip.peak_tflops * 1e12) * 1e3
        memory_ms = stats.bytes_accessed / (chip.hbm_gbps * 1e9) * 1e3
        hbm_only_ms = stats.hbm_bytes / (chip.hbm_gbps * 1e9) * 1e3
        bound_ms = max(compute_ms, memory_ms)
        # the model's own matmuls, not what a kernel recomputes, count as useful work
        useful_ms = report["tflop_per_chip_analytic"] / chip.peak_tflops * 1e3
        report.update(
            fits=peak <= chip.hbm_gib * GIB,
            roofline_ms={
                "compute": _figure(compute_ms),
                "hbm": _figure(memory_ms),
                "hbm_only": _figure(hbm_only_ms),
            },
            roofline_mfu_bound=round(min(useful_ms / bound_ms, 1.0), 3),
            roofline_mfu_bound_hbm_only=round(
                min(useful_ms / max(compute_ms, hbm_only_ms), 1.0), 3
            ),
            clips_per_s_bound=round(config.batch_size / (bound_ms / 1e3), 1),
        )
    if args.breakdown:
        report["breakdown"] = {
            source: {"gib": round(v["bytes"] / GIB, 2), "tflop": _figure(v["flops"] / 1e12)}
            for source, v in sorted(stats.by_source.items(), key=lambda kv: -kv[1]["bytes"])
        }
    _print_summary(report)
    if args.breakdown:
        _print_breakdown(report["breakdown"], stats.bytes_accessed)
    print(json.dumps(report))
    return report


def _other_programs(config, setup, state: dict, clips: int) -> dict:
    """{name: Lowered} of what a run compiles besides its steps: the trainer's refreshes (the
    PCAV-MAE memory bank), the evaluators of ``config.evals`` and the final evaluation."""
    import jax

    from cavmae_jax import evaluators

    # traced under the mesh, as the step is: TPU kernels take the chip from it, not from the
    # compiling host's default device
    with jax.sharding.use_abstract_mesh(setup.mesh.abstract_mesh):
        programs = setup.trainer.refresh_programs(config, setup, state, clips)
        steps_per_epoch = setup.durations.steps_per_epoch
        for name, _, evaluator in evaluators.from_config(
            config, setup.graphdef, setup.mesh, None, steps_per_epoch
        ):
            programs[f"evaluator {name}"] = evaluator.program(state, setup.cfg)
        final = setup.trainer.final_evaluator(config, setup.graphdef, setup.mesh, None)
        if final is not None:
            programs["final evaluation"] = final.program(state, setup.cfg)
    return programs


def _memory(compiled) -> dict[str, float]:
    """Per-chip memory of a compiled step: state and batch, temporaries, and their peak."""
    memory = compiled.memory_analysis()
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    return {
        "arguments_gib": round(memory.argument_size_in_bytes / GIB, 3),
        "temporaries_gib": round(memory.temp_size_in_bytes / GIB, 3),
        "peak_gib": round(peak / GIB, 3),
    }


def _print_summary(report: dict) -> None:
    mesh = " x ".join(f"{k} {v}" for k, v in report["mesh"].items() if v > 1) or "1 device"
    print(
        f"{report['config']} on {report['topology']} ({report['chips']} chips, {mesh}, "
        f"{report['sharding']} sharding, attention {report['attention']}): global batch "
        f"{report['global_batch']} in {report['grad_accum']} micro-batch(es)"
    )
    capacity = f" of {report['hbm_gib']} GiB" if report["hbm_gib"] else ""
    print(
        f"  memory per chip: {report['arguments_gib']} GiB state + batch, "
        f"{report['temporaries_gib']} GiB temporaries, peak {report['peak_gib']} GiB{capacity}"
    )
    for phase in report.get("phases", []):
        first, last = phase["updates"]
        print(
            f"  updates {first}-{last}: peak {phase['peak_gib']} GiB per chip, "
            f"{phase['tflop_per_chip_analytic']} TFLOP per chip (analytic)"
        )
    for name, part in report.get("programs", {}).items():
        memory = part.get("compile_error") or f"peak {part['peak_gib']} GiB per chip"
        print(f"  {name}: {memory}")
    run_peak = report["run_peak_gib"]
    needs = "out of memory" if run_peak is None else f"peak {run_peak} GiB per chip"
    print(
        f"  whole run: {needs} ({report['run_peak_part']}){capacity}"
        + (f" -> {'fits' if report['fits'] else 'DOES NOT FIT'}" if "fits" in report else "")
    )
    print(
        f"  matmul TFLOP per chip: {report['tflop_per_chip_compiled']} compiled, "
        f"{report['tflop_per_chip_analytic']} analytic"
    )
    for kind, c in report["collectives"].items():
        print(f"  {kind}: {c['count']} per step, {c['gib']} GiB")
    if "roofline_ms" in report:
        r = report["roofline_ms"]
        print(
            f"  roofline: {r['compute']} ms of matmuls at the chip's peak, {r['hbm']} ms of memory "
            f"traffic; MFU bound {report['roofline_mfu_bound']}, at most "
            f"{report['clips_per_s_bound']} clips/s"
        )
        print(
            f"  counting only buffers in HBM (the rest stay on chip): {r['hbm_only']} ms; "
            f"MFU bound {report['roofline_mfu_bound_hbm_only']}"
        )


def _print_breakdown(breakdown: dict, total: float) -> None:
    print("  HBM traffic and matmul FLOPs per chip by source (section/part of the model):")
    for source, v in breakdown.items():
        share = v["gib"] * GIB / total if total else 0.0
        print(f"    {source:28s} {v['gib']:8.2f} GiB ({share:5.1%}) {v['tflop']:8.3f} TFLOP")


if __name__ == "__main__":
    main(sys.argv[1:])

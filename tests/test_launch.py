"""Launch helpers: the ahead-of-time compile check on stand-in devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def aot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "launch/aot_check.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def last_json(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


PASSES = ("embedding", "nearest neighbours", "kernel density")


def test_aot_check_compiles_sharded_recipes_of_every_trainer_and_rejects_bad_batches():
    report = last_json(
        aot("configs/finetune.py:as20k,tiny", "--devices", "8", "--config.mesh.data=2")
    )
    assert report["mesh"] == {"slice": 1, "data": 2, "fsdp": 4, "tensor": 1}
    assert report["global_batch"] == 8 and report["sharding"] == "fsdp"
    assert report["arguments_gib"] > 0 and report["tflop_per_chip_analytic"] > 0
    assert report["collectives"]["all-gather"]["count"] > 0  # FSDP gathers the parameters
    # the per-epoch validation (one frame) and the final 10-frame evaluation, compiled too
    assert set(report["programs"]) == {"evaluator validation", "final evaluation"}
    one, ten = (report["programs"][k]["arguments_gib"] for k in sorted(report["programs"]))
    assert ten > one > 0
    pcav = ("configs/pcav.py:as,tiny", "--config.grad_accum=2", "--config.pcav.decoder_epochs=10")
    report = last_json(aot(*pcav, "--devices", "8"))
    assert report["trainer"] == "pcav" and report["grad_accum"] == 2
    # every phase compiled: with the decoder, then the encoders alone (fewer FLOPs, less memory)
    decoder, encoders = report["phases"]
    assert decoder["updates"][0] == 1 and encoders["updates"][0] == decoder["updates"][1] + 1
    assert encoders["tflop_per_chip_analytic"] < decoder["tflop_per_chip_analytic"]
    assert 0 < encoders["peak_gib"] <= decoder["peak_gib"] == report["peak_gib"]
    # and the memory-bank refresh, at AS-2M's 1,772,023 clips by default
    assert set(report["programs"]) == {f"memory bank: {part}" for part in PASSES}
    assert all(part["peak_gib"] > 0 for part in report["programs"].values())
    peaks = {name: part["peak_gib"] for name, part in report["programs"].items()}
    peaks["training step"] = report["peak_gib"]
    assert report["run_peak_gib"] == max(peaks.values()) == peaks[report["run_peak_part"]]
    assert report["attention"] == "recompute"  # auto, resolved for the mesh's CPU devices
    bad = aot("configs/pretrain.py:as-base,tiny", "--devices", "8", "--config.batch_size=12")
    assert bad.returncode != 0
    assert "global batch 12 does not split over 8 batch shards" in bad.stderr


def test_aot_check_compiles_for_a_tpu_slice_from_this_cpu():
    """libtpu's compile-only devices: the memory is the TPU compiler's, the attention is the
    TPU's (grouped, not the host's choice), the matmul FLOPs read from the compiled program (its
    layer loops weighed by their trip counts) agree with the analytic count up to the padding
    of attention to 128-token blocks, and the data-parallel gradient is all-reduced."""
    pretrain = last_json(aot("configs/pretrain.py:as-base,tiny", "--topology", "v5e-4"))
    finetune = last_json(
        aot(
            "configs/finetune.py:as20k,tiny",
            *("--topology", "v5e-4", "--config.model.attention=xla", "--config.model.remat=none"),
        )
    )
    for report in (pretrain, finetune):
        assert report["topology"] == "v5e-4" and report["chips"] == 4 and report["fits"]
        assert 0 < report["arguments_gib"] < report["peak_gib"] < report["hbm_gib"] == 16.0
        assert report["collectives"]["all-reduce"]["count"] > 0
        assert report["roofline_ms"]["hbm"] > 0 and report["xla_bytes_accessed_gib"] > 0
        assert 0 < report["hbm_only_traffic_gib"] < report["hbm_traffic_gib"]
        assert report["roofline_mfu_bound"] <= report["roofline_mfu_bound_hbm_only"] <= 1
    # auto on a TPU: the grouped kernel, which gives way to splash at the tiny model's widths
    assert pretrain["attention"] == "grouped" and finetune["attention"] == "xla"
    assert pretrain["remat"] == "matmuls"  # auto, resolved for the TPU
    assert pretrain["mlp"] == "fused"  # auto on a TPU (its blocks run XLA's: too narrow)
    # the bound: the model's own matmuls (analytic, nothing recomputed) at the chip's peak over
    # the larger of the compiled matmul time and the traffic time
    compute, hbm = pretrain["roofline_ms"]["compute"], pretrain["roofline_ms"]["hbm"]
    useful = pretrain["tflop_per_chip_analytic"] / 197.0 * 1e3  # v5e: 197 TFLOP/s
    assert pretrain["roofline_mfu_bound"] == pytest.approx(useful / max(compute, hbm), abs=0.01)
    # XLA attention, nothing recomputed: no padding, the compiled matmuls are the analytic count
    assert finetune["tflop_per_chip_compiled"] == pytest.approx(
        finetune["tflop_per_chip_analytic"], rel=0.05
    )
    # splash pads 32 audio / 16 visual tokens to 128: more compiled FLOPs, never fewer
    assert pretrain["tflop_per_chip_compiled"] > pretrain["tflop_per_chip_analytic"]


GROUPED_ON_TPU = """
from cavmae_jax import tpu
slice_ = tpu.parse("v5e-4")
tpu.compile_only_environment(slice_)
import jax, jax.numpy as jnp
from cavmae_jax import hlo_stats
from cavmae_jax.models import grouped_attention
mesh = jax.make_mesh((4,), ("fsdp",), devices=tpu.devices(slice_))
spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
for length, dim, heads in ((49, 768, 12), (708, 512, 16), (1024, 768, 12)):
    projection = jax.ShapeDtypeStruct((8, length, 3 * dim), jnp.bfloat16, sharding=spec)
    bias = jax.ShapeDtypeStruct((3 * dim,), jnp.bfloat16)

    def loss(projection, bias):
        out = grouped_attention.attention(projection, bias, dim // heads, 0.125)
        return out.astype(jnp.float32).sum()

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(projection, bias).compile()
    ours = hlo_stats.analyze(compiled.as_text()).bytes_accessed
    print(length, dim, ours / compiled.cost_analysis()["bytes accessed"])
"""


def printed_rows(program: str) -> list[list[str]]:
    """The lines ``program`` prints (run in a fresh process: libtpu's compile-only devices),
    split into words."""
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [line.split() for line in done.stdout.strip().splitlines()]


def test_the_grouped_kernel_compiles_for_a_tpu_at_the_models_lengths():
    """Mosaic takes the grouped attention kernel, forward and backward, per device of a TPU
    slice, at unaligned lengths (49 visible patches), the decoder's 708 tokens with 32-wide
    heads, and the longest sequence it holds whole; the traffic model reads the kernels' own
    byte counts as XLA's cost analysis does."""
    ratios = [float(row[-1]) for row in printed_rows(GROUPED_ON_TPU)]
    assert len(ratios) == 3
    for ratio in ratios:  # the rest of the step (the loss, its gradient) at tiled sizes
        assert ratio == pytest.approx(1.0, abs=0.1)


FUSED_MLP_ON_TPU = """
from cavmae_jax import tpu
for name in ("v5e-4", "v5p-8", "v6e-4"):
    slice_ = tpu.parse(name)
    tpu.compile_only_environment(slice_)
import jax, jax.numpy as jnp
from cavmae_jax import hlo_stats
from cavmae_jax.models import fused_mlp
for name in ("v5e-4", "v5p-8", "v6e-4"):
    mesh = jax.make_mesh((4,), ("fsdp",), devices=tpu.devices(tpu.parse(name)))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    for length, dim in ((177, 768), (708, 512)):
        x = jax.ShapeDtypeStruct((8, length, dim), jnp.bfloat16, sharding=spec)
        w1 = jax.ShapeDtypeStruct((dim, 4 * dim), jnp.bfloat16)
        w2 = jax.ShapeDtypeStruct((4 * dim, dim), jnp.bfloat16)
        b1 = jax.ShapeDtypeStruct((4 * dim,), jnp.float32)
        b2 = jax.ShapeDtypeStruct((dim,), jnp.float32)

        def loss(x, w1, b1, w2, b2):
            return fused_mlp.mlp(x, w1, b1, w2, b2).astype(jnp.float32).sum()

        with jax.set_mesh(mesh):
            grad = jax.jit(jax.value_and_grad(loss, argnums=range(5)))
            compiled = grad.lower(x, w1, b1, w2, b2).compile()
        stats = hlo_stats.analyze(compiled.as_text())
        print(name, length, stats.matmul_flops / (8 // 4 * length * dim * 4 * dim))
"""


def test_the_fused_mlp_compiles_for_tpus_per_device_of_a_mesh():
    """Mosaic takes the fused MLP kernels, forward and backward, on v5e, v5p (two TensorCores
    a chip) and v6e, at ViT-B's and the decoder's widths, per device of a 4-chip mesh; the
    traffic model counts their matmul FLOPs: 2 x 2 forward, 2 x 5 backward (a again, dh, dx,
    dw1, dw2) per token and weight."""
    rows = printed_rows(FUSED_MLP_ON_TPU)
    assert len(rows) == 6
    for _, _, ratio in rows:
        assert float(ratio) == pytest.approx(14.0)


def test_the_tpu_pod_launcher_runs_the_requested_revision_with_the_runtime_only(tmp_path):
    """``gcloud`` replaced by a recorder: the command every worker runs checks the Python
    version, moves a checkout to the requested revision (also an existing one), installs the
    runtime and libtpu (no test tools, no torch) and runs ``cavmae train`` (the trainer comes
    from the config, not from its file name) with the gs:// paths and overrides intact."""
    recorder = tmp_path / "gcloud"
    recorder.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$GCLOUD_LOG"\n')
    recorder.chmod(0o755)
    log = tmp_path / "log"
    env = dict(
        os.environ,
        PATH=f"{tmp_path}:{os.environ['PATH']}",
        GCLOUD_LOG=str(log),
        REPO="https://example.com/cavmae-jax.git",
        REV="v1.2",
    )
    done = subprocess.run(
        ["bash", "launch/tpu_pod.sh", "tpu1", "zone1", "configs/my_ft.py:as2m", "gs://b/run"]
        + ["--config.data.dir=gs://b/data set", "--config.init=gs://b/init.pth"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    args = log.read_text().split("\n")
    assert args[:6] == ["compute", "tpus", "tpu-vm", "ssh", "tpu1", "--zone"]
    script = args[args.index("--command") + 1 :]
    text = "\n".join(script)
    assert "sys.version_info >= (3, 11)" in text
    assert "git fetch -q origin v1.2 && git checkout -q --detach FETCH_HEAD" in script
    assert "pip install -q '.[data,tpu]'" in text and "torch" not in text and "test" not in text
    assert (
        ".venv/bin/cavmae train --distributed --config configs/my_ft.py:as2m --workdir gs://b/run"
        " --config.data.dir=gs://b/data\\ set --config.init=gs://b/init.pth" in script
    )
    check = subprocess.run(["bash", "-n", "-c", text], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr

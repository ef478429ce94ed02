"""TPU slices by their Cloud names (``v5e-16``, ``v5p-64``, ``2x v5p-64``), as compile-only
devices for ahead-of-time checks on any machine, with the chip figures the checks compare to.

Cloud names count chips for v5e and v6e and TensorCores (two per chip) for v5p. The
figures are the published per-chip ones: HBM capacity, bf16 matrix peak, HBM bandwidth.
"""

from __future__ import annotations

import dataclasses
import os
import re


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str  # the name libtpu's topologies use
    hbm_gib: float
    peak_tflops: float  # bf16
    hbm_gbps: float
    cores_per_name: int  # what one unit of the Cloud name counts: 2 = TensorCores of one chip
    dims: int  # 2-D or 3-D torus


CHIPS = {
    "v5e": Chip("v5e", 16.0, 197.0, 819.0, 1, 2),
    "v5p": Chip("v5", 95.0, 459.0, 2765.0, 2, 3),
    "v6e": Chip("v6e", 32.0, 918.0, 1640.0, 1, 2),
}
# Slice shapes by chip count, as Cloud TPU allocates them.
SHAPES = {
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"},
}
_NAME = re.compile(r"^(?:(\d+)\s*x\s*)?(v5e|v5p|v6e)-(\d+)$")


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    chip: Chip
    chips: int  # per slice
    slices: int
    shape: str  # e.g. "4x4" or "2x4x4"

    @property
    def total_chips(self) -> int:
        return self.chips * self.slices


def parse(name: str) -> Slice:
    """``v5e-16`` -> 16 v5e chips as 4x4; ``2x v5p-64`` -> two slices of 32 v5p chips."""
    match = _NAME.match(name.strip())
    if not match:
        raise ValueError(
            f"unknown TPU topology {name!r}: expected e.g. v5e-16, v5p-64, v6e-256 or 2x v5p-64"
        )
    slices, generation, count = int(match.group(1) or 1), match.group(2), int(match.group(3))
    chip = CHIPS[generation]
    chips, shapes = count // chip.cores_per_name, SHAPES[chip.dims]
    if count % chip.cores_per_name or chips not in shapes:
        sizes = ", ".join(f"{generation}-{n * chip.cores_per_name}" for n in shapes)
        raise ValueError(f"{name}: no such {generation} slice; known: {sizes}")
    return Slice(name.strip(), chip, chips, slices, shapes[chips])


def compile_only_environment(slice_: Slice) -> None:
    """libtpu on a machine that is not a TPU VM: skip the metadata server (and its warnings),
    allow several compiling processes, keep JAX's own backend on the CPU."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    kind = {"v5e": "v5litepod", "v5": "v5p"}.get(slice_.chip.generation, slice_.chip.generation)
    cores = slice_.chips * slice_.chip.cores_per_name
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{kind}-{cores}")


def devices(slice_: Slice) -> list:
    """Compile-only devices of the slice (libtpu must be installed: ``pip install jax[tpu]``)."""
    from jax.experimental import topologies

    description = f"{slice_.chip.generation}:{slice_.shape}"
    topology = topologies.get_topology_desc(description, platform="tpu", num_slices=slice_.slices)
    return list(topology.devices)

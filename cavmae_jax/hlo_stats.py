"""What a compiled XLA program does per device, read from its optimized HLO text.

``Compiled.cost_analysis()`` counts the body of a ``while`` loop once, so a model whose layers
run in a ``lax.scan`` (ours) reports a fraction of its FLOPs. Here every computation is weighed
by how often it runs (the product of the trip counts of the loops around it), and three things
are summed: matrix-multiply FLOPs (``dot`` and ``convolution``, the part that runs on the
matrix units, plus what a Pallas kernel's cost estimate states), the bytes the unfused
instructions read and write (XLA's model of HBM traffic: each kernel reads its inputs and
writes its outputs once), and the collectives (kind, executions, bytes). A Pallas kernel
that states the bytes it accesses in its cost estimate counts those, as XLA's cost analysis
does: its block specs, not its operand list, say what it reads (the grouped attention kernel
takes the qkv projection three times and reads a third of it each time).

The traffic model follows XLA's own ``bytes accessed`` instruction by instruction (a fusion
that updates a slice in place counts the slice, one that reads slices of a parameter counts
the slices), at the size each array takes in its layout: a TPU layout stores arrays in tiles
(``T(8,128)``), so a bf16 [..., 512, 64] array takes 128 lanes per row, twice its logical
size. An asynchronous copy (``copy-start`` / ``copy-done``, the TPU's prefetch of an operand
into on-chip memory) is not counted, since its consumer's read is counted already; it is
summed apart (``async_copy_bytes``, in XLA's way: source, destination and both tuples).

``bytes_accessed`` counts every buffer wherever the compiler placed it, as XLA does; many
live in on-chip memory (memory space 1 in their layouts), so it overstates what crosses the
HBM bus. ``hbm_bytes`` counts only the reads and writes of buffers in HBM (memory space 0),
the asynchronous copies' HBM side included, and is the optimistic figure: both read each
operand of a kernel once, where the attention kernels read k and v once per block of
queries.

Every counted instruction is also charged to its source (``source_of``): the model part named
by the ``jax.named_scope`` in its op metadata (``encoder_a``, ``decoder``, ``attention``, ...),
or, for an instruction without metadata (a Pallas kernel), that of its first known operand.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4}
_BYTES |= {"u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9]\w*)?)\[([0-9,]*)\](?:\{([^}]*)\})?")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9-]*)\((.*?)\)(.*)$")
_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\{\s*$")
_CALLED = re.compile(r"(?:condition|body|calls|to_apply)=%([\w.-]+)")
_BRANCHES = re.compile(r"(?:branch_computations|called_computations)=\{([^}]*)\}")
# Attention kernels that state no cost: kernel name -> (matmuls of the size of q.k^T, index of
# the q [B, H, Nq, d] and k [B, H, Nk, d] operands). The flash backward's dkv recomputes q.k^T
# and forms dv, dp and dk, its dq recomputes q.k^T and forms dp and dq; splash's forward forms
# q.k^T and p.v, its fused backward recomputes q.k^T and forms dv, dp, dk and dq.
_ATTENTION_KERNELS = {
    "flash_mha_bwd_dkv": (4, 0),
    "flash_mha_bwd_dq": (3, 0),
    "splash_mha_fwd": (2, 2),
    "splash_mha_dkv": (5, 2),
}
# Not memory traffic of their own: bookkeeping, or control flow whose bodies are counted.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all"}
_FREE |= {"while", "conditional", "call"}


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # the result type, e.g. "bf16[8,128]{1,0}" or a tuple of them
    op: str
    operands: list[str]
    attributes: str
    raw_operands: str = ""  # the text inside the parentheses (a constant's value)
    root: bool = False


@dataclasses.dataclass
class Stats:
    matmul_flops: float = 0.0
    bytes_accessed: float = 0.0
    async_copy_bytes: float = 0.0  # copy-start / copy-done as XLA counts them (see above)
    hbm_bytes: float = 0.0  # the reads and writes of buffers in HBM only, copies included
    collectives: dict = dataclasses.field(default_factory=dict)  # kind -> {count, bytes}
    unknown_trip_counts: int = 0  # loops whose trip count could not be read (counted once)
    by_source: dict = dataclasses.field(default_factory=dict)  # source -> {bytes, flops}


# The model's named scopes (jax.named_scope in cavmae_jax/models and train/steps.py), outermost
# first: a section of the model, then the part of a block.
SECTIONS = ("patch_embed", "masking", "encoder_a", "encoder_v", "joint", "stream_a", "stream_v")
SECTIONS += ("decoder", "momentum", "head", "loss", "optimizer")
PARTS = ("attention", "layernorm", "mlp", "unshuffle", "fsdp_gather")


def source_of(op_name: str, op: str) -> str:
    """``section/part`` of an instruction from its op_name, e.g. ``decoder/mlp`` (the outermost
    section, the innermost part); collectives are their own source (``collective/all-gather``),
    backward passes share their forward's."""
    kind = op.removesuffix("-start")
    if kind in COLLECTIVES:
        return f"collective/{kind}"
    scopes = re.findall(r"[\w-]+", op_name)
    section = next((s for s in scopes if s in SECTIONS), "other")
    part = next((p for p in reversed(scopes) if p in PARTS), "other")
    return f"{section}/{part}"


def _typed(shape: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(dtype, dims, layout) of every array in an HLO type string (tuples flattened)."""
    found = []
    for dtype, dims, layout in _ARRAY.findall(shape):
        if dtype in _BYTES or dtype.startswith("f8"):
            found.append((dtype, tuple(int(d) for d in dims.split(",") if d), layout))
    return found


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every array in an HLO type string (tuples flattened)."""
    return [(dtype, dims) for dtype, dims, _ in _typed(shape)]


def nbytes(shape: str) -> int:
    """The arrays' logical size (what a collective moves)."""
    return sum(_BYTES.get(dtype, 1) * math.prod(dims) for dtype, dims in arrays(shape))


def memory_space(layout: str) -> int:
    """The ``S(n)`` of a layout: 0 is HBM; on TPUs 1 is the on-chip memory (VMEM) that the
    compiler places buffers in or prefetches them to."""
    space = re.search(r"S\((\d+)\)", layout)
    return int(space.group(1)) if space else 0


def stored_bytes(dtype: str, dims: tuple[int, ...], layout: str) -> int:
    """Bytes an array occupies in its layout: a tiled layout (``{1,0:T(8,128)}``) pads the
    minor dimensions, in the order the layout stores them, to whole tiles, and a kernel moves
    whole tiles (a bf16 [.., 512, 64] array takes 128 lanes per row)."""
    size = _BYTES.get(dtype, 1)
    order, _, attributes = layout.partition(":")
    minor_to_major = [int(d) for d in order.split(",") if d]
    tile = re.match(r"T\(([0-9,]+)\)", attributes)
    if not tile or sorted(minor_to_major) != list(range(len(dims))):
        return size * math.prod(dims)
    tile_dims = [int(t) for t in tile.group(1).split(",")]
    stored = [dims[d] for d in reversed(minor_to_major)]  # major to minor
    stored = [1] * (len(tile_dims) - len(stored)) + stored
    for i, t in enumerate(reversed(tile_dims), start=1):
        stored[-i] = -(-stored[-i] // t) * t
    return size * math.prod(stored)


def footprint(shape: str, hbm_only: bool = False) -> int:
    """Stored bytes of every array in an HLO type string; ``hbm_only``: those in HBM only."""
    return sum(
        stored_bytes(dtype, dims, layout)
        for dtype, dims, layout in _typed(shape)
        if not (hbm_only and memory_space(layout))
    )


def parse(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """Computations by name (each a list of instructions) and the entry computation's name."""
    computations: dict[str, list[Instruction]] = {}
    entry = current = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = computations.setdefault(header.group(1), [])
            if line.startswith("ENTRY"):
                entry = header.group(1)
            continue
        match = _INSTRUCTION.match(line) if current is not None else None
        if match:
            root, name, shape, op, operands, attributes = match.groups()
            names = re.findall(r"%([\w.-]+)", operands)
            current.append(Instruction(name, shape, op, names, attributes, operands, bool(root)))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _trip_count(loop: Instruction, computations: dict[str, list[Instruction]]) -> int | None:
    """The compiler's ``known_trip_count``, else ``i < N`` with a constant N in the condition
    (plain or wrapped in a fusion): the loops ``lax.scan`` makes count from 0 by 1."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attributes)
    if known:
        return int(known.group(1))
    name = re.search(r"condition=%([\w.-]+)", loop.attributes)
    condition = computations.get(name.group(1), []) if name else []
    constants = {
        ins.name: int(ins.raw_operands)
        for ins in condition
        if ins.op == "constant" and re.fullmatch(r"-?\d+", ins.raw_operands)
    }
    for ins in condition:
        compare = ins.op == "compare" and "direction=LT" in ins.attributes
        if ins.op == "fusion":
            callee = re.search(r"calls=%([\w.-]+)", ins.attributes)
            inner = computations.get(callee.group(1), []) if callee else []
            compare = any(i.op == "compare" and "direction=LT" in i.attributes for i in inner)
        if compare and len(ins.operands) == 2 and ins.operands[1] in constants:
            return constants[ins.operands[1]]
    return None


def _window_products(size: int, window: int, out: int, stride: int, pad_lo: int, lhs_dilate: int):
    """Multiply-adds along one spatial dimension that meet a real input element (not padding
    nor an inserted dilation hole): the dots XLA writes as convolutions hit mostly holes."""
    span = (size - 1) * lhs_dilate + 1
    total = 0
    for j in range(out):
        for k in range(window):
            at = j * stride + k - pad_lo
            total += 0 <= at < span and at % lhs_dilate == 0
    return total


def _convolution_flops(ins: Instruction, shapes: dict[str, str]) -> float:
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attributes)
    lhs, rhs = (arrays(shapes.get(name, ""))[:1] for name in ins.operands[:2])
    result = arrays(ins.shape)[:1]
    if not (labels and lhs and rhs and result):
        return 0.0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    lhs_dims, rhs_dims, out_dims = lhs[0][1], rhs[0][1], result[0][1]
    window = re.search(r"window=\{([^}]*)\}", ins.attributes)
    fields = dict(f.split("=") for f in window.group(1).split()) if window else {}
    spatial = [c for c in out_labels if c.isdigit()]

    def field(key, i, default):
        values = fields.get(key)
        return int(values.split("x")[i]) if values else default

    products = 2.0 * rhs_dims[rhs_labels.index("i")]
    for i, dim in enumerate(spatial):
        pad_lo = int(fields["pad"].split("x")[i].split("_")[0]) if "pad" in fields else 0
        products *= _window_products(
            lhs_dims[lhs_labels.index(dim)],
            rhs_dims[rhs_labels.index(dim)],
            out_dims[out_labels.index(dim)],
            field("stride", i, 1),
            pad_lo,
            field("lhs_dilate", i, 1),
        )
    others = math.prod(out_dims[out_labels.index(c)] for c in out_labels if not c.isdigit())
    return products * others


def _dot_flops(ins: Instruction, shapes: dict[str, str]) -> float:
    lhs = arrays(shapes.get(ins.operands[0], ""))[:1]
    contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attributes)
    if not (lhs and contracting):
        return 0.0
    size = math.prod(lhs[0][1][int(d)] for d in contracting.group(1).split(",") if d)
    return 2.0 * math.prod(arrays(ins.shape)[0][1]) * size


def _kernel_flops(ins: Instruction, shapes: dict[str, str]) -> float:
    """A Pallas kernel's FLOPs: its own cost estimate, or for the attention kernels that state
    none (``_ATTENTION_KERNELS``) their matmul count times one q.k^T product."""
    estimate = re.search(r'"cost_estimate":\{"flops":"(\d+)"', ins.attributes)
    if estimate:
        return float(estimate.group(1))
    for kernel, (matmuls, at) in _ATTENTION_KERNELS.items():
        if (ins.name.startswith(kernel) or kernel in ins.attributes) and len(ins.operands) > at + 1:
            q = arrays(shapes[ins.operands[at]])[0][1]
            k = arrays(shapes[ins.operands[at + 1]])[0][1]
            return matmuls * 2.0 * math.prod(q) * k[-2]
    return 0.0


def _collective_bytes(ins: Instruction, kind: str, shapes: dict[str, str]) -> int:
    """The full tensor a collective moves: its output, or its input for a reduce-scatter."""
    if kind == "reduce-scatter":
        return sum(nbytes(shapes.get(name, "")) for name in ins.operands)
    if ins.op.endswith("-start") and kind != "all-reduce":  # (inputs, outputs, ...) tuple
        parts = arrays(ins.shape)
        half = parts[len(parts) // 2 :] if len(parts) > 1 else parts
        return sum(_BYTES.get(d, 1) * math.prod(s) for d, s in half)
    return nbytes(ins.shape)


def _parameter_reads(computation: list[Instruction], computations) -> dict[int, int | None]:
    """Bytes a fused computation reads of each parameter when it reads only slices of it
    (``None``: the whole parameter); a parameter updated in place is not read. A parameter
    handed to a nested fusion is read as that fusion reads it."""
    index = {ins.name: int(ins.raw_operands) for ins in computation if ins.op == "parameter"}
    users = collections.defaultdict(list)
    for ins in computation:
        for position, operand in enumerate(ins.operands):
            users[operand].append((ins, position))
    reads: dict[int, int | None] = {}
    for name, i in index.items():
        uses = users.get(name, [])
        parts = [_use_bytes(use, position, computations) for use, position in uses]
        reads[i] = None if not uses or None in parts else sum(parts)
    return reads


def _use_bytes(use: Instruction, position: int, computations) -> int | None:
    """Bytes one use reads of its operand ``position`` (``None``: all of it)."""
    if use.op in ("dynamic-slice", "slice"):
        return footprint(use.shape) if position == 0 else None  # the others are start indices
    if use.op == "dynamic-update-slice" and position == 0:
        return 0
    if use.op == "fusion":
        callee = re.search(r"calls=%([\w.-]+)", use.attributes)
        body = computations.get(callee.group(1), []) if callee else []
        return _parameter_reads(body, computations).get(position) if body else None
    return None


def _written(computation: list[Instruction]) -> list[int] | None:
    """Bytes a fused computation writes to each element of its result when its root, or an
    element of its root tuple, updates a slice in place (a layer loop storing its
    activations): the slice, read and written, not the whole buffer."""
    by_name = {ins.name: ins for ins in computation}
    root = next((ins for ins in computation if ins.root), None)
    if root is None:
        return None
    outputs = [by_name.get(name) for name in root.operands] if root.op == "tuple" else [root]
    written, in_place = [], False
    for out in outputs:
        while out is not None and out.op == "bitcast":
            out = by_name.get(out.operands[0])
        if out is not None and out.op == "dynamic-update-slice":
            written.append(2 * footprint(by_name[out.operands[1]].shape))
            in_place = True
        else:
            written.append(footprint(out.shape) if out is not None else 0)
    return written if in_place else None


def _in_hbm(shape: str) -> bool:
    return not any(memory_space(layout) for _, _, layout in _typed(shape))


def _bytes_moved(
    ins: Instruction, shapes: dict[str, str], computations, hbm_only: bool = False
) -> float:
    """Bytes an unfused instruction reads and writes (slices count as the slice), at the size
    their layouts store; ``hbm_only``: only the reads and writes of buffers in HBM."""

    def counted(shape: str, part: int) -> int:
        return part if not hbm_only or _in_hbm(shape) else 0

    operand_shapes = [shapes.get(name, "") for name in ins.operands]
    if ins.op in ("dynamic-slice", "slice"):
        return counted(operand_shapes[0], footprint(ins.shape)) + footprint(ins.shape, hbm_only)
    if ins.op == "slice-start":  # ((operand), slice, sync flag): it moves the slice
        parts = _typed(ins.shape)[1:2]
        piece = sum(stored_bytes(*p) for p in parts)
        return counted(operand_shapes[0], piece) + sum(
            stored_bytes(*p) for p in parts if not (hbm_only and memory_space(p[2]))
        )
    if re.search(r'custom_call_target="(AllocateBuffer|ConcatBitcast)"', ins.attributes):
        return 0  # reserves memory / joins adjacent buffers: moves none
    stated = re.search(r'"cost_estimate":\{[^}]*"bytes_accessed":"(\d+)"', ins.attributes)
    if stated:  # a Pallas kernel's own count, which XLA's cost analysis takes too
        return int(stated.group(1))
    if ins.op == "dynamic-update-slice":
        update = footprint(operand_shapes[1])
        return counted(operand_shapes[1], update) + counted(ins.shape, update)
    if ins.op in ("copy-start", "copy-done"):
        # An asynchronous copy (see the module docstring): in HBM terms, the start reads its
        # source and the done writes its destination.
        if not hbm_only:
            return 0
        return footprint(ins.shape if ins.op == "copy-done" else operand_shapes[0], True)
    if ins.op.endswith("-done"):
        return 0
    callee = re.search(r"calls=%([\w.-]+)", ins.attributes) if ins.op == "fusion" else None
    body = computations.get(callee.group(1), []) if callee else []
    reads = _parameter_reads(body, computations) if body else {}
    total = 0
    for i, shape in enumerate(operand_shapes):
        part = reads.get(i)
        total += counted(shape, footprint(shape) if part is None else part)
    written = _written(body) if body else None
    results = _typed(ins.shape)
    if written is None or len(written) != len(results):
        return total + footprint(ins.shape, hbm_only)
    return total + sum(
        part
        for part, (_, _, layout) in zip(written, results, strict=True)
        if not (hbm_only and memory_space(layout))
    )


def _xla_copy_bytes(ins: Instruction, shapes: dict[str, str]) -> int:
    """What XLA's ``bytes accessed`` charges an asynchronous copy: operands and result."""
    return sum(footprint(shapes.get(name, "")) for name in ins.operands) + footprint(ins.shape)


def _charge(stats: Stats, source: str, key: str, value: float) -> None:
    if value:
        entry = stats.by_source.setdefault(source, {"bytes": 0.0, "flops": 0.0})
        entry[key] += value


def analyze(text: str) -> Stats:
    """Per-device FLOPs, bytes and collectives of the optimized HLO module ``text``."""
    computations, entry = parse(text)
    stats = Stats()
    counts: dict[str, float] = collections.Counter()
    fused: set[str] = set()
    order = [entry]
    counts[entry] = 1.0
    seen = {entry}
    while order:  # breadth-first: a computation's callers are weighed before it
        name = order.pop(0)
        for ins in computations.get(name, []):
            called = _CALLED.findall(ins.attributes)
            for group in _BRANCHES.findall(ins.attributes):
                called += re.findall(r"%([\w.-]+)", group)
            times = 1.0
            if ins.op == "while":
                trips = _trip_count(ins, computations)
                stats.unknown_trip_counts += trips is None
                times = float(trips or 1)
            for callee in called:
                counts[callee] += counts[name] * times
                if ins.op == "fusion" or "to_apply" in ins.attributes:
                    fused.add(callee)
                if callee not in seen:
                    seen.add(callee)
                    order.append(callee)
    collectives: dict[str, dict[str, float]] = {}
    for name, instructions in computations.items():
        times = counts.get(name, 0.0)
        if not times:
            continue
        shapes = {ins.name: ins.shape for ins in instructions}
        sources: dict[str, str] = {}
        for ins in instructions:
            op_name = re.search(r'op_name="([^"]*)"', ins.attributes)
            source = source_of(op_name.group(1) if op_name else "", ins.op)
            if source == "other/other":  # no metadata (a kernel, a slice): its inputs' source
                source = next((sources[o] for o in ins.operands if o in sources), source)
            sources[ins.name] = source
            flops = 0.0
            if ins.op == "convolution":
                flops = times * _convolution_flops(ins, shapes)
            elif ins.op == "dot":
                flops = times * _dot_flops(ins, shapes)
            elif ins.op == "custom-call":
                flops = times * _kernel_flops(ins, shapes)
            stats.matmul_flops += flops
            _charge(stats, source, "flops", flops)
            kind = ins.op.removesuffix("-start")
            if kind in COLLECTIVES:
                entry_stats = collectives.setdefault(kind, {"count": 0.0, "bytes": 0.0})
                entry_stats["count"] += times
                entry_stats["bytes"] += times * _collective_bytes(ins, kind, shapes)
            if name in fused or ins.op in _FREE:
                continue
            if ins.op in ("copy-start", "copy-done"):
                stats.async_copy_bytes += times * _xla_copy_bytes(ins, shapes)
            moved = times * _bytes_moved(ins, shapes, computations)
            stats.bytes_accessed += moved
            stats.hbm_bytes += times * _bytes_moved(ins, shapes, computations, hbm_only=True)
            _charge(stats, source, "bytes", moved)
    stats.collectives = {
        k: {"count": int(v["count"]), "bytes": v["bytes"]} for k, v in collectives.items()
    }
    return stats

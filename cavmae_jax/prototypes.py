"""Prototype discovery on a memory bank of clip embeddings (PCAV-MAE, docs/pcavmae.md).

Two ways to find prototypes, both deterministic given a seed:
  * density peaks (the paper's reading of xDNN): a clip is a prototype when its kernel density
    is the highest among its ``neighbours`` nearest clips; each prototype is a real clip, and a
    larger neighbourhood gives fewer, coarser prototypes (granularity);
  * k-means (Prototypical Contrastive Learning): k-means++ seeding and Lloyd iterations, one
    clustering per granularity ``k``.
Every clip is then assigned to its nearest prototype, and each prototype gets the concentration
gamma of eq. (2).

The bank (``Bank``) is split by rows over the mesh's devices and built from each host's own
rows, so that no host and no device holds all of it (AS-2M: 1.77 M clips x 768 x 3 arrays).
A pass that compares every clip with every other runs each device's rows against the row
blocks of all devices, passed round a ring, ``chunk`` rows of queries and of the block at a
time: memory per device grows with its share of the bank and chunk x chunk, never N x N.
Only vectors of one number per clip (densities, labels) are ever whole on a device.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cavmae_jax.errors import UserError
from cavmae_jax.losses import l2_normalize

CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class Bank:
    """Memory-bank rows split over ``mesh`` (None: one device): ``audio``, ``visual`` [R, D]
    and ``position`` [R], each row's clip in the split's order (-1: a padding row, all zeros).
    Rows are laid out host after host, so a row's index is not its clip's position."""

    audio: jax.Array
    visual: jax.Array
    position: jax.Array
    clips: int  # real rows
    mesh: Mesh | None = None


def bank_from_rows(audio, visual, position, mesh: Mesh | None = None) -> Bank:
    """The bank of every host's own rows (NumPy [n_host, D], any count per host, with their
    clips' ``position`` in the split): each host pads its rows to the same count, a multiple
    of its devices, and the rows stay on the devices of the host that embedded them."""
    audio, visual = np.asarray(audio, np.float32), np.asarray(visual, np.float32)
    position = np.asarray(position, np.int32)
    if mesh is None:
        return Bank(jnp.asarray(audio), jnp.asarray(visual), jnp.asarray(position), len(position))
    local_devices = mesh.size // jax.process_count()
    counts = multihost_utils.process_allgather(np.int32(len(position)))
    rows = -(-int(np.max(counts)) // local_devices) * local_devices
    extra = rows - len(position)
    sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))

    def placed(local: np.ndarray, fill) -> jax.Array:
        local = np.pad(local, ((0, extra),) + ((0, 0),) * (local.ndim - 1), constant_values=fill)
        shape = (rows * jax.process_count(), *local.shape[1:])
        return jax.make_array_from_process_local_data(sharding, local, shape)

    return Bank(
        placed(audio, 0.0), placed(visual, 0.0), placed(position, -1), int(np.sum(counts)), mesh
    )


def _row_map(fn, mesh: Mesh | None, rows: tuple, whole: tuple = ()):
    """``fn(*rows, *whole, ring=...)`` on every device: the ``rows`` arguments split by rows
    over ``mesh`` (outputs too), the ``whole`` ones on every device. ``ring`` passes a block
    on to the next device (``_over_blocks``)."""
    return _row_program(fn, mesh, len(rows), len(whole))(*rows, *whole)


@functools.cache
def _row_program(fn, mesh: Mesh | None, rows: int, whole: int):
    """The jitted program of ``_row_map`` for ``rows`` row-split and ``whole`` arguments, made
    once per process (each memory-bank refresh reuses it)."""
    if mesh is None or mesh.size == 1:
        return jax.jit(functools.partial(fn, ring=None))
    split, axes = PartitionSpec(mesh.axis_names), mesh.axis_names
    mapped = jax.shard_map(
        functools.partial(fn, ring=Ring(axes, mesh.size)),
        mesh=mesh,
        in_specs=(*[split] * rows, *[PartitionSpec()] * whole),
        out_specs=split,
        check_vma=False,  # the loops start from constants and read the local rows
    )
    return jax.jit(mapped)


@dataclasses.dataclass(frozen=True)
class Ring:
    axes: tuple[str, ...]
    size: int

    def index(self) -> jax.Array:
        return jax.lax.axis_index(self.axes)

    def next(self, block):
        pairs = [(i, (i + 1) % self.size) for i in range(self.size)]
        return jax.lax.ppermute(block, self.axes, pairs)


def _over_blocks(fold, init, block, ring: Ring | None):
    """``fold(carry, block, first)`` over the row block of every device (``first``: the bank
    index of the block's first row), starting with this device's own."""
    if ring is None:
        return fold(init, block, 0)
    rows = jax.tree.leaves(block)[0].shape[0]

    def visit(carry, step):
        acc, current = carry
        acc = fold(acc, current, ((ring.index() - step) % ring.size) * rows)
        return (acc, ring.next(current)), None

    return jax.lax.scan(visit, (init, block), jnp.arange(ring.size))[0][0]


def _over_chunks(fn, carry, rows, valid, first, chunk: int):
    """Fold ``fn(carry, rows_chunk, valid_chunk, index_chunk)`` over chunks of a block
    (``index``: bank indices; zero rows padded, marked invalid)."""
    n = rows.shape[0]
    chunk = min(chunk, n)
    extra = (-n) % chunk
    rows = jnp.pad(rows, ((0, extra), (0, 0))).reshape(-1, chunk, rows.shape[1])
    valid = jnp.pad(valid, (0, extra)).reshape(-1, chunk)
    index = (first + jnp.arange(n + extra, dtype=jnp.int32)).reshape(-1, chunk)
    return jax.lax.scan(lambda c, xs: (fn(c, *xs), None), carry, (rows, valid, index))[0]


def _per_query_chunk(fn, queries, carry, chunk: int):
    """``fn(query_chunk, carry_chunk)`` over row chunks of ``queries`` and of a per-query
    ``carry``, results concatenated."""
    n = queries.shape[0]
    chunk = min(chunk, n)
    extra = (-n) % chunk

    def blocks(x):
        return jnp.pad(x, ((0, extra),) + ((0, 0),) * (x.ndim - 1)).reshape(-1, chunk, *x.shape[1:])

    out = jax.lax.map(lambda xs: fn(*xs), (blocks(queries), jax.tree.map(blocks, carry)))
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[:n], out)


def _sq_dists(queries: jax.Array, rows: jax.Array) -> jax.Array:
    """Squared Euclidean distances [Q, R] (clamped at 0 against rounding)."""
    q2 = jnp.sum(queries**2, axis=1, keepdims=True)
    r2 = jnp.sum(rows**2, axis=1)
    return jnp.maximum(q2 - 2 * queries @ rows.T + r2, 0.0)


def _all_pairs(step, init, rows, valid, chunk: int, ring):
    """Every row against every valid bank row: ``step(carry, queries, rows, valid, index)``
    folded over the blocks and chunks, with a per-query carry from ``init``."""

    def fold(carry, block, first):
        def per_query(queries, acc):
            def add(acc, chunk_rows, chunk_valid, index):
                return step(acc, queries, chunk_rows, chunk_valid, index)

            return _over_chunks(add, acc, *block, first, chunk)

        return _per_query_chunk(per_query, rows, carry, chunk)

    return _over_blocks(fold, init, (rows, valid), ring)


@functools.cache
def _density_pass(chunk: int):
    def density(rows, valid, bandwidth, ring):
        def add(total, queries, bank_rows, bank_valid, index):
            weights = jnp.exp(-_sq_dists(queries, bank_rows) / (2 * bandwidth**2))
            return total + jnp.sum(jnp.where(bank_valid, weights, 0.0), axis=1)

        return _all_pairs(add, jnp.zeros(rows.shape[0]), rows, valid, chunk, ring)

    return density


def kernel_density(joint, valid, bandwidth: float, chunk: int = CHUNK, mesh=None) -> jax.Array:
    """Gaussian kernel density of each row [R] over the valid rows of the bank."""
    return _row_map(_density_pass(chunk), mesh, (joint, valid), (jnp.float32(bandwidth),))


@functools.cache
def _nearest_pass(neighbours: int, chunk: int):
    def nearest(rows, valid, ring):
        def merge(carry, queries, bank_rows, bank_valid, index):
            best_d, best_i = carry
            d = jnp.where(bank_valid, _sq_dists(queries, bank_rows), jnp.inf)
            all_d = jnp.concatenate([best_d, d], axis=1)
            all_i = jnp.concatenate([best_i, jnp.broadcast_to(index, d.shape)], axis=1)
            top = jax.lax.top_k(-all_d, neighbours)[1]
            return jnp.take_along_axis(all_d, top, 1), jnp.take_along_axis(all_i, top, 1)

        q = rows.shape[0]
        init = (jnp.full((q, neighbours), jnp.inf), jnp.zeros((q, neighbours), jnp.int32))
        return _all_pairs(merge, init, rows, valid, chunk, ring)[1]

    return nearest


def nearest_neighbours(joint, valid, neighbours: int, chunk: int = CHUNK, mesh=None):
    """Bank indices [R, neighbours] of each row's nearest valid rows (itself included)."""
    return _row_map(_nearest_pass(neighbours, chunk), mesh, (joint, valid))


def bank_programs(clips: int, dim: int, neighbours: int, mesh: Mesh, chunk: int = CHUNK):
    """The two all-pairs passes of density-peak discovery on a bank of ``clips`` rows of
    ``dim``, lowered for ``mesh`` without data (ahead-of-time checks): {name: Lowered}."""
    rows = -(-clips // mesh.size) * mesh.size
    split = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    joint = jax.ShapeDtypeStruct((rows, dim), jnp.float32, sharding=split)
    valid = jax.ShapeDtypeStruct((rows,), jnp.bool_, sharding=split)
    bandwidth = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    nearest = _row_program(_nearest_pass(neighbours, chunk), mesh, 2, 0)
    density = _row_program(_density_pass(chunk), mesh, 2, 1)
    return {
        "nearest neighbours": nearest.lower(joint, valid),
        "kernel density": density.lower(joint, valid, bandwidth),
    }


def _distance(rows, targets, ring):
    def fold(found, block, first):
        inside = (targets >= first) & (targets < first + block.shape[0])
        other = block[jnp.clip(targets - first, 0, block.shape[0] - 1)]
        return jnp.where(inside, jnp.sqrt(jnp.sum((rows - other) ** 2, axis=1)), found)

    return _over_blocks(fold, jnp.zeros(rows.shape[0]), rows, ring)


def distance_to(joint, targets, mesh=None) -> jax.Array:
    """Euclidean distance [R] from each row to the bank row ``targets`` [R] names."""
    return _row_map(_distance, mesh, (joint, targets))


@functools.cache
def _assign_pass(chunk: int):
    def nearest(rows, centres, ring):
        def per_query(queries, _):
            return jnp.argmin(_sq_dists(queries, centres), axis=1).astype(jnp.int32)

        return _per_query_chunk(per_query, rows, jnp.zeros(rows.shape[0]), chunk)

    return nearest


def assign(joint, centres, chunk: int = CHUNK, mesh=None) -> jax.Array:
    """Index [R] of each row's nearest centre (Euclidean)."""
    return _row_map(_assign_pass(chunk), mesh, (joint,), (centres,))


def _nearest_row(rows, valid, queries, ring):
    d = jnp.where(valid[None], _sq_dists(queries, rows), jnp.inf)
    first = 0 if ring is None else ring.index() * rows.shape[0]
    best = jnp.argmin(d, axis=1)
    return jnp.take_along_axis(d, best[:, None], 1)[:, 0][None], (first + best)[None]


def nearest_rows(queries, joint, valid, mesh=None) -> np.ndarray:
    """Bank index of the valid row nearest each of a few ``queries`` [K, D] (on the host)."""
    distances, indices = _row_map(_nearest_row, mesh, (joint, valid), (queries,))
    distances, indices = (_host(x) for x in (distances, indices))
    pick = np.argmin(distances, axis=0)  # ties: the lowest index, as one device would
    return indices[pick, np.arange(len(queries))]


def _host(x: jax.Array) -> np.ndarray:
    """A (small) array, whole, on every host."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


@jax.jit
def _peak_flags(density, near, valid):
    """Whether each row is a density peak (the densest of its neighbourhood; ties: the lower
    index wins, so exactly one of two equal neighbours is a peak) and its density rank."""
    density = jnp.where(valid, density, -jnp.inf)
    order = jnp.argsort(-density, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    return valid & jnp.all(rank[:, None] <= rank[near], axis=1), rank


@jax.jit
def _valid_median(values, valid):
    return jnp.nanmedian(jnp.where(valid, values, jnp.nan))


def density_peaks(
    joint, valid, neighbours: int, bandwidth: float | None = None, chunk: int = CHUNK, mesh=None
) -> np.ndarray:
    """Bank indices of the density peaks (sorted by decreasing density).

    ``bandwidth`` defaults to the median distance to the ``neighbours``-th neighbour: the kernel
    then sees about one neighbourhood, whatever the scale of the embeddings."""
    near = nearest_neighbours(joint, valid, neighbours, chunk, mesh)
    if bandwidth is None:
        far = distance_to(joint, near[:, -1], mesh)
        bandwidth = max(float(_host(_valid_median(far, valid))), 1e-6)
    density = kernel_density(joint, valid, bandwidth, chunk, mesh)
    is_peak, rank = (_host(x) for x in _peak_flags(density, near, valid))
    peaks = np.nonzero(is_peak)[0]
    return peaks[np.argsort(rank[peaks])]


@jax.jit
def _row_of_clip(joint, position, clip):
    return joint[jnp.argmax(position == clip)][None]


@functools.partial(jax.jit, static_argnames="clips")
def _draw(key, closest, position, clips: int):
    """k-means++: a clip drawn with probability ~ its squared distance to the centres."""
    weights = jnp.log(closest + 1e-12)
    by_clip = jnp.zeros(clips).at[jnp.where(position >= 0, position, clips)]
    return jax.random.categorical(key, by_clip.set(weights, mode="drop"))


@jax.jit
def _sq_dists_to(rows, centre):
    return _sq_dists(rows, centre[None])[:, 0]


def kmeans(bank: Bank, joint, k: int, iterations: int = 20, seed: int = 0, chunk=CHUNK):
    """Centres [k, D] of the valid rows of ``joint`` by k-means++ seeding and Lloyd iterations
    (deterministic given ``seed``; the draws are made over the clips in the split's order, so
    they do not depend on how the rows are laid out)."""
    valid = bank.position >= 0
    key = jax.random.key(seed)

    def row(index):
        return _host(_row_of_clip(joint, bank.position, index))[0]

    first = jax.random.randint(jax.random.fold_in(key, 0), (), 0, bank.clips)
    centres = [row(first)]
    closest = _sq_dists_to(joint, centres[0])
    for i in range(1, k):
        centres.append(row(_draw(jax.random.fold_in(key, i), closest, bank.position, bank.clips)))
        closest = jnp.minimum(closest, _sq_dists_to(joint, centres[-1]))
    centres = jnp.stack(centres)
    for _ in range(iterations):
        labels = jnp.where(valid, assign(joint, centres, chunk, bank.mesh), k)
        sums = _host(jax.ops.segment_sum(joint, labels, num_segments=k))
        counts = _host(jax.ops.segment_sum(valid.astype(jnp.float32), labels, num_segments=k))
        centres = jnp.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centres)
    return centres


@jax.jit
def concentration(
    audio: jax.Array,
    visual: jax.Array,
    proto_audio: jax.Array,
    proto_visual: jax.Array,
    labels: jax.Array,
    beta: float = 10.0,
) -> jax.Array:
    """Eq. (2): gamma_k = (mean_i ||p_k - z_v,i|| + mean_j ||p_k - z_a,j||) / log(I + J + beta)
    over the I = J = n_k clips of prototype k (each modality against the prototype clip's own
    embedding of that modality; a row labelled K or more counts for none). A prototype with at
    most one member gets the largest gamma of the others (PCL's rule: no sharper than any real
    cluster). [K]"""
    k = proto_audio.shape[0]
    dist_a = jnp.linalg.norm(audio - proto_audio[labels], axis=1)
    dist_v = jnp.linalg.norm(visual - proto_visual[labels], axis=1)
    n = jax.ops.segment_sum(jnp.ones(labels.shape[0]), labels, num_segments=k)
    mean_a = jax.ops.segment_sum(dist_a, labels, num_segments=k) / jnp.maximum(n, 1)
    mean_v = jax.ops.segment_sum(dist_v, labels, num_segments=k) / jnp.maximum(n, 1)
    gamma = (mean_a + mean_v) / jnp.log(2 * n + beta)
    largest = jnp.max(jnp.where(n > 1, gamma, 0.0))
    return jnp.where(n > 1, gamma, largest)


def whole_bank(audio, visual) -> Bank:
    """A bank held whole on one device, in the given order (analysis and tests)."""
    return bank_from_rows(audio, visual, np.arange(len(audio)))


@jax.jit
def _joint(audio, visual):
    return l2_normalize(audio + visual)


def discover(
    bank: Bank,
    method: str,
    granularities,
    max_prototypes: int,
    beta: float = 10.0,
    gamma_mean: float = 0.1,
    seed: int = 0,
    chunk: int = CHUNK,
) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Prototypes of a memory bank at every granularity, padded to ``max_prototypes``.

    The bank's audio and visual rows are unit momentum embeddings; clips are clustered on their
    joint embedding unit(a + v). ``method`` "density": granularity = neighbourhood size,
    prototypes are the density-peak clips (their audio and visual embeddings; the densest
    ``max_prototypes`` kept); "kmeans": granularity = k, prototypes are the members' mean
    embeddings. Each clip goes to its nearest prototype; gamma follows eq. (2), then
    (``gamma_mean`` > 0) is rescaled to that mean, as PCL does.
    Returns the arrays {audio, visual [G, K, D], gamma, valid [G, K]} (on every host) and per
    granularity ``{"clips", "labels", "sizes", "found"}``: the position in the split of each
    prototype's clip (the clip nearest the centre for k-means), each clip's prototype in the
    split's order, the prototype sizes and how many prototypes were found before the cap.
    """
    mesh, audio, visual = bank.mesh, bank.audio, bank.visual
    valid = bank.position >= 0
    joint = _joint(audio, visual)  # padding rows stay 0
    positions = _host(bank.position)
    k_max = max_prototypes
    out = {name: [] for name in ("audio", "visual", "gamma", "valid")}
    levels = []
    for granularity in granularities:
        if method == "density":
            peaks = density_peaks(joint, valid, int(granularity), chunk=chunk, mesh=mesh)
            found, rows = len(peaks), peaks[:k_max]
            proto_a, proto_v = (_host(x[jnp.asarray(rows)]) for x in (audio, visual))
            labels = assign(joint, l2_normalize(proto_a + proto_v), chunk, mesh)
        elif method == "kmeans":
            k = found = int(granularity)
            if k > k_max:
                raise UserError(
                    f"pcav.granularities: k-means with k = {k} above pcav.max_prototypes = "
                    f"{k_max}; raise max_prototypes or lower k"
                )
            labels = assign(joint, kmeans(bank, joint, k, seed=seed, chunk=chunk), chunk, mesh)
            labels = jnp.where(valid, labels, k)
            sums = (jax.ops.segment_sum(x, labels, num_segments=k) for x in (audio, visual))
            proto_a, proto_v = (l2_normalize(_host(x)) for x in sums)
            rows = nearest_rows(l2_normalize(proto_a + proto_v), joint, valid, mesh)
        else:
            raise ValueError(f"unknown prototype method {method!r}; expected density or kmeans")
        k = proto_a.shape[0]
        labels = jnp.where(valid, labels, k)
        gamma = _host(concentration(audio, visual, proto_a, proto_v, labels, beta))
        if gamma_mean:
            gamma = gamma_mean * gamma / np.mean(gamma)
        pad = ((0, k_max - k), (0, 0))
        out["audio"].append(np.pad(np.asarray(proto_a), pad))
        out["visual"].append(np.pad(np.asarray(proto_v), pad))
        out["gamma"].append(np.pad(np.asarray(gamma), (0, k_max - k), constant_values=1.0))
        out["valid"].append(np.arange(k_max) < k)
        labels, real = _host(labels), positions >= 0
        by_clip = np.zeros(bank.clips, np.int64)
        by_clip[positions[real]] = labels[real]
        sizes = np.bincount(by_clip, minlength=k)
        levels.append({"clips": positions[rows], "labels": by_clip, "sizes": sizes, "found": found})
    return {name: np.stack(values) for name, values in out.items()}, levels


SCALES = ("paper", "pcl")


def gamma_mean(pcav) -> float:
    """The mean the concentrations are rescaled to: tau under PCL's scaling (``pcav.scale =
    "pcl"``: the gammas are the temperature), none under the paper's (eq. (2) as it is, and the
    loss divided by tau instead)."""
    if pcav.scale not in SCALES:
        raise UserError(f"pcav.scale {pcav.scale!r}: expected one of {list(SCALES)}")
    return pcav.tau if pcav.scale == "pcl" else 0.0


def from_settings(bank: Bank, pcav, seed: int):
    """The prototype arrays and levels of a memory bank under a run's ``config.pcav``
    settings. Density peaks beyond ``max_prototypes`` are dropped (the least dense): said in
    the log, since the prototype count moves what is learnt most (docs/pcavmae.md)."""
    granularities = tuple(pcav.granularities)
    arrays, levels = discover(
        bank, pcav.method, granularities, pcav.max_prototypes, pcav.beta, gamma_mean(pcav), seed
    )
    for granularity, level in zip(granularities, levels, strict=True):
        kept = len(level["sizes"])
        if level["found"] > kept and jax.process_index() == 0:
            print(
                f"prototypes: neighbourhood {granularity} found {level['found']} density peaks; "
                f"the {kept} densest are kept (pcav.max_prototypes)"
            )
    return arrays, levels

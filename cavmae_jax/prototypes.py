"""Prototype discovery on a memory bank of clip embeddings (PCAV-MAE, docs/pcavmae.md).

Two ways to find prototypes, both deterministic given a seed:
  * density peaks (the paper's reading of xDNN): a clip is a prototype when its kernel density
    is the highest among its ``neighbours`` nearest clips; each prototype is a real clip, and a
    larger neighbourhood gives fewer, coarser prototypes (granularity);
  * k-means (Prototypical Contrastive Learning): k-means++ seeding and Lloyd iterations, one
    clustering per granularity ``k``.
Every clip is then assigned to its nearest prototype, and each prototype gets the concentration
gamma of eq. (2). All distance work is chunked (``chunk`` rows of queries and of the bank at a
time): memory grows with chunk x chunk, never N x N, so AS-2M-size banks fit; with a mesh the
query rows of every pass are split over its devices (``over_mesh``; the bank is replicated).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cavmae_jax.errors import UserError
from cavmae_jax.losses import l2_normalize

CHUNK = 4096


def _pad_rows(x: jax.Array, multiple: int) -> jax.Array:
    extra = (-x.shape[0]) % multiple
    return jnp.pad(x, ((0, extra), (0, 0))) if extra else x


def _over_bank_chunks(fn, init, bank: jax.Array, chunk: int):
    """Fold ``fn(carry, bank_chunk, valid)`` over row chunks of ``bank`` (zero rows padded,
    ``valid`` marks the real ones)."""
    n = bank.shape[0]
    chunk = min(chunk, n)
    padded = _pad_rows(bank, chunk).reshape(-1, chunk, bank.shape[1])
    valid = (jnp.arange(padded.shape[0] * chunk) < n).reshape(-1, chunk)
    return jax.lax.scan(lambda c, xs: (fn(c, *xs), None), init, (padded, valid))[0]


def _per_query_chunk(fn, queries: jax.Array, chunk: int):
    """``fn(query_chunk)`` over row chunks of ``queries``, results concatenated: with the
    inner bank chunks, one pass holds a chunk x chunk block of distances at a time."""
    n = queries.shape[0]
    chunk = min(chunk, n)
    blocks = _pad_rows(queries, chunk).reshape(-1, chunk, queries.shape[1])
    out = jax.lax.map(fn, blocks)
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[:n], out)


def over_mesh(fn, queries: jax.Array, *args, mesh=None):
    """``fn(queries, *args)`` with the query rows split over every device of ``mesh`` (the
    other arguments replicated): each device runs its own chunked pass. No mesh: one device."""
    if mesh is None or mesh.size == 1:
        return fn(queries, *args)
    from jax.sharding import PartitionSpec

    rows = PartitionSpec(mesh.axis_names)
    n = queries.shape[0]
    padded = _pad_rows(jnp.asarray(queries), mesh.size)
    # check_vma off: the chunk loops start from replicated constants and read the local rows
    sharded = jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(rows, *[PartitionSpec()] * len(args)),
        out_specs=rows,
        check_vma=False,
    )
    out = jax.jit(sharded)(padded, *args)
    if jax.process_count() > 1:  # every host needs every row
        from jax.experimental import multihost_utils

        out = multihost_utils.process_allgather(out, tiled=True)
    return jax.tree.map(lambda x: jnp.asarray(x)[:n], out)


def _sq_dists(queries: jax.Array, rows: jax.Array) -> jax.Array:
    """Squared Euclidean distances [Q, R] (clamped at 0 against rounding)."""
    q2 = jnp.sum(queries**2, axis=1, keepdims=True)
    r2 = jnp.sum(rows**2, axis=1)
    return jnp.maximum(q2 - 2 * queries @ rows.T + r2, 0.0)


@functools.partial(jax.jit, static_argnames=("chunk",))
def kernel_density(queries: jax.Array, bank: jax.Array, bandwidth: float, chunk: int = CHUNK):
    """Gaussian kernel density of each query [Q] over the bank [N, D]."""

    def density(block):
        def add(total, rows, valid):
            weights = jnp.exp(-_sq_dists(block, rows) / (2 * bandwidth**2))
            return total + jnp.sum(jnp.where(valid, weights, 0.0), axis=1)

        return _over_bank_chunks(add, jnp.zeros(block.shape[0]), bank, chunk)

    return _per_query_chunk(density, queries, chunk)


@functools.partial(jax.jit, static_argnames=("neighbours", "chunk"))
def nearest_neighbours(queries: jax.Array, bank: jax.Array, neighbours: int, chunk: int = CHUNK):
    """Indices [Q, neighbours] of each query's nearest bank rows (itself included)."""

    def nearest(block):
        q = block.shape[0]
        init = (jnp.full((q, neighbours), jnp.inf), jnp.zeros((q, neighbours), jnp.int32), 0)

        def merge(carry, rows, valid):
            best_d, best_i, offset = carry
            d = jnp.where(valid, _sq_dists(block, rows), jnp.inf)
            index = offset + jnp.arange(rows.shape[0], dtype=jnp.int32)
            all_d = jnp.concatenate([best_d, d], axis=1)
            all_i = jnp.concatenate([best_i, jnp.broadcast_to(index, d.shape)], axis=1)
            top = jax.lax.top_k(-all_d, neighbours)[1]
            return (
                jnp.take_along_axis(all_d, top, 1),
                jnp.take_along_axis(all_i, top, 1),
                offset + rows.shape[0],
            )

        return _over_bank_chunks(merge, init, bank, chunk)[1]

    return _per_query_chunk(nearest, queries, chunk)


@functools.partial(jax.jit, static_argnames=("chunk",))
def assign(queries: jax.Array, centres: jax.Array, chunk: int = CHUNK) -> jax.Array:
    """Index [Q] of each query's nearest centre (Euclidean)."""

    def nearest(block):
        return jnp.argmin(_sq_dists(block, centres), axis=1).astype(jnp.int32)

    return _per_query_chunk(nearest, queries, chunk)


def density_peaks(
    bank, neighbours: int, bandwidth: float | None = None, chunk: int = CHUNK, mesh=None
):
    """Bank indices of the density peaks (sorted by decreasing density).

    ``bandwidth`` defaults to the median distance to the ``neighbours``-th neighbour: the kernel
    then sees about one neighbourhood, whatever the scale of the embeddings."""
    bank = jnp.asarray(bank, jnp.float32)
    near = over_mesh(
        lambda q, b: nearest_neighbours(q, b, neighbours, chunk), bank, bank, mesh=mesh
    )
    if bandwidth is None:
        far = jnp.sqrt(jnp.sum((bank - bank[near[:, -1]]) ** 2, axis=1))
        bandwidth = float(jnp.maximum(jnp.median(far), 1e-6))
    density = over_mesh(lambda q, b: kernel_density(q, b, bandwidth, chunk), bank, bank, mesh=mesh)
    # ties: the lower index wins, so exactly one of two equal neighbours is a peak
    order = jnp.argsort(-density, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    is_peak = jnp.all(rank[:, None] <= rank[near], axis=1)
    peaks = np.nonzero(np.asarray(is_peak))[0]
    return peaks[np.argsort(np.asarray(rank)[peaks])]


def kmeans(bank, k: int, iterations: int = 20, seed: int = 0, chunk: int = CHUNK, mesh=None):
    """Centres [k, D] by k-means++ seeding and Lloyd iterations (deterministic given ``seed``)."""
    bank = jnp.asarray(bank, jnp.float32)
    key = jax.random.key(seed)
    first = jax.random.randint(jax.random.fold_in(key, 0), (), 0, bank.shape[0])
    centres = [bank[first]]
    closest = _sq_dists(bank, centres[0][None])[:, 0]
    for i in range(1, k):
        pick = jax.random.categorical(jax.random.fold_in(key, i), jnp.log(closest + 1e-12))
        centres.append(bank[pick])
        closest = jnp.minimum(closest, _sq_dists(bank, bank[pick][None])[:, 0])
    centres = jnp.stack(centres)
    for _ in range(iterations):
        labels = over_mesh(lambda q, c: assign(q, c, chunk), bank, centres, mesh=mesh)
        sums = jax.ops.segment_sum(bank, labels, num_segments=k)
        counts = jax.ops.segment_sum(jnp.ones(bank.shape[0]), labels, num_segments=k)
        centres = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centres)
    return centres


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
    embedding of that modality). A prototype with at most one member gets the largest gamma
    of the others (PCL's rule: no sharper than any real cluster). [K]"""
    k = proto_audio.shape[0]
    dist_a = jnp.linalg.norm(audio - proto_audio[labels], axis=1)
    dist_v = jnp.linalg.norm(visual - proto_visual[labels], axis=1)
    n = jax.ops.segment_sum(jnp.ones(labels.shape[0]), labels, num_segments=k)
    mean_a = jax.ops.segment_sum(dist_a, labels, num_segments=k) / jnp.maximum(n, 1)
    mean_v = jax.ops.segment_sum(dist_v, labels, num_segments=k) / jnp.maximum(n, 1)
    gamma = (mean_a + mean_v) / jnp.log(2 * n + beta)
    largest = jnp.max(jnp.where(n > 1, gamma, 0.0))
    return jnp.where(n > 1, gamma, largest)


def discover(
    audio,
    visual,
    method: str,
    granularities,
    max_prototypes: int,
    beta: float = 10.0,
    gamma_mean: float = 0.1,
    seed: int = 0,
    chunk: int = CHUNK,
    mesh=None,
) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Prototypes of a memory bank at every granularity, padded to ``max_prototypes``.

    audio, visual: [N, D] unit momentum embeddings; clips are clustered on their joint
    embedding unit(a + v). ``method`` "density": granularity = neighbourhood size, prototypes are
    the density-peak clips (their audio and visual embeddings; the densest ``max_prototypes``
    kept); "kmeans": granularity = k, prototypes are the members' mean embeddings. Each clip goes
    to its nearest prototype; gamma follows eq. (2), then (``gamma_mean`` > 0) is rescaled to that
    mean, as PCL does. With ``mesh`` every pass over the bank is split over its devices.
    Returns the arrays {audio, visual [G, K, D], gamma, valid [G, K]} and per
    granularity ``{"clips", "labels", "sizes"}``: the bank index of each prototype's clip (the
    clip nearest the centre for k-means), each clip's prototype and the prototype sizes.
    """
    audio = jnp.asarray(audio, jnp.float32)
    visual = jnp.asarray(visual, jnp.float32)
    joint = l2_normalize(audio + visual)
    k_max = max_prototypes

    def nearest(queries, centres):
        return over_mesh(lambda q, c: assign(q, c, chunk), queries, centres, mesh=mesh)

    out = {name: [] for name in ("audio", "visual", "gamma", "valid")}
    levels = []
    for granularity in granularities:
        if method == "density":
            clips = density_peaks(joint, int(granularity), chunk=chunk, mesh=mesh)[:k_max]
            proto_a, proto_v = audio[clips], visual[clips]
            labels = nearest(joint, l2_normalize(proto_a + proto_v))
        elif method == "kmeans":
            k = min(int(granularity), k_max)
            labels = nearest(joint, kmeans(joint, k, seed=seed, chunk=chunk, mesh=mesh))
            sums_a = jax.ops.segment_sum(audio, labels, num_segments=k)
            sums_v = jax.ops.segment_sum(visual, labels, num_segments=k)
            proto_a, proto_v = l2_normalize(sums_a), l2_normalize(sums_v)
            clips = nearest_neighbours(l2_normalize(proto_a + proto_v), joint, 1, chunk)[:, 0]
        else:
            raise ValueError(f"unknown prototype method {method!r}; expected density or kmeans")
        k = proto_a.shape[0]
        gamma = concentration(audio, visual, proto_a, proto_v, labels, beta)
        if gamma_mean:
            gamma = gamma_mean * gamma / jnp.mean(gamma)
        pad = ((0, k_max - k), (0, 0))
        out["audio"].append(np.pad(np.asarray(proto_a), pad))
        out["visual"].append(np.pad(np.asarray(proto_v), pad))
        out["gamma"].append(np.pad(np.asarray(gamma), (0, k_max - k), constant_values=1.0))
        out["valid"].append(np.arange(k_max) < k)
        sizes = np.bincount(np.asarray(labels), minlength=k)
        levels.append({"clips": np.asarray(clips), "labels": np.asarray(labels), "sizes": sizes})
    return {name: np.stack(values) for name, values in out.items()}, levels


SCALES = ("paper", "pcl")


def gamma_mean(pcav) -> float:
    """The mean the concentrations are rescaled to: tau under PCL's scaling (``pcav.scale =
    "pcl"``: the gammas are the temperature), none under the paper's (eq. (2) as it is, and the
    loss divided by tau instead)."""
    if pcav.scale not in SCALES:
        raise UserError(f"pcav.scale {pcav.scale!r}: expected one of {list(SCALES)}")
    return pcav.tau if pcav.scale == "pcl" else 0.0


def from_settings(bank: dict, pcav, seed: int, mesh=None):
    """The prototype arrays and levels of a memory bank ``{"audio", "visual"}`` under a run's
    ``config.pcav`` settings."""
    return discover(
        bank["audio"],
        bank["visual"],
        pcav.method,
        tuple(pcav.granularities),
        pcav.max_prototypes,
        pcav.beta,
        gamma_mean(pcav),
        seed,
        mesh=mesh,
    )

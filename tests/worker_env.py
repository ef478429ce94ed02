"""The environment of the subprocess test workers on fake CPU devices, and joining a
multi-process run from it (shared by the workers and the tests that start them)."""

from __future__ import annotations

import os

import jax


def join_from_env() -> None:
    """``jax.distributed.initialize`` when ``CAVMAE_COORDINATOR``, ``CAVMAE_PROCESSES`` and
    ``CAVMAE_PROCESS_ID`` are set; otherwise nothing (a single-process run)."""
    if "CAVMAE_COORDINATOR" in os.environ:
        jax.distributed.initialize(
            coordinator_address=os.environ["CAVMAE_COORDINATOR"],
            num_processes=int(os.environ["CAVMAE_PROCESSES"]),
            process_id=int(os.environ["CAVMAE_PROCESS_ID"]),
            initialization_timeout=60,
        )


def fake_devices_env(devices: int, **extra: str) -> dict[str, str]:
    """This environment with ``devices`` fake CPU devices, plus ``extra``. Without the shared
    compilation cache: an 8-device executable loaded from it once stalled in a CPU all-reduce
    (XLA's rendezvous timed out), and each worker compiles its configurations once anyway.
    The suite's XLA_FLAGS (conftest.py) are kept: a sharded run and its one-device reference
    compile alike."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return dict(env, XLA_FLAGS=flags, **extra)

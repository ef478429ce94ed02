"""Joining a multi-process test run from the environment (shared by the subprocess workers)."""

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

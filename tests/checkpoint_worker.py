"""One of two processes that save checkpoints of steps 2 and 4 together, then restore the
newest readable one with a fault on process 1 only; prints the step and value it resumed.

Executed by test_checkpoint.py: ``python tests/checkpoint_worker.py FOLDER FAULT`` with the
``CAVMAE_*`` variables of ``worker_env.join_from_env``. FAULT: ``unreadable`` (process 1's
read of step 4 fails with a data error) or ``stale`` (process 1's listing lacks step 4).
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from worker_env import join_from_env

from cavmae_jax.train.checkpoint import Checkpointer


def state_of(step: int, sharding) -> dict:
    """A [4, 3] array split by rows over the two processes, every entry ``step``."""
    whole = np.full((4, 3), step, np.float32)
    return {"w": jax.make_array_from_callback(whole.shape, sharding, lambda index: whole[index])}


def main(folder: str, fault: str) -> None:
    join_from_env()
    sharding = NamedSharding(Mesh(jax.devices(), ("data",)), PartitionSpec("data"))
    checkpointer = Checkpointer(folder, asynchronous=False)
    for step in (2, 4):
        checkpointer.save(step, state_of(step, sharding), {"step": step})
    if jax.process_index() == 1:
        if fault == "unreadable":
            read = checkpointer.handlers["state"].restore

            def failing(directory, *args, **kwargs):
                if directory.parent.name == "4":
                    raise OSError(f"DATA_LOSS: Error reading {directory}/d/0")
                return read(directory, *args, **kwargs)

            checkpointer.handlers["state"].restore = failing
        else:
            checkpointer.manager.all_steps = lambda: [2]
    step, state = checkpointer.restore_newest_readable(state_of(0, sharding))
    local = [float(np.asarray(shard.data).mean()) for shard in state["w"].addressable_shards]
    checkpointer.close()
    print(json.dumps({"process": jax.process_index(), "step": step, "values": local}))


if __name__ == "__main__":
    main(*sys.argv[1:])

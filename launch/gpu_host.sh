#!/usr/bin/env bash
# One GPU host (1-8 GPUs), all of them in one mesh.
#   bash launch/gpu_host.sh configs/pretrain.py:as-scale++ runs/scale++ --config.data.dir=/data/as2m
# Installs the CUDA build of JAX into the project's .venv on first use. `cavmae train` runs the
# trainer the config names. The global batch of the config is split over the GPUs, and the
# parameters and optimizer state with it (the recipes' FSDP; --config.sharding=dp keeps a
# whole copy on every GPU); a run restarted with the same workdir resumes by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?config file[:variant]}; workdir=${2:?workdir}; shift 2
make install
.venv/bin/python -c "import jax; assert jax.default_backend() == 'gpu'" 2>/dev/null \
  || .venv/bin/python -m pip install -q "jax[cuda12]==$(.venv/bin/python -c 'import jax; print(jax.__version__)')"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec .venv/bin/cavmae train --config "$config" --workdir "$workdir" "$@"

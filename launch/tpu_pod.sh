#!/usr/bin/env bash
# A Cloud TPU VM slice (e.g. v5e-32): the same command on every worker; JAX finds its peers by
# itself (--distributed). The workdir must be visible to every worker (a GCS FUSE mount or NFS).
#   bash launch/tpu_pod.sh my-tpu us-central2-b configs/pretrain.py:as-scale++ /mnt/gcs/runs/pp \
#       --config.data.dir=/mnt/gcs/data/as2m --config.mesh.fsdp=4
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; config=${3:?config}; workdir=${4:?shared workdir}; shift 4
command=pretrain
[[ $config == *finetune* ]] && command=finetune
repo=${REPO:?set REPO to the git URL of your cavmae-jax checkout}
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e
  [ -d cavmae-jax ] || git clone $repo cavmae-jax
  cd cavmae-jax && make install
  .venv/bin/python -m pip install -q 'jax[tpu]==\$(.venv/bin/python -c \"import jax; print(jax.__version__)\")'
  .venv/bin/cavmae $command --distributed --config $config --workdir $workdir $*
"

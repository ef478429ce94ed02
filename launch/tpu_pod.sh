#!/usr/bin/env bash
# A Cloud TPU VM slice (e.g. v5e-16): the same command on every worker, JAX finds its peers by
# itself (--distributed). Data, init files, workdir and checkpoints can all be in Cloud Storage.
# Check the recipe against the slice first, from any machine (docs/tpu.md):
#   python launch/aot_check.py configs/pretrain.py:as-scale++ --topology v5e-16
# then:
#   REPO=https://github.com/you/cavmae-jax REV=main bash launch/tpu_pod.sh my-tpu us-central2-b \
#       configs/pretrain.py:as-scale++ gs://my-bucket/runs/scale++ \
#       --config.data.dir=gs://my-bucket/data/as2m --config.init=gs://my-bucket/ckpt/ori_mae_11.pth
# Every worker checks out REV (a branch, tag or commit; an existing checkout is moved to it),
# installs the runtime with libtpu (no test tools, no torch) into its .venv and runs
# `cavmae train`: the trainer is the one the config names. Rerun the same command to resume.
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; config=${3:?config file[:variant]}; workdir=${4:?workdir}
shift 4
repo=${REPO:?set REPO to the git URL of your cavmae-jax repository}
rev=${REV:-main}
config_q=$(printf %q "$config"); workdir_q=$(printf %q "$workdir"); rest_q=""
[ $# -eq 0 ] || rest_q=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
set -euo pipefail
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else \"cavmae-jax needs Python >= 3.11; this worker has \" + sys.version.split()[0])'
[ -d cavmae-jax/.git ] || git clone -q $(printf %q "$repo") cavmae-jax
cd cavmae-jax
git fetch -q origin $(printf %q "$rev") && git checkout -q --detach FETCH_HEAD
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q '.[data,tpu]'
.venv/bin/cavmae train --distributed --config $config_q --workdir $workdir_q$rest_q
"

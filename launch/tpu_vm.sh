#!/usr/bin/env bash
# Runs `python -m llm_jax.train` on every worker of a Cloud TPU VM slice, through
# `gcloud compute tpus tpu-vm ssh --worker=all`. JAX finds the slice's other
# workers itself; nothing multi-host is passed. See launch/README.md.
set -euo pipefail

PROG=launch/tpu_vm.sh
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh --tpu=NAME --zone=ZONE [--project=ID] [--repo-dir=DIR]
         [--setup [--repo-url=URL] [--ref=REF]] [--python=PY] [--env=NAME=VALUE]...
         [--detach [--log=FILE]] [--gcloud-arg=ARG]... [--dry-run]
         -- --config=configs/X.py --workdir=gs://BUCKET/RUN [--config.a.b=v ...]

Starts the same llm_jax.train command on every worker of a TPU VM slice:
  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all \
    --command="cd DIR && exec PY -m llm_jax.train ..."
Everything after `--` goes to llm_jax.train unchanged (quoted for the remote
shell). --config and --workdir are required there; the workdir must be seen by
every worker (a gs:// bucket, or a filesystem all workers mount). Rerunning the
same command resumes from the latest checkpoint in the workdir.

Options (environment variable in brackets):
  --tpu=NAME          TPU VM name                                  [TPU_NAME]
  --zone=ZONE         its zone, e.g. us-east5-a                    [ZONE]
  --project=ID        Google Cloud project (default: gcloud's)     [PROJECT]
  --repo-dir=DIR      llm_jax checkout on the workers              [REPO_DIR]
                      (default ~/llm_jax; ~/ is the remote home)
  --setup             first, on every worker: clone DIR if absent, check out
                      REF, and `PY -m pip install -c constraints.txt -e '.[tpu]'`
  --repo-url=URL      git URL to clone when DIR is absent          [REPO_URL]
  --ref=REF           branch, tag or commit to check out (default: the
                      remote's default branch); pin a commit so every worker
                      runs the same code                           [REPO_REF]
  --python=PY         Python 3.11+ on the workers (default python3), e.g.
                      '~/venv/bin/python'                          [LLM_JAX_PYTHON]
  --env=NAME=VALUE    set for the trainer on every worker (repeatable)
  --detach            start in the background (nohup) and return; output is
                      appended to --log on each worker
  --log=FILE          log file with --detach (default ~/llm_jax_train.log)
  --gcloud-arg=ARG    extra argument for gcloud, e.g. --gcloud-arg=--internal-ip
                      (repeatable)
  --dry-run           print the commands instead of running them   [DRY_RUN=1]
  -h, --help          this text
EOF
}

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
REPO_DIR=${REPO_DIR:-'~/llm_jax'}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-}
PY=${LLM_JAX_PYTHON:-python3}
# shellcheck disable=SC2088  # expanded by the remote shell
LOG='~/llm_jax_train.log'
SETUP=0
DETACH=0
# Tells llm_jax to join the job with jax.distributed.initialize() (JAX finds
# the workers itself on TPU VMs and GKE).
ENV_VARS=(LLM_JAX_DISTRIBUTED=1)
GCLOUD_ARGS=()
TRAIN_ARGS=()

while (($#)); do
  if [[ $1 == --*=* ]]; then
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --tpu | --tpu-name) need_value "$@"; TPU_NAME=$2; shift ;;
    --zone) need_value "$@"; ZONE=$2; shift ;;
    --project) need_value "$@"; PROJECT=$2; shift ;;
    --repo-dir) need_value "$@"; REPO_DIR=$2; shift ;;
    --repo-url) need_value "$@"; REPO_URL=$2; shift ;;
    --ref) need_value "$@"; REPO_REF=$2; shift ;;
    --python) need_value "$@"; PY=$2; shift ;;
    --env) need_value "$@"; check_env_assignment "$2"; ENV_VARS+=("$2"); shift ;;
    --log) need_value "$@"; LOG=$2; shift ;;
    --gcloud-arg) need_value "$@"; GCLOUD_ARGS+=("$2"); shift ;;
    --setup) SETUP=1 ;;
    --detach) DETACH=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (llm_jax.train flags go after --; see $PROG --help)" ;;
  esac
  shift
done

[[ -n $TPU_NAME ]] || die "no TPU name: pass --tpu=NAME or set TPU_NAME"
[[ -n $ZONE ]] || die "no zone: pass --zone=ZONE or set ZONE"
[[ -n $REPO_DIR ]] || die "empty --repo-dir"
[[ -n $PY ]] || die "empty --python"
has_flag config ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} \
  || die "no --config for llm_jax.train: add e.g. '-- --config=configs/base.py --workdir=gs://BUCKET/RUN'"
has_flag workdir ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} \
  || die "no --workdir for llm_jax.train: every worker must see it, e.g. '--workdir=gs://BUCKET/RUN' after --"
require_tool gcloud "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"

gcloud_ssh=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE")
if [[ -n $PROJECT ]]; then gcloud_ssh+=(--project="$PROJECT"); fi
gcloud_ssh+=(--worker=all ${GCLOUD_ARGS[@]+"${GCLOUD_ARGS[@]}"})

quote_path "$REPO_DIR"; dir_q=$REPLY
quote_path "$PY"; py_q=$REPLY  # ~/venv/bin/python works

if ((SETUP)); then
  if [[ -n $REPO_URL ]]; then
    quote "$REPO_URL"
    get="{ [ -d $dir_q/.git ] || git clone --quiet $REPLY $dir_q; }"
  else
    get="{ [ -d $dir_q/.git ] || { echo \"no git checkout at $dir_q: pass --repo-url\" >&2; exit 1; }; }"
  fi
  quote "${REPO_REF:-HEAD}"
  setup="$get && cd $dir_q && git fetch --quiet origin $REPLY"
  setup+=" && git checkout --quiet --detach FETCH_HEAD"
  setup+=" && $py_q -m pip install --quiet -c constraints.txt -e '.[tpu]'"
  run "${gcloud_ssh[@]}" --command="$setup"
fi

train=''
if ((${#ENV_VARS[@]})); then join_quoted env "${ENV_VARS[@]}"; train="$REPLY "; fi
join_quoted -m llm_jax.train ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
train+="$py_q $REPLY"
remote="cd $dir_q && "
if ((DETACH)); then
  remote+="nohup $train >> "
  quote_path "$LOG"
  remote+="$REPLY 2>&1 < /dev/null &"
else
  remote+="exec $train"
fi
run "${gcloud_ssh[@]}" --command="$remote"

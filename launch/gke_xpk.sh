#!/usr/bin/env bash
# Submits `python -m llm_jax.train` as an xpk workload on a GKE cluster with TPU
# slices: one container per TPU VM host, all running the same command. JAX finds
# the other hosts (and slices) from the environment GKE gives each container.
# See launch/README.md.
set -euo pipefail

PROG=launch/gke_xpk.sh
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/gke_xpk.sh --cluster=NAME --workload=NAME --tpu-type=v5p-N --docker-image=IMAGE
         [--num-slices=N] [--project=ID] [--zone=ZONE] [--app-dir=DIR] [--python=PY]
         [--env=NAME=VALUE]... [--max-restarts=N] [--priority=P] [--xpk-arg=ARG]...
         [--dry-run] -- --config=configs/X.py --workdir=gs://BUCKET/RUN [--config.a.b=v ...]

Runs, through xpk (pip install xpk):
  xpk workload create --cluster=NAME --workload=NAME --tpu-type=TYPE \
    --num-slices=N --docker-image=IMAGE --command="cd DIR && exec PY -m llm_jax.train ..."
Everything after `--` goes to llm_jax.train unchanged (quoted for the
container's shell). --config and --workdir are required there, and the workdir
must be a gs:// path (or storage mounted in every pod).

The image must already hold the code: the llm_jax checkout at --app-dir
(default /app) with `pip install -c constraints.txt -e '.[tpu]'` done, and PY
on PATH. launch/Dockerfile builds such an image; push it to Artifact Registry.

Options (environment variable in brackets):
  --cluster=NAME       GKE cluster made by `xpk cluster create`     [CLUSTER]
  --workload=NAME      workload name: lowercase letters, digits and -,
                       at most 40 characters, unique in the cluster [WORKLOAD]
  --tpu-type=TYPE      slice type, e.g. v5p-128                      [TPU_TYPE]
  --docker-image=IMAGE e.g. us-docker.pkg.dev/PROJECT/REPO/llm_jax:TAG [DOCKER_IMAGE]
  --num-slices=N       slices, joined over the data-center network (default 1)
                                                                     [NUM_SLICES]
  --project=ID         Google Cloud project (default: gcloud's)     [PROJECT]
  --zone=ZONE          the cluster's zone (default: gcloud's)       [ZONE]
  --app-dir=DIR        checkout inside the image (default /app)     [APP_DIR]
  --python=PY          Python in the image (default python)         [LLM_JAX_PYTHON]
  --env=NAME=VALUE     set for the trainer in every container (repeatable)
  --max-restarts=N     JobSet restarts after a failure or preemption; each
                       restart reruns the command and resumes from the workdir
  --priority=P         very-low, low, medium, high or very-high
  --xpk-arg=ARG        extra argument for `xpk workload create` (repeatable),
                       e.g. --xpk-arg=--termination-grace-period-seconds=300
  --dry-run            print the command instead of running it      [DRY_RUN=1]
  -h, --help           this text
EOF
}

CLUSTER=${CLUSTER:-}
WORKLOAD=${WORKLOAD:-}
TPU_TYPE=${TPU_TYPE:-}
DOCKER_IMAGE=${DOCKER_IMAGE:-}
NUM_SLICES=${NUM_SLICES:-1}
PROJECT=${PROJECT:-}
ZONE=${ZONE:-}
APP_DIR=${APP_DIR:-/app}
PY=${LLM_JAX_PYTHON:-python}
MAX_RESTARTS=''
PRIORITY=''
# Tells llm_jax to join the job with jax.distributed.initialize() (JAX finds
# the workers itself on TPU VMs and GKE).
ENV_VARS=(LLM_JAX_DISTRIBUTED=1)
XPK_ARGS=()
TRAIN_ARGS=()

while (($#)); do
  if [[ $1 == --*=* ]]; then
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --cluster) need_value "$@"; CLUSTER=$2; shift ;;
    --workload) need_value "$@"; WORKLOAD=$2; shift ;;
    --tpu-type) need_value "$@"; TPU_TYPE=$2; shift ;;
    --docker-image) need_value "$@"; DOCKER_IMAGE=$2; shift ;;
    --num-slices) need_value "$@"; NUM_SLICES=$2; shift ;;
    --project) need_value "$@"; PROJECT=$2; shift ;;
    --zone) need_value "$@"; ZONE=$2; shift ;;
    --app-dir) need_value "$@"; APP_DIR=$2; shift ;;
    --python) need_value "$@"; PY=$2; shift ;;
    --env) need_value "$@"; check_env_assignment "$2"; ENV_VARS+=("$2"); shift ;;
    --max-restarts) need_value "$@"; MAX_RESTARTS=$2; shift ;;
    --priority) need_value "$@"; PRIORITY=$2; shift ;;
    --xpk-arg) need_value "$@"; XPK_ARGS+=("$2"); shift ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (llm_jax.train flags go after --; see $PROG --help)" ;;
  esac
  shift
done

[[ -n $CLUSTER ]] || die "no cluster: pass --cluster=NAME or set CLUSTER"
[[ -n $WORKLOAD ]] || die "no workload name: pass --workload=NAME or set WORKLOAD"
[[ ${#WORKLOAD} -le 40 && $WORKLOAD =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "bad workload name '$WORKLOAD': lowercase letters, digits and -, starting with a letter, at most 40 characters"
[[ -n $TPU_TYPE ]] || die "no TPU type: pass --tpu-type=v5p-N or set TPU_TYPE"
[[ -n $DOCKER_IMAGE ]] || die "no image: pass --docker-image=IMAGE (built with launch/Dockerfile) or set DOCKER_IMAGE"
[[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "--num-slices wants a positive integer, got '$NUM_SLICES'"
[[ -z $MAX_RESTARTS || $MAX_RESTARTS =~ ^[0-9]+$ ]] \
  || die "--max-restarts wants a non-negative integer, got '$MAX_RESTARTS'"
[[ -n $PY ]] || die "empty --python"
has_flag config ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} \
  || die "no --config for llm_jax.train: add e.g. '-- --config=configs/base.py --workdir=gs://BUCKET/RUN'"
has_flag workdir ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} \
  || die "no --workdir for llm_jax.train: every pod must see it, e.g. '--workdir=gs://BUCKET/RUN' after --"
require_tool xpk "install it with 'pip install xpk' (https://github.com/AI-Hypercomputer/xpk)"

# The command each container runs. xpk pastes it, as one line, into a YAML
# block and runs it in a subshell that it sends SIGTERM on preemption or
# deletion; `exec` makes the trainer that process, so the signal reaches it and
# it saves a checkpoint before the pod goes.
train=()
if ((${#ENV_VARS[@]})); then train+=(env "${ENV_VARS[@]}"); fi
train+=("$PY" -m llm_jax.train ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
join_quoted "${train[@]}"
train_q=$REPLY
quote "$APP_DIR"
command="cd $REPLY && exec $train_q"
[[ $command != *$'\n'* ]] || die "arguments must not contain newlines (xpk puts the command in YAML)"

xpk=(xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD"
  --tpu-type="$TPU_TYPE" --num-slices="$NUM_SLICES" --docker-image="$DOCKER_IMAGE")
if [[ -n $PROJECT ]]; then xpk+=(--project="$PROJECT"); fi
if [[ -n $ZONE ]]; then xpk+=(--zone="$ZONE"); fi
if [[ -n $MAX_RESTARTS ]]; then xpk+=(--max-restarts="$MAX_RESTARTS"); fi
if [[ -n $PRIORITY ]]; then xpk+=(--priority="$PRIORITY"); fi
xpk+=(${XPK_ARGS[@]+"${XPK_ARGS[@]}"} --command="$command")
run "${xpk[@]}"

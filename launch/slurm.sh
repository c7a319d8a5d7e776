#!/usr/bin/env bash
# Starts `python -m llm_jax.train` on Slurm, one process per node: submits
# launch/slurm.sbatch with sbatch, or, inside an allocation (salloc), runs it
# there with srun. JAX finds the other processes from Slurm's variables.
# See launch/README.md.
set -euo pipefail

PROG=launch/slurm.sh
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/slurm.sh [--nodes=N] [--gpus-per-node=G] [--partition=P] [--account=A]
         [--time=T] [--job-name=NAME] [--sbatch-arg=ARG]... [--env=NAME=VALUE]...
         [--python=PY] [--no-requeue] [--submit | --srun] [--dry-run]
         -- --config=configs/X.py [--workdir=DIR] [--config.a.b=v ...]

Outside an allocation it submits (defaults in launch/slurm.sbatch: 2 nodes,
8 GPUs each, whole nodes):
  sbatch --chdir=REPO --ntasks-per-node=1 [options] launch/slurm.sbatch -- ARGS...
and the job runs `srun ... python -m llm_jax.train ARGS...` on every node.
Inside an allocation (SLURM_JOB_ID set, e.g. under salloc) it runs that srun
line directly on the allocation's nodes.

Everything after `--` goes to llm_jax.train unchanged; relative paths there are
relative to the repository root. The repository, the Python environment and
the workdir must be on filesystems every node mounts. The job inherits your
environment: activate the virtual environment before running this.

Options:
  --nodes=N            nodes (one process each)
  --gpus-per-node=G    GPUs per node (the process uses all of them)
  --partition=P, --account=A, --time=T (e.g. 24:00:00), --job-name=NAME
                       passed to sbatch (Slurm's SBATCH_* variables work too)
  --sbatch-arg=ARG     any other sbatch option (repeatable), e.g.
                       --sbatch-arg=--dependency=afterany:12345
  --env=NAME=VALUE     set for the trainer on every node (repeatable)
  --python=PY          Python to run (default python)    [LLM_JAX_PYTHON]
  --no-requeue         don't requeue the job when the trainer stops on the
                       SIGTERM Slurm sends 300 s before the time limit
  --submit             submit with sbatch even inside an allocation
  --srun               run in the current allocation (default when SLURM_JOB_ID is set)
  --dry-run            print the command instead of running it   [DRY_RUN=1]
  -h, --help           this text
EOF
}

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCH_DIR")
MODE=''
PY=''
REQUEUE=1
ENV_VARS=()
SBATCH_ARGS=()
TRAIN_ARGS=()

while (($#)); do
  if [[ $1 == --*=* ]]; then
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --nodes)
      need_value "$@"
      [[ $2 =~ ^[1-9][0-9]*$ ]] || die "--nodes wants a positive integer, got '$2'"
      SBATCH_ARGS+=(--nodes="$2"); shift ;;
    --gpus-per-node)
      need_value "$@"
      [[ $2 =~ ^[0-9]+$ ]] || die "--gpus-per-node wants an integer, got '$2'"
      SBATCH_ARGS+=(--gpus-per-node="$2"); shift ;;
    --partition | --account | --time | --job-name)
      need_value "$@"; SBATCH_ARGS+=("$1=$2"); shift ;;
    --sbatch-arg) need_value "$@"; SBATCH_ARGS+=("$2"); shift ;;
    --env) need_value "$@"; check_env_assignment "$2"; ENV_VARS+=("$2"); shift ;;
    --python) need_value "$@"; [[ -n $2 ]] || die "empty --python"; PY=$2; shift ;;
    --no-requeue) REQUEUE=0 ;;
    --submit) MODE=submit ;;
    --srun) MODE=srun ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (llm_jax.train flags go after --; see $PROG --help)" ;;
  esac
  shift
done

if [[ -z $MODE ]]; then
  if [[ -n ${SLURM_JOB_ID:-} ]]; then MODE=srun; else MODE=submit; fi
fi
has_flag config ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} \
  || die "no --config for llm_jax.train: add e.g. '-- --config=configs/base.py --workdir=/shared/runs/base'"

# The batch script's own settings, through the environment it inherits.
settings=()
if [[ -n $PY ]]; then settings+=(LLM_JAX_PYTHON="$PY"); fi

if [[ $MODE == srun ]]; then
  [[ -n ${SLURM_JOB_ID:-} ]] \
    || die "--srun needs an allocation (salloc first), or submit without --srun"
  ((${#SBATCH_ARGS[@]} == 0)) \
    || die "--nodes/--gpus-per-node/--partition/... apply when submitting; inside an allocation its nodes are used (pass --submit to submit a new job)"
  require_tool srun "run this on a Slurm cluster"
  cd "$REPO_ROOT"
  export DRY_RUN=${DRY_RUN:-0}
  # An interactive allocation cannot be requeued.
  exec env ${settings[@]+"${settings[@]}"} LLM_JAX_REQUEUE=0 \
    bash "$LAUNCH_DIR/slurm.sbatch" ${ENV_VARS[@]+"${ENV_VARS[@]}"} -- "${TRAIN_ARGS[@]}"
fi

require_tool sbatch "run this on a Slurm login node"
if ((!REQUEUE)); then settings+=(LLM_JAX_REQUEUE=0); fi
cmd=()
if ((${#settings[@]})); then cmd+=(env "${settings[@]}"); fi
cmd+=(sbatch --chdir="$REPO_ROOT" --ntasks-per-node=1 ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}
  "$LAUNCH_DIR/slurm.sbatch" ${ENV_VARS[@]+"${ENV_VARS[@]}"} -- "${TRAIN_ARGS[@]}")
run "${cmd[@]}"

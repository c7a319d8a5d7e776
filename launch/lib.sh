# shellcheck shell=bash
# Shared helpers for the launch scripts (sourced, never run). Shell only.
#
# Conventions every script follows:
#   - options before `--`, llm_jax.train flags after it, passed on untouched;
#   - `--opt=value` and `--opt value` both work;
#   - --dry-run (or DRY_RUN=1) prints each command, quoted so that it can be
#     pasted back into a shell, instead of running it;
#   - bad or missing settings: one line `error: ...` on stderr, exit status 2.

# The name the user typed, for messages.
PROG=${PROG:-$(basename "$0")}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

# need_value "$@": the option in $1 must be followed by a value.
need_value() {
  (($# > 1)) || die "$1 needs a value (see $PROG --help)"
}

# quote WORD: sets REPLY to WORD quoted for a POSIX shell, readably: plain
# words stay bare, `--opt=` and `NAME=` stay bare, and the rest is single-quoted
# (or double-quoted when it holds a ' but nothing a double quote expands).
quote() {
  local word=$1 prefix=''
  if [[ $word =~ ^(--[A-Za-z0-9_.-]+|[A-Za-z_][A-Za-z0-9_]*)= ]]; then
    prefix=${BASH_REMATCH[0]}
    word=${word#"$prefix"}
  fi
  if [[ -n $word && $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    REPLY=$prefix$word
  elif [[ $word != *\'* ]]; then
    REPLY="$prefix'$word'"
  elif [[ $word != *[\"\$\`\\!]* ]]; then
    REPLY="$prefix\"$word\""
  else
    REPLY="$prefix'${word//\'/\'\\\'\'}'"
  fi
}

# quote_path PATH: like quote, but a leading ~/ stays unquoted so that the
# remote shell expands it to the home directory.
# shellcheck disable=SC2088  # the ~ is for the remote shell, on purpose
quote_path() {
  if [[ $1 == '~' ]]; then
    REPLY='~'
  elif [[ $1 == '~/'* ]]; then
    quote "${1#'~/'}"
    REPLY="~/$REPLY"
  else
    quote "$1"
  fi
}

# join_quoted WORD...: sets REPLY to the words quoted and joined by spaces.
join_quoted() {
  local out='' word
  for word in "$@"; do
    quote "$word"
    out+="${out:+ }$REPLY"
  done
  REPLY=$out
}

dry_run() {
  [[ -n ${DRY_RUN:-} && ${DRY_RUN} != 0 ]]
}

# run CMD ARG...: runs the command, or under dry run prints it (one line).
run() {
  if dry_run; then
    join_quoted "$@"
    printf '%s\n' "$REPLY"
  else
    "$@"
  fi
}

# require_tool NAME HINT: outside dry run, NAME must be on PATH.
require_tool() {
  dry_run || command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH: $2"
}

# has_flag NAME ARG...: true if --NAME=... or --NAME is among the args.
has_flag() {
  local name=$1 arg
  shift
  for arg in "$@"; do
    [[ $arg == "--$name" || $arg == "--$name="* ]] && return 0
  done
  return 1
}

# check_env_assignment K=V: a valid NAME=VALUE for env(1).
check_env_assignment() {
  [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] \
    || die "--env wants NAME=VALUE, got '$1'"
}

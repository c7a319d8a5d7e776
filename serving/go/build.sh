#!/usr/bin/env bash
# Builds the Go runtime of llm_jax against the TensorFlow C API that the
# `tensorflow` Python wheel ships (no Go module downloads, no separate
# libtensorflow):
#   serving/go/build.sh [PYTHON]          go vet, then bin/llmjax-generate, bin/llmjax-server
#   serving/go/build.sh --test [PYTHON]   go vet, then the unit tests (go test ./...)
# PYTHON (default: python3) is the interpreter whose tensorflow and
# tensorflow-text wheels are used. The paths are baked in (rpath for the
# libraries, a default for the tensorflow-text SentencePiece op library), so
# the binaries run as they are.
set -euo pipefail
cd "$(dirname "$0")"
MODE=build
if [[ "${1:-}" == --test ]]; then MODE=test; shift; fi
PY="${1:-${PYTHON:-python3}}"
read -r TF_LIB TF_INC SP_LIB < <("$PY" - 2>/dev/null <<'PYEOF'
import os
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
import tensorflow as tf
import tensorflow_text
sp = os.path.join(os.path.dirname(tensorflow_text.__file__), 'python', 'ops',
                  '_sentencepiece_tokenizer.so')
print(tf.sysconfig.get_lib(), tf.sysconfig.get_include(), sp)
PYEOF
)
export CGO_ENABLED=1
export CGO_CFLAGS="-I${TF_INC}"
export CGO_LDFLAGS="-L${TF_LIB} -l:libtensorflow_cc.so.2 -l:libtensorflow_framework.so.2 -Wl,-rpath,${TF_LIB}"
export GOFLAGS=-mod=mod GOPROXY=off GO111MODULE=on
export GOCACHE="${GOCACHE:-$(pwd)/.gocache}"
go vet ./...
if [[ $MODE == test ]]; then
  go test -count=1 ./...
  exit
fi
LDFLAGS="-X main.defaultSentencepieceLib=${SP_LIB}"
for cmd in cmd/*/; do
  go build -ldflags "$LDFLAGS" -o "bin/$(basename "$cmd")" "./$cmd"
done
echo "built $(ls -d "$(pwd)"/bin/* | tr '\n' ' ')"

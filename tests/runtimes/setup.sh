#!/usr/bin/env bash
# The runtime environment of the runtime suite (tests/runtimes, docs/runtimes.md), built
# from nothing under DIR (default build/runtimes):
#   DIR/dist/llama_cpp_python-0.3.36.tar.gz   the llama-cpp-python sdist (pip download)
#   DIR/llama_cpp_python-0.3.36/              unpacked: vendor/llama.cpp holds llama.cpp's
#                                             convert_hf_to_gguf.py, gguf-py and models/
#   DIR/venv/                                 torch, transformers 4.57.6 and the converter's
#                                             pins, gguf-py, and the llama_cpp binding
#                                             compiled from the same sdist (minutes)
#   DIR/ready.json                            the stamp: paths and versions
# Each step checks its result first and is skipped when it is there, so a rerun after an
# interruption resumes where it stopped. Usage: tests/runtimes/setup.sh [DIR]
# Environment: PYTHON (the interpreter the venv is made from, default python3), TORCH (the
# torch requirement, installed first as in the Makefile, default torch==2.13.0),
# CMAKE_BUILD_PARALLEL_LEVEL (compile jobs, default: the number of CPUs).
set -euo pipefail

VERSION=0.3.36
TRANSFORMERS=4.57.6
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
DIR=${1:-build/runtimes}

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
NAME=llama_cpp_python-$VERSION
TARBALL=$DIR/dist/$NAME.tar.gz
SRC=$DIR/$NAME
LLAMA=$SRC/vendor/llama.cpp
PY=$DIR/venv/bin/python
PIP=("$PY" -m pip install --disable-pip-version-check -q)

step() { echo "setup.sh: $*" >&2; }

if [ ! -f "$TARBALL" ]; then
  step "downloading the llama-cpp-python $VERSION sdist"
  "$PYTHON" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
    "llama-cpp-python==$VERSION" -d "$DIR/dist"
fi

if [ ! -f "$LLAMA/convert_hf_to_gguf.py" ]; then
  step "unpacking $TARBALL"
  rm -rf "$DIR/unpack.tmp"
  mkdir "$DIR/unpack.tmp"
  tar -xzf "$TARBALL" -C "$DIR/unpack.tmp"
  rm -rf "$SRC"
  mv "$DIR/unpack.tmp/$NAME" "$SRC"
  rmdir "$DIR/unpack.tmp"
fi

if [ ! -x "$PY" ]; then
  step "creating $DIR/venv"
  "$PYTHON" -m venv "$DIR/venv"
fi

# llama.cpp's converter pins numpy, sentencepiece and protobuf (its requirements files);
# transformers 4.57.6 is the last 4.x release, the one that shows 4.x reads the outputs.
if ! "$PY" - "$TRANSFORMERS" "$TORCH" <<'EOF' 2>/dev/null; then
import sys
import gguf, google.protobuf, numpy, sentencepiece, torch, transformers
assert transformers.__version__ == sys.argv[1], transformers.__version__
assert sys.argv[2].endswith("==" + torch.__version__.split("+")[0]), torch.__version__
EOF
  step "installing torch, transformers $TRANSFORMERS, the converter's pins and gguf-py"
  "${PIP[@]}" "$TORCH"
  "${PIP[@]}" "transformers==$TRANSFORMERS" "numpy~=2.2.6" "sentencepiece>=0.1.98,<0.3.0" \
    "protobuf>=4.21.0,<5.0.0" "$LLAMA/gguf-py"
fi

if ! "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  step "compiling llama.cpp and the llama_cpp binding from the sdist (about 13 min on 2 cores)"
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} "${PIP[@]}" "$TARBALL"
fi

"$PY" - "$DIR/ready.json" "$PY" "$LLAMA" <<'EOF'
import json, sys
import gguf, llama_cpp, torch, transformers
from importlib.metadata import version
stamp, python, llama = sys.argv[1:]
json.dump({"python": python, "llama_cpp": llama, "versions": {
    "llama_cpp_python": llama_cpp.__version__, "gguf": version("gguf"),
    "transformers": transformers.__version__, "torch": torch.__version__}},
    open(stamp, "w"), indent=1)
EOF
step "ready: $DIR/ready.json"

#!/usr/bin/env bash
# The one-shot GPU check: a bare one-GPU machine with no network, under 8 minutes, everything
# written under --out as it goes (what each section does: tests/gpu/gpu_check.py).
#
#   bash tests/gpu/run_gpu_check.sh --out "$OUT"              # on the GPU machine
#   bash tests/gpu/run_gpu_check.sh --cpu-smoke --out DIR     # the same sections, tiny, on CPU
#
# Before it travels, fetch the wheels the GPU machine lacks (network needed, this machine):
#   bash tests/gpu/fetch_wheels.sh                            # -> tests/gpu/wheels/ (git-ignored)
# and name tests/gpu/wheels in the device tool's `carry` list.
#
# Here: install those wheels and the project itself (no network, no build isolation) into one
# folder on PYTHONPATH, then hand over to gpu_check.py. A step that fails is reported and the
# check goes on with what is installed.
set -u
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
SITE=${TTE_GPU_SITE:-$(mktemp -d /tmp/tte_site.XXXXXX)}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 WANDB_MODE=disabled

say() { echo "[gpu-check] $(date +%H:%M:%S) $*"; }
mkdir -p "$SITE"
# What the machine has before the wheels go in (env.txt shows it).
"$PY" -m pip list --format=freeze > "$SITE/pip_list_before.txt" 2>/dev/null
export TTE_PIP_BEFORE="$SITE/pip_list_before.txt"
wheels=(tests/gpu/wheels/*.whl)
if [ -e "${wheels[0]}" ]; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "${wheels[@]}"; then
    say "installed ${#wheels[@]} wheels into $SITE: $(cd tests/gpu/wheels && ls *.whl | tr '\n' ' ')"
  else
    say "installing the wheels failed; going on with what is installed"
  fi
else
  say "no wheels in tests/gpu/wheels (fetch them with tests/gpu/fetch_wheels.sh); using what is installed"
fi

# The project, built from a copy so the tree gets no build/ folder.
src=$(mktemp -d /tmp/tte_src.XXXXXX)
cp -r setup.py README.md unified_tte kernels "$src"/
if "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" "$src" 2>"$src/pip.log"; then
  say "installed unified_tte and tte_kernels from the working tree into $SITE"
else
  # Without setuptools: tte_kernels is the kernels/tte_kernels/ folder.
  ln -sfn "$PWD/kernels/tte_kernels" "$SITE/tte_kernels"
  say "pip could not install the project ($(tail -1 "$src/pip.log")); using the tree with a tte_kernels link"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
exec "$PY" tests/gpu/gpu_check.py "$@"

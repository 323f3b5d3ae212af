#!/usr/bin/env bash
# The device check: on a machine with a CUDA GPU and no network, from the repository root,
#
#     analyses/device_check.sh
#
# after analyses/device_wheels.sh filled .whl/ where PyPI was reachable (the wheels travel with
# the working tree). It installs them beside the machine's own packages (into /tmp/ipl-site,
# nothing over its torch), then runs analyses/device_check.py: the tests marked cuda, ipl entropy
# and ipl train-bupo (both engines) on the bundled models, analyses/bench_gpu.py if present, and
# prints one summary table; the exit code is 1 when a step failed. DEVICE=cpu runs the same
# steps on the CPU, smaller (a check of the script itself). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import transformer_lens, plotly, trl" 2>/dev/null; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "error: transformer-lens, plotly or trl is missing and .whl/ holds no wheels;" \
            "run analyses/device_wheels.sh where PyPI is reachable" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/ipl-site .whl/*.whl
    export PYTHONPATH=/tmp/ipl-site${PYTHONPATH:+:$PYTHONPATH}
fi
# The package runs from the working tree.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
exec "$PY" analyses/device_check.py --device "${DEVICE:-cuda}" "$@"

#!/usr/bin/env bash
# The wheels that analyses/device_check.sh installs on a GPU machine without network access.
#
# Run it where PyPI is reachable; it fills .whl/ (git-ignored) in the repository root with
# wheels for CPython 3.12 on x86-64 Linux. The GPU image it targets already holds
# torch (2.11+cu130), transformers (5.17), accelerate, tokenizers, safetensors, pandas, pyarrow,
# numpy, matplotlib, seaborn, typer, tqdm, einops, jaxtyping, rich, huggingface-hub, narwhals,
# xxhash, pyyaml and requests; what the package needs beyond them is listed below, each with
# the requirements of its own that the image lacks. Not carried: wandb (transformer-lens 4.3
# imports it only inside its training tool), transformers-stream-generator (a source
# distribution, imported by no path that runs here) and math-verify (optional: the reward then
# compares normalised answers itself). The package itself goes from the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
    transformer-lens==4.3.0  # TransformerBridge
    datasets==5.2.0          # imported by transformer-lens and TRL
    dill==0.4.1              # datasets
    multiprocess==0.70.19    # datasets
    beartype==0.23.1         # transformer-lens
    typeguard==4.6.1         # transformer-lens
    fancy-einsum==0.0.3      # transformer-lens
    plotly==7.1.0            # the entropy run's report.html
    trl==1.16.0              # --engine trl
    gguf==0.19.0             # GGUF checkpoints (tests/model/test_gguf.py imports it)
)

mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]%%#*}"
ls .whl
du -ch .whl/*.whl | tail -1

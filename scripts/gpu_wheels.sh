#!/usr/bin/env bash
# Wheels for a GPU machine whose Python has torch but not the project's config and logging stack
# (the lent H200 image: Python 3.12, torch, timm, transformers, pandas, no Hydra, W&B, submitit,
# open_clip or datasets). Writes them to .whl/ (git-ignored through .git/info/exclude), which
# scripts/gpu_check.sh installs into /tmp/site on that machine. Run here, with network to PyPI,
# after `make install` (versions are the venv's, so both machines run the same stack).
#
#   bash scripts/gpu_wheels.sh            # then carry .whl with the device call
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
version() { ls -d "$SITE/$1"-*.dist-info | sed "s/.*$1-\(.*\)\.dist-info/\1/"; }
PKGS=()
for spec in hydra_core:hydra-core omegaconf submitit hydra_submitit_launcher:hydra-submitit-launcher \
    wandb cwevals opentelemetry_api:opentelemetry-api opentelemetry_sdk:opentelemetry-sdk \
    opentelemetry_exporter_otlp_proto_http:opentelemetry-exporter-otlp-proto-http \
    opentelemetry_exporter_otlp_proto_common:opentelemetry-exporter-otlp-proto-common \
    opentelemetry_proto:opentelemetry-proto \
    opentelemetry_semantic_conventions:opentelemetry-semantic-conventions \
    opentelemetry_exporter_http_transport:opentelemetry-exporter-http-transport \
    open_clip_torch ftfy wcwidth datasets dill multiprocess pydantic pydantic_core:pydantic-core \
    annotated_types:annotated-types typing_inspection:typing-inspection platformdirs \
    googleapis_common_protos:googleapis-common-protos; do
  dist=${spec%%:*}; name=${spec#*:}
  PKGS+=("$name==$(version "$dist")")
done
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${PKGS[@]}"
# antlr4-python3-runtime 4.9.3 (Hydra's pin) is published as a source archive only.
.venv/bin/pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(version antlr4_python3_runtime)"
ls .whl

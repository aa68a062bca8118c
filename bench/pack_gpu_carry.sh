#!/usr/bin/env bash
# What bench/gpu_session.sh needs on a GPU machine that has PyTorch (Python 3.12) but neither Ray nor a package
# index: Ray 2.60's cp312 wheel without ray/jars, ray/rllib, ray/serve and ray/llm, packed with tar -cJf (about
# 31 MB), and the wheels of what that machine lacks of Ray's train/tune/data requirements. Run it where pip
# reaches PyPI; it writes OUT (default .gpu-carry, git-ignored), which the device run carries.
#   bench/pack_gpu_carry.sh [OUT]
set -euo pipefail
out=${1:-.gpu-carry}
python=${PYTHON:-python3}
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out" "$work/ray"
"$python" -m pip download -q --no-deps "${platform[@]}" -d "$work" ray==2.60.0
(cd "$work/ray" && "$python" -m zipfile -e "$work"/ray-2.60.0-*.whl . && rm -rf ray/jars ray/rllib ray/serve ray/llm)
tar -cJf "$out/ray.tar.xz" -C "$work/ray" .
# Ray's requirements the GPU image lacks (its package list: jsonschema, pydantic and tensorboardX are missing);
# dependencies it already has are dropped so that no second version shadows them.
"$python" -m pip download -q "${platform[@]}" -d "$work/deps" jsonschema "pydantic>=2.13,<3" "tensorboardX>=2.6"
for wheel in "$work"/deps/*.whl; do
  case "$(basename "$wheel")" in
    attrs-* | typing_extensions-* | numpy-* | protobuf-* | packaging-*) ;;
    *) cp "$wheel" "$out/" ;;
  esac
done
du -sh "$out"
ls "$out"

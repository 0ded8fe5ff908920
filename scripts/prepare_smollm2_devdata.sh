#!/usr/bin/env bash
# On the development machine, for the GPU scripts: SmolLM2's tokenizer folder (it also serves the
# random: shapes) in .devdata/smollm2-135m, its 98 MB GGUF in two halves (one device call carries
# 64 MiB at most; the halves meet on one warm machine) with the whole file's SHA-256 and name, and
# the gguf wheel that reads it there. Used by gpu_speed_defaults.sh and gpu_eval_bench.sh `prepare`.
set -euo pipefail
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p .devdata/smollm2-135m .devdata/smollm2-gguf-a .devdata/smollm2-gguf-b .whl
folder=$(PYTHONPATH=src $py -c "from loralab.models import resolve_model_path as r; print(r('packaged:smollm2-135m'))")
cp "$folder"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json} .devdata/smollm2-135m/
cp "$folder"/chat_template.jinja .devdata/smollm2-135m/ 2>/dev/null || true
gguf=$(PYTHONPATH=src $py -c "from loralab.models import PACKAGED, _package_dir; m, _, f = PACKAGED['packaged:smollm2-135m']; print(_package_dir(m) / f)")
head -c 50000000 "$gguf" > .devdata/smollm2-gguf-a/part
tail -c +50000001 "$gguf" > .devdata/smollm2-gguf-b/part
sha256sum "$gguf" | cut -d' ' -f1 > .devdata/smollm2-gguf-b/SHA256
basename "$gguf" > .devdata/smollm2-gguf-b/NAME
$py -m pip download -q --no-deps --only-binary=:all: -d .whl gguf==0.19.0

#!/usr/bin/env bash
# Installs everything ctxcache needs on a fresh Debian 12 machine, idempotently, and fetches
# the models. Fast (a few seconds) when everything is already there.
#   tools/setup.sh          build + test dependencies (what CI and the README commands need),
#                           the default model (SmolLM2) and the second test model (Qwen2.5,
#                           491 MB), the tokenizer test vocabularies and the
#                           quality harness's prose haystack
#   tools/setup.sh --dev    also the dev-side Python tools: llama-cpp-python (peer and oracle),
#                           gguf, numpy, matplotlib (fixtures, benchmarks, plots)
#   tools/setup.sh --image  only what building ctxcache-server and the CLI needs, and the
#                           default model (the container images' builder stage)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dev=0 image=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --image) image=1 ;;
    *) echo "usage: tools/setup.sh [--dev | --image]" >&2; exit 2 ;;
  esac
done

apt_packages=(
  cmake ninja-build pkg-config g++ git ca-certificates python3
  libabsl-dev libspdlog-dev libfmt-dev libssl-dev
  openssl     # test certificates for the TLS tests (tests/tls_test.cc, tests/deploy_test.sh)
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler grpc-proto
  libhiredis-dev redis-server redis-tools
  libgtest-dev libgmock-dev libbenchmark-dev nlohmann-json3-dev
  libopenblas-dev libyaml-cpp-dev
  libcpp-httplib-dev  # the OpenAI-compatible HTTP API (server/http_api.cc)
  chromium            # the playground page's end-to-end test (tools/playground_check.py)
  prometheus  # promtool only: the metrics test checks the /metrics exposition with it
  python3-pip
  yamllint    # deploy checks (tests/deploy_test.sh); promtool there too
  # Coverage-guided fuzzing (tools/fuzz.sh): clang 14 and its runtimes; libFuzzer itself
  # (libclang_rt.fuzzer-x86_64.a) and the sanitizer runtimes ship in libclang-rt-14-dev.
  clang libclang-rt-14-dev
  # ThreadSanitizer run (tools/tsan.sh): Debian's Abseil source is fetched and patched
  # (tools/tsan_absl.sh builds it with -fsanitize=thread).
  dpkg-dev patch xz-utils
)
if ((image)); then
  apt_packages=(
    cmake ninja-build pkg-config g++ ca-certificates python3 python3-pip
    libabsl-dev libspdlog-dev libfmt-dev libssl-dev
    libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler grpc-proto
    libhiredis-dev nlohmann-json3-dev libopenblas-dev libyaml-cpp-dev libcpp-httplib-dev
  )
fi
# `kubectl kustomize` for the deploy checks: Debian's kubernetes-client (1.20, kustomize
# v2.0.3, which deploy/k8s is written for) unless a kubectl is installed already (another
# kubectl package would conflict with it over /usr/bin/kubectl).
((image)) || command -v kubectl >/dev/null 2>&1 || apt_packages+=(kubernetes-client)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  sudo_cmd=()
  [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
if ((image)); then
  "$root/tools/fetch_model.sh" qwen2.5-0.5b >/dev/null
  echo "setup: ok (image build)" >&2
  exit 0
fi
# For the python3 on PATH (the one the tests run): Kubernetes JSON schemas for validating
# deploy/k8s offline (tests/deploy_test.sh), matplotlib for the dashboard preview drawn from a
# live run (tools/dashboard_demo.py), the official openai client and LangChain's OpenAI chat
# model, which the HTTP API is tested with (tests/http_api_test.py), and websocket-client, which
# drives Chromium's DevTools protocol (tools/playground_check.py). Debian's own python3 is
# "externally managed" (PEP 668): there they go in with --break-system-packages.
if ! python3 -c 'import kubernetes_validate, matplotlib, openai, langchain_openai, websocket' \
    2>/dev/null; then
  pip_flags=(--quiet)
  python3 -c 'import os, sysconfig, sys
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED")) else 1)' \
    && pip_flags+=(--break-system-packages)
  python3 -m pip install "${pip_flags[@]}" kubernetes-validate==1.37.0 matplotlib openai \
    langchain-openai websocket-client
fi
if ((dev)); then
  python3 - <<'PY' 2>/dev/null || python3 -m pip install --quiet numpy gguf matplotlib llama-cpp-python==0.3.36
import numpy, gguf, matplotlib, llama_cpp
PY
fi

# The default served model (Qwen2.5-Coder-0.5B Q4_K_M, 491 MB), and SmolLM2-135M, the fast
# model most tests run on (ctest points CTXCACHE_MODEL at it); the model, compress and
# llama.cpp parity tests run on both.
"$root/tools/fetch_model.sh" qwen2.5-0.5b >/dev/null
"$root/tools/fetch_model.sh" smollm2 >/dev/null
"$root/tools/fetch_vocabs.sh"
# The quality harness's prose haystack (Jane Austen, from Debian's r-cran-janeaustenr).
"$root/tools/fetch_prose.py" >/dev/null
echo "setup: ok" >&2

#!/usr/bin/env bash
# Build llama.cpp's own speculative-decoding example (llama-speculative-simple) from the llama.cpp
# source that the installed llama-cpp-python vendors, the same version vlsi's llama.cpp backend
# runs: `vlsi bench --speculative` times it on the exported files and the tests check that the
# draft GGUF works as its draft model. Needs cmake and a C++ compiler; about 4 minutes on 2 cores.
#
#   scripts/build_llama_tools.sh .venv/bin/python .venv/llama.cpp-tools
set -euo pipefail
python="$1"
out="$2"
version=$("$python" -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
rm -rf "$out.tmp"
cmake -S "$src" -B "$out.tmp" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON \
    > "$work/cmake.log" \
    || { tail -40 "$work/cmake.log"; exit 1; }
cmake --build "$out.tmp" --target llama-speculative-simple -j "$(nproc)" > "$work/build.log" \
    || { tail -40 "$work/build.log"; exit 1; }
rm -rf "$out"
mv "$out.tmp" "$out"  # the binary finds its libraries beside it ($ORIGIN RUNPATH)
echo "$version" > "$out/llama-cpp-python.version"
echo "built $out/bin/llama-speculative-simple (llama.cpp of llama-cpp-python $version)"

# Set-up and the two entry points of the README. `make quickstart` and `make test` each
# create .venv on first use, and `make test` installs the system packages it needs
# (`sysdeps`), so they work as written on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build; on a CUDA machine or a Jetson, install your torch first and pass TORCH=torch.
TORCH  ?= torch==2.13.0
EXTRAS ?= train,onnx,app,dev
OUT    ?= runs/quickstart
BIN     = $(VENV)/bin

# The tests also run llama.cpp: llama-cpp-python compiles it on first install (about 5 min).
GGUF    = $(VENV)/.gguf-installed

# System packages the tests need, as Debian names them, each with the commands that count as
# having it: chromium for the browser test (Playwright drives it; no browser download) and g++
# for llama-cpp-python's build of llama.cpp, cmake for llama.cpp's speculative example (make llama-tools).
SYSDEPS = "chromium:chromium chromium-browser google-chrome" "g++:g++ c++ clang++" "cmake:cmake"

.PHONY: setup sysdeps quickstart test clean llama-tools

$(BIN)/vlsi: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=77"
	$(BIN)/pip install -q "$(TORCH)" -e ".[$(EXTRAS)]"
	@touch $@

setup: $(BIN)/vlsi

# Installs what SYSDEPS lists as missing with apt-get when that is allowed without a prompt (root, or
# passwordless sudo); otherwise stops with the one command to run.
sysdeps:
	@missing=""; \
	for dep in $(SYSDEPS); do \
		found=""; for cmd in $${dep#*:}; do command -v $$cmd >/dev/null 2>&1 && found=1 && break; done; \
		[ -n "$$found" ] || missing="$$missing $${dep%%:*}"; \
	done; \
	[ -n "$$missing" ] || exit 0; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo "; \
	else sudo=none; fi; \
	apt="sudo apt-get update && sudo apt-get install -y --no-install-recommends$$missing"; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "make sysdeps: missing$$missing and no apt-get here; install them with the system's package manager (Debian: $$apt)" >&2; \
		exit 1; \
	elif [ "$$sudo" = none ]; then \
		echo "make sysdeps: missing$$missing; run: $$apt" >&2; \
		exit 1; \
	fi; \
	echo "make sysdeps: installing$$missing with apt-get"; \
	$${sudo}apt-get update -q && \
	$${sudo}env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends$$missing

# The main job on the built-in synthetic default: data, teacher, data-limited student,
# VLsI and three equal-compute baselines, evaluation; writes $(OUT)/report.json.
quickstart: setup
	$(BIN)/vlsi quickstart --out $(OUT)

$(GGUF): $(BIN)/vlsi | sysdeps
	$(BIN)/pip install -q -e ".[gguf]"
	@touch $@

# NVIDIA ModelOpt's ONNX quantiser (vlsi export --target tensorrt --quant int8/int4/fp8, calibrated
# on the CPU), installed without its dependencies: its [onnx] extra pulls onnxruntime-gpu and cupy
# and pins onnx. The few it needs on a CPU come with the tensorrt-export extra. Pinned, because
# vlsi_export/trt_quant.py works around 0.47.0 internals (tests/test_trt_quant.py checks them).
MODELOPT = $(VENV)/.modelopt-installed

$(MODELOPT): $(BIN)/vlsi
	$(BIN)/pip install -q -e ".[tensorrt-export]"
	$(BIN)/pip install -q --no-deps "nvidia-modelopt==0.47.0"
	@touch $@

# llama.cpp's own speculative decoding (llama-speculative-simple), built from the llama.cpp source
# llama-cpp-python vendors (about 4 min): `vlsi bench --speculative` compares with it, the tests
# run the exported draft GGUF in it.
LLAMA_TOOLS = $(VENV)/llama.cpp-tools

$(LLAMA_TOOLS)/bin/llama-speculative-simple: $(GGUF)
	scripts/build_llama_tools.sh $(BIN)/python $(LLAMA_TOOLS)

llama-tools: $(LLAMA_TOOLS)/bin/llama-speculative-simple

test: sysdeps setup $(GGUF) $(MODELOPT) $(LLAMA_TOOLS)/bin/llama-speculative-simple
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache

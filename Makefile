# Set-up and the two entry points of the README. `make quickstart` and `make test` each
# create .venv on first use, so they work as written on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build; on a CUDA machine or a Jetson, install your torch first and pass TORCH=torch.
TORCH  ?= torch==2.13.0
EXTRAS ?= train,onnx,app,dev
OUT    ?= runs/quickstart
BIN     = $(VENV)/bin

# The tests also run llama.cpp: llama-cpp-python compiles it on first install (about 5 min).
GGUF    = $(VENV)/.gguf-installed

.PHONY: setup quickstart test clean

$(BIN)/vlsi: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=77"
	$(BIN)/pip install -q "$(TORCH)" -e ".[$(EXTRAS)]"
	@touch $@

setup: $(BIN)/vlsi

# The main job on the built-in synthetic default: data, teacher, data-limited student,
# VLsI and three equal-compute baselines, evaluation; writes $(OUT)/report.json.
quickstart: setup
	$(BIN)/vlsi quickstart --out $(OUT)

$(GGUF): $(BIN)/vlsi
	$(BIN)/pip install -q -e ".[gguf]"
	@touch $@

test: setup $(GGUF)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache

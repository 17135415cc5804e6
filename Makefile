# The two commands of the README. Both create ./.venv on first use and install
# what they need from the package registries (torch and torchvision come from
# this machine's disk: a plain `pip install torchvision` would pull a mismatched build).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_SIZE ?= small
DEMO_DIR ?= demo

.PHONY: demo test test-fast lint-imports install clean-demo

# What the demo needs: torch, geo and its demo data. `make demo` on a fresh clone installs only
# this (the test tools and backbone families below take ~25 s more to install).
$(VENV)/.installed-demo: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	printf 'torch==2.14.1\ntorchvision==0.29.1\n' > $(VENV)/torch-pins.txt
	# -c pins torch/torchvision: no dependency may pull another torch.
	$(PIP) install -q -e '.[demo]' -c $(VENV)/torch-pins.txt
	# geoclip ships the MP-16 photo-location sample the demo draws from; its own
	# dependencies (transformers ...) are not needed, hence --no-deps.
	$(PIP) install -q --no-deps geoclip==1.3.0
	touch $@

# Everything: the above, the test tools and the timm / OpenCLIP / hf backbone families.
$(VENV)/.installed: $(VENV)/.installed-demo
	$(PIP) install -q -e '.[test,demo,backbones]' -c $(VENV)/torch-pins.txt
	touch $@

install: $(VENV)/.installed

# The whole suite, slow end-to-end tests included (CI runs this), after the import layering check.
# One pytest-xdist worker per core (tests/conftest.py gives each worker and its subprocesses one thread);
# worksteal keeps both cores busy to the end when one worker draws the few minute-long tests.
TEST_WORKERS ?= auto
XDIST := -n $(TEST_WORKERS) --dist worksteal
test: lint-imports
	$(PY) -m pytest $(XDIST)

# The same without the tests marked slow (the demo end to end, DDP, ...): for quick iterations.
test-fast: lint-imports
	$(PY) -m pytest $(XDIST) -m "not slow"

lint-imports: $(VENV)/.installed
	$(VENV)/bin/lint-imports

demo: $(VENV)/.installed-demo
	DEMO_SIZE=$(DEMO_SIZE) PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh $(DEMO_DIR)

clean-demo:
	rm -rf $(DEMO_DIR)

# One command each: `make test` (the test suite) and `make bench` (the main job on its bundled default).
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install test bench
install: $(STAMP)

$(STAMP): pyproject.toml .ci/install.sh
	bash .ci/install.sh
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks.accuracy $(ARGS)

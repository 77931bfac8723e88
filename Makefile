# tinyserve-backup — developer and user entry points.
#   make run            set up .venv, create a config if none exists, run the daemon in the foreground
#   make test           set up .venv and run the test suite
#   make lint           ruff + mypy
#   make install-agent  install as a LaunchAgent (macOS) or systemd user unit (Linux)
#   make bench          side-by-side benchmarks (small data set)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CONFIG ?= $(or $(TINYSERVE_BACKUP_CONFIG),$(or $(XDG_CONFIG_HOME),$(HOME)/.config)/tinyserve-backup/config.yaml)

.PHONY: venv run test lint fmt bench bench-large demo clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lint]'
	@touch $(STAMP)

venv: $(STAMP)

run: venv
	$(PY) -m daemon --config "$(CONFIG)" config --init
	$(PY) -m daemon --config "$(CONFIG)" run

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check daemon tests bench
	$(VENV)/bin/ruff format --check daemon tests bench
	$(VENV)/bin/mypy

fmt: venv
	$(VENV)/bin/ruff check --fix daemon tests bench
	$(VENV)/bin/ruff format daemon tests bench

bench: venv
	$(PY) -m bench.run --size small

bench-large: venv
	$(PY) -m bench.run --size large

demo: venv
	$(PY) -m bench.demo

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache

include mk/agent.mk

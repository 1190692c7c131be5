# Set-up and checks. `make demo` and `make test` install what they need into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium

.PHONY: install chromium demo test unit lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build of torch first, so that nothing below pulls a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# An editable install skips the wheel's data-files: put the /twinkle dashboard's jupyter-config
	# file where a wheel install puts it (jupyter_server only enables extensions it finds listed).
	mkdir -p $(VENV)/etc/jupyter/jupyter_server_config.d
	cp jupyter-config/jupyter_server_config.d/twinkle_jupyter.json $(VENV)/etc/jupyter/jupyter_server_config.d/
	$(BIN)/jupyter server extension enable --sys-prefix twinkle_jupyter
	touch $(STAMP)

# The browser tests drive Debian's Chromium (Playwright cannot download browsers everywhere).
chromium:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the browser tests"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	else \
		echo "NOTE: $(CHROMIUM) is missing and this is not root: the browser tests will skip"; \
		echo "      (and fail under CI=true). Install it with: sudo apt-get install -y chromium"; \
	fi

install: $(STAMP) chromium

demo: $(STAMP)
	$(BIN)/python -m twinkle.demo

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The quick loop: the in-process tests (spread over the machine's cores: tests/conftest.py).
unit: $(STAMP)
	$(BIN)/python -m pytest -m unit

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache

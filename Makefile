# `make demo` and `make test` each create .venv when missing and install into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A clean environment for pytest's worker processes and the demo: CPU only.
export JAX_PLATFORMS ?= cpu

.PHONY: demo demo-shakespeare test install clean style guide

# Applies the formatter and the linter's fixes (make test checks both).
style: $(VENV)/.installed-test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

# The whole road on two-digit addition: tokenizer, pretraining, SFT, reward model, PPO, DPO
# and GRPO, then a table of held-out accuracy (rlhf/demo.py; runs/addition).
demo: $(VENV)/.installed
	$(PY) -m rlhf.demo --workdir=runs/addition

# A tokenizer and a small model on the built-in Shakespeare corpus (train/demo.py; runs/demo).
demo-shakespeare: $(VENV)/.installed
	$(PY) -m train.demo

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n 2 --dist=loadfile --durations=15 tests

# The guide as one HTML page and a PDF (docs/guide.html, docs/guide.pdf): pandoc renders the
# chapters (table of contents, numbered sections, MathML equations), headless Chromium prints
# the page. Both come from Debian's packages, installed here when missing.
GUIDE_MD := $(sort $(wildcard docs/guide/[0-9][0-9]-*.md))
guide: docs/guide.pdf

docs/guide.html: $(GUIDE_MD) docs/guide/guide.css
	@command -v pandoc >/dev/null || { apt-get update -qq && apt-get install -y -qq pandoc; }
	pandoc $(GUIDE_MD) --from=markdown --to=html5 --standalone --toc --toc-depth=2 \
	  --number-sections --mathml --resource-path=docs/guide --self-contained \
	  --css=docs/guide/guide.css --metadata=title:"fromscratch: from nothing to an aligned model" \
	  --output=$@

docs/guide.pdf: docs/guide.html
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
	chromium --headless --no-sandbox --disable-gpu --no-pdf-header-footer \
	  --print-to-pdf=$@ file://$(abspath $<)

clean:
	rm -rf $(VENV)

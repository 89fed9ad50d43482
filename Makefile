# The README's two commands: `make demo` and `make test`. Both create .venv idempotently.
# torch is pinned and installed *before* the project so that `pip install -e .` (torch>=2.3)
# does not pull a multi-GB CUDA build; override with e.g. `make test TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,lab,lightning,transformers,wandb,mlflow,tensorboard,ray,docs
DEMO_OUT ?= demo-out
BIN := $(VENV)/bin
STAMP := $(VENV)/.signalprop-installed

.PHONY: venv demo test lint lab-quick docs bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/signalprop doctor --example deep-sigmoid --trial --out $(DEMO_OUT)
	@echo
	@echo "Report: $(DEMO_OUT)/report.html"
	@echo "Next: run the lab with '$(BIN)/signalprop lab run all --quick --out lab-out' (about 4 minutes on 2 idle cores; see docs/lab.md)."

test: venv
	@# the browser test drives the system Chromium through Playwright (skipped if it cannot be had)
	-@bash scripts/ensure_chromium.sh >/dev/null || echo "no Chromium: tests/report/test_browser_report.py will be skipped"
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: venv
	$(BIN)/ruff check src tests benchmarks examples

lab-quick: venv
	$(BIN)/signalprop lab run all --quick --out lab-out

docs: venv
	$(BIN)/python -m signalprop.docs_build site

bench: venv
	$(BIN)/python benchmarks/probe_overhead.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) lab-out site .pytest_cache

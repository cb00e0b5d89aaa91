# rdd-lightning: `make demo` and `make test` are the whole set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo table teacher-strength test test-fast lint format docs bench bench-scaling bench-data bench-kd bench-cirkd bench-export clean

install: $(STAMP)  ## .venv with the package (editable) and its test, export and docs extras; a no-op when nothing changed

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# setuptools' notice that an editable install of a mapped package (conf/ -> rdd_lightning.conf) uses an
	@# import hook is informational; it is silenced so that a fresh install prints nothing but errors
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -e '.[test,docs]'
	@touch $(STAMP)

demo: install  ## the synthetic data's student without distillation, with KD and with RDD, from its (auto-trained, cached) teacher
	$(PY) -m rdd_lightning.train experiment=demo
	$(PY) -m rdd_lightning.report "$$(ls -d logs/demo/multiruns/* | tail -n 1)"

table: install  ## the seeded synthetic accuracy table: 9 methods x 3 seeds (~45 min on 2 cores), then its report
	$(PY) -m rdd_lightning.train experiment=synthetic_table
	$(PY) -m rdd_lightning.report "$$(ls -d logs/synthetic_table/multiruns/* | tail -n 1)" --format markdown

teacher-strength: install  ## RDD - KD against teacher strength (4 teachers x kd/rdd xor/rdd or x 3 seeds, + threshold/min_kept; ~1.5 h on 2 cores; resumable)
	$(PY) benchmarks/teacher_strength.py

test: install  ## the whole test suite (CPU, tiny data; what CI runs)
	$(PY) -m pytest -q --durations=10

test-fast: install  ## everything but the tests that train networks
	$(PY) -m pytest -q -m "not slow"

docs: install  ## the manual (docs/, mkdocs.yml) into site/; --strict: a missing page or a broken link fails
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

lint: install
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

format: install
	$(PY) -m ruff format src tests benchmarks
	$(PY) -m ruff check --fix src tests benchmarks

bench: install  ## RDD loss cost at Cityscapes per-GPU scale
	$(PY) benchmarks/rdd_losses.py

bench-scaling: install  ## how the RDD losses' time and memory grow with batch, resolution and classes (ratios to plain CE)
	$(PY) benchmarks/rdd_losses.py --scaling

bench-data: install  ## training-loader throughput per dataset at its crop size
	$(PY) benchmarks/data_loading.py

bench-kd: install  ## per-step time and peak memory of every distillation config, relative to kd (CPU, small)
	$(PY) benchmarks/kd_step.py

bench-cirkd: install  ## CIRKD's mini-batch relation term at a 512x1024 crop: peak memory whole vs in row blocks
	$(PY) benchmarks/cirkd_memory.py

bench-export: install  ## CPU images/s of the exported student: onnxruntime and TorchScript vs PyTorch eager, 512x1024
	$(PY) benchmarks/export_speed.py

clean:  ## remove caches and build files (keeps logs/ and .cache/: runs and cached teachers are yours)
	rm -rf build dist site src/*.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

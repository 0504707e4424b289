# Two commands do everything on a fresh machine (they create .venv/ first):
#   make demo   builds a backbone from a checkpoint it makes, then trains and evaluates a
#               small ConvNeXt UperNet (ADE20K format) and Mask R-CNN (COCO format) on
#               generated datasets, on the CPU; results and PNGs in outputs/demo/
#   make test   runs the whole test suite (slow tests included; GPU tests skip without CUDA)
PY := .venv/bin/python
OUT ?= outputs/demo

.PHONY: setup demo test test-fast clean
setup:
	@bash tools/setup_env.sh

demo: setup
	$(PY) tools/demo.py --out-dir $(OUT)

test: setup
	$(PY) -m pytest -q --timeout=1800

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf outputs work_dirs .pytest_cache

# Every target sets up .venv itself when needed, so `make demo` and `make test` work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared

.PHONY: setup demo test bench bench-node bench-models clean

setup:
	bash scripts/setup_env.sh $(VENV)

demo: setup
	$(PY) -m reloc_ros.demo.run

test: setup
	$(PY) -m pytest -q test

bench: setup
	$(PY) bench/bench_core.py --shared $(SHARED)

bench-node: setup
	$(PY) bench/bench_node.py

bench-models: setup
	$(PY) bench/bench_reloc3r.py
	$(PY) bench/bench_vggt.py

clean:
	rm -rf $(VENV) out build *.egg-info

# Every target sets up .venv itself when needed, so `make demo` and `make test` work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared

.PHONY: setup demo test bench bench-covariance bench-sequence bench-node bench-models clean

setup:
	bash scripts/setup_env.sh $(VENV)

demo: setup
	$(PY) -m reloc_ros.demo.run

test: setup
	$(PY) -m pytest -q test

bench: setup
	$(PY) bench/bench_core.py --shared $(SHARED)

bench-covariance: setup
	$(PY) bench/bench_covariance.py --shared $(SHARED)

# make bench-sequence [MODE=core|node] [RUNS=7scenes,7scenes+foreign40,kitti,room+foreign30]
bench-sequence: setup
	$(PY) bench/bench_sequence.py --shared $(SHARED) --mode $(or $(MODE),core) $(if $(RUNS),--runs $(RUNS))

bench-node: setup
	$(PY) bench/bench_node.py

bench-models: setup
	$(PY) bench/bench_reloc3r.py
	$(PY) bench/bench_vggt.py

clean:
	rm -rf $(VENV) out build *.egg-info

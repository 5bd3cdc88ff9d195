# Every target sets up .venv itself when needed, so `make demo` and `make test` work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared

.PHONY: setup demo demo-rig test bench bench-covariance bench-sequence bench-node bench-models bench-rig bench-scale bench-build gpu-check train-demo demo-trained clean

setup:
	bash scripts/setup_env.sh $(VENV)

demo: setup
	$(PY) -m reloc_ros.demo.run

# the node with a 4-camera rig (one camera without a TF mount) on the rendered room, over DDS
demo-rig: setup
	$(PY) -m reloc_ros.demo.run --rig

test: setup
	$(PY) -m pytest -q test

bench: setup
	$(PY) bench/bench_core.py --shared $(SHARED)

bench-covariance: setup
	$(PY) bench/bench_covariance.py --shared $(SHARED)

# make bench-sequence [MODE=core|node] [RUNS=7scenes,7scenes+foreign40,kitti,room+foreign30]
bench-sequence: setup
	$(PY) bench/bench_sequence.py --shared $(SHARED) --mode $(or $(MODE),core) $(if $(RUNS),--runs $(RUNS))

bench-rig: setup
	$(PY) bench/bench_rig.py

bench-scale: setup
	$(PY) bench/bench_scale.py --shared $(SHARED)

# make bench-build [BASELINE=/path/to/a/checkout/of/an/older/commit]
bench-build: setup
	$(PY) bench/bench_build.py --shared $(SHARED) $(if $(BASELINE),--baseline $(BASELINE))

# trains the compact fused model from scratch on rendered rooms and measures it (issue 11 proof)
train-demo: setup
	$(PY) bench/bench_train.py --out out/train_demo

# the node over DDS on a held-out rendered room with the fused model train-demo trained
# (out/train_demo/full; run `make train-demo` first: about 17 min on 2 idle cores)
demo-trained: setup
	$(PY) bench/bench_train.py --out out/train_demo --node-dds full

# on a machine with an NVIDIA GPU (no package installs needed); DRY=1 runs the CPU dry mode
gpu-check:
	bash bench/gpu_check.sh $(if $(DRY),--dry-run)

bench-node: setup
	$(PY) bench/bench_node.py

bench-models: setup
	$(PY) bench/bench_reloc3r.py
	$(PY) bench/bench_vggt.py

clean:
	rm -rf $(VENV) out build *.egg-info

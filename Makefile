# offramp: `make demo` runs the system, `make test` runs the tests. Each sets itself up.
PYTHON      ?= python3.11
VENV        ?= .venv
PY          := $(VENV)/bin/python
# torch is only for training/export. 2.13.0 is the CPU build the project's machines carry; elsewhere
# add TORCH_INDEX=--extra-index-url=https://download.pytorch.org/whl/cpu to avoid a CUDA build.
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
STAMP       := $(VENV)/.installed
# pytest-xdist workers for `make test`: most system tests wait on the broker and the services
# rather than compute, so two share even a 2-core machine; tests marked `exclusive` (they
# measure time or rates) run alone (tests/sharing.py). TEST_JOBS=0 runs them in one process.
TEST_JOBS   ?= 2
SERVICES    := admission-controller segment-worker exit-arbiter priority-scheduler
MEMBERS     := shared/pyproject.toml $(SERVICES:%=services/%/pyproject.toml)

.PHONY: help setup system-deps demo test test-gpu test-deploy lint typecheck pytest bench-hop bench-exits bench-segments bench-pipeline bench-control bench-overload bench-overhead bench-video bench-distree bench-links bench-gpu report clean

help:
	@echo "make demo      run offramp locally (broker + services) and show it working"
	@echo "make test      lint, type check and the test suite (real Mosquitto, real ONNX models)"
	@echo "make test-gpu  the GPU tests only, failing (not skipping) without onnxruntime-gpu and a GPU"
	@echo "make test-deploy     build the images with podman, run docker-compose.yml, send frames"
	@echo "make bench-hop one bus hop vs bare paho-mqtt (bench/results/hop.json)"
	@echo "make bench-exits     early-exit savings on digits and Fashion-MNIST (bench/results/exits.json)"
	@echo "make bench-distree   DistrEE's joint training swept over its weights and 3 seeds: exit 1's gain (bench/results/distree.json)"
	@echo "make bench-segments  chained segments vs monolithic ONNX (bench/results/segments.json)"
	@echo "make bench-pipeline  the distributed system vs one ONNX session (bench/results/pipeline.json)"
	@echo "make bench-control   admission strategies and priorities (bench/results/control.json)"
	@echo "make bench-overload  open-loop cameras at 1x, 2x and 5x capacity: goodput, every frame answered (bench/results/overload.json)"
	@echo "make bench-video     a 1280x720 H.264 camera for 60 s through publish --video: every frame answered once (bench/results/video.json)"
	@echo "make bench-overhead  CPU per frame, process by process, just under capacity: how much is inference (bench/results/overhead.json)"
	@echo "make bench-links     a 224x224 model over shaped links, per codec (root; bench/results/links.json)"
	@echo "make bench-gpu       the worker's GPU path vs the monolithic model (needs a GPU; bench/results/gpu.json)"
	@echo "make report          docs/reproduction.md and its plots, from the committed bench results"

system-deps:
	@PYTHON=$(PYTHON) scripts/ensure-system-deps.sh

# Every workspace member editable (the library with all its extras, then each service), and the
# dev group of the root pyproject.toml.
$(STAMP): pyproject.toml $(MEMBERS) | system-deps
	@echo "== setup 1/4: virtual environment $(VENV)"
	@$(PYTHON) -m venv $(VENV)
	@echo "== setup 2/4: pip"
	@$(PY) -m pip install -q --upgrade pip
	@echo "== setup 3/4: $(TORCH_SPEC) (training and export only; the largest download)"
	@$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	@echo "== setup 4/4: offramp, its services and the dev tools (editable)"
	@$(PY) -m pip install -q $(TORCH_INDEX) -e 'shared[serve,images,cli,video,train,pretrained,testbed,tracing]' \
	    $(SERVICES:%=-e services/%) --group dev
	@touch $(STAMP)
	@echo "== setup done"

setup: system-deps $(STAMP)

demo: setup
	$(VENV)/bin/offramp demo

lint: setup
	$(VENV)/bin/ruff check shared services tests bench
	$(VENV)/bin/lint-imports --no-cache

typecheck: setup
	$(VENV)/bin/mypy

pytest: setup
	@PYTHON=$(PYTHON) scripts/ensure-system-deps.sh test
	$(PY) -m pytest -q -n $(TEST_JOBS)

test: lint typecheck pytest

# On a GPU machine, after replacing onnxruntime with onnxruntime-gpu (README, GPU workers).
test-gpu: setup
	OFFRAMP_TEST_GPU=1 $(PY) -m pytest -q -m gpu

test-deploy: setup
	@PYTHON=$(PYTHON) scripts/ensure-system-deps.sh deploy
	VENV=$(VENV) bash tests/deploy/run.sh

bench-hop: setup
	$(PY) -m bench.hop

bench-exits: setup
	$(PY) -m bench.exits

bench-segments: setup
	$(PY) -m bench.segments

bench-pipeline: setup
	$(PY) -m bench.pipeline

bench-control: setup
	$(PY) -m bench.control

bench-overload: setup
	$(PY) -m bench.overload

bench-overhead: setup
	$(PY) -m bench.overhead

bench-video: setup
	$(PY) -m bench.video

bench-distree: setup
	$(PY) -m bench.distree

bench-links: setup
	$(PY) -m bench.links

bench-gpu: setup
	$(PY) -m bench.gpu

report: setup
	$(PY) -m bench.report

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

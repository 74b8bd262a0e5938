# `make demo` and `make test` install into .venv on first use; nothing else is needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-gpu lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The demo: train on the built-in shapes (pixel space, no download), sample a grid, evaluate;
# the grid and loss curve are copied to docs/images/, where README shows them.
# Override e.g. `make demo DEMO_MODEL=DiT-T/4 DEMO_ATTENTION=mhsa`.
DEMO_MODEL ?= SiT-T/4
DEMO_ATTENTION ?= vca
DEMO_STEPS ?= 700
DEMO_NAME = $(subst /,-,$(DEMO_MODEL))-$(DEMO_ATTENTION)
DEMO_DIR ?= results/demo-$(DEMO_NAME)
DEMO_CKPT = $(DEMO_DIR)/checkpoints/$(shell printf '%07d' $(DEMO_STEPS)).pt
DEMO_SAMPLER = $(if $(findstring SiT,$(DEMO_MODEL)),--sampler ode --ode-method heun --num-sampling-steps 13,--sampler ddim --num-sampling-steps 50)

demo: $(STAMP)
	$(PY) train.py --data-path synthetic:20000 --image-size 32 --vae none \
	    --model $(DEMO_MODEL) --attention $(DEMO_ATTENTION) --global-batch-size 32 --lr 2e-3 \
	    --ema-decay 0.995 --max-steps $(DEMO_STEPS) --ckpt-every $(DEMO_STEPS) --log-every 100 \
	    --num-workers 0 --results-dir $(DEMO_DIR) --resume
	$(PY) sample.py --ckpt $(DEMO_CKPT) --class-labels 0 1 2 3 4 5 6 7 8 9 --per-class 4 \
	    --cfg-scale 2.0 $(DEMO_SAMPLER) --out $(DEMO_DIR)/grid.png
	$(PY) evaluate_fid.py --ckpt $(DEMO_CKPT) --ref synthetic --num-samples 200 --batch-size 50 \
	    --cfg-scale 2.0 $(DEMO_SAMPLER) --sample-dir $(DEMO_DIR)/eval --json $(DEMO_DIR)/eval.json
	mkdir -p docs/images
	cp $(DEMO_DIR)/grid.png docs/images/demo-$(DEMO_NAME)-grid.png
	cp $(DEMO_DIR)/loss.png docs/images/demo-$(DEMO_NAME)-loss.png
	@echo "grid:       $(DEMO_DIR)/grid.png"
	@echo "log:        $(DEMO_DIR)/log.txt"
	@echo "loss curve: $(DEMO_DIR)/loss.png"
	@echo "metrics:    $(DEMO_DIR)/eval.json"

# CPU-sized benchmarks: JSON, tables and a chart in bench/results/ (the attention layer at 4096
# tokens and the inductor compiles take most of the time). `make bench-gpu`: the GPU rows.
bench: $(STAMP)
	$(PY) -m bench.attention --widths S XL --tokens 256 1024 4096 --out bench/results/attention.json
	$(PY) -m bench.attention --part mixing --widths S XL --tokens 256 1024 4096 \
	    --out bench/results/attention-mixing.json
	$(PY) -m bench.attention --no-timing --batch 16 --widths S XL --tokens 256 1024 4096 \
	    --out bench/results/attention-memory-b16.json
	$(PY) -m bench.attention --compile --dtype bf16 --batch 4 --attention mhsa vca@aten vca@traced \
	    --widths S XL --tokens 256 1024 4096 --out bench/results/attention-compiled.json
	$(PY) -m bench.recompute --widths S XL --tokens 256 --batch 4
	$(PY) -m bench.train_step --model DiT-S/2 --image-size 256 --batch 4 --steps 7 \
	    --attention mhsa vca@aten vca@traced
	$(PY) -m bench.compile_time --model DiT-S/2 --image-size 256 --batch 4 \
	    --attention mhsa vca@aten vca@traced
	$(PY) -m bench.sampling --batch 1 --steps 25
	$(PY) -m bench.report

# The GPU rows, most wanted first (each run writes its JSON, so a cut-short session keeps what
# ran): the Triton kernels' tests; attention layer and mixing in bf16, eager and compiled; the
# training step of DiT-S/2, B/2 and XL/2 at 256 and 512 px (256 and 1024 tokens), VCA's stream
# products traced by inductor, as the opaque op with the aten kernels and with the Triton
# kernels, against MHSA; XL compile time; XL sampling. Offline, with the packages already
# installed: `make bench-gpu PY=python3 STAMP=` (no venv, no pip).
GPU_TRAIN_RUNS ?= S:256:128 S:512:32 B:256:128 B:512:32 XL:256:64 XL:512:16

bench-gpu: $(STAMP)
	mkdir -p bench/results/gpu
	$(PY) -m pytest -q tests/test_triton_streams.py  # the Triton kernels are right before timed
	$(PY) -m bench.attention --device cuda --attention mhsa vca vca@triton \
	    --widths S XL --tokens 256 1024 4096 --out bench/results/gpu/attention.json
	$(PY) -m bench.attention --device cuda --part mixing --attention mhsa vca vca@triton \
	    --widths S XL --tokens 256 1024 4096 --out bench/results/gpu/attention-mixing.json
	$(PY) -m bench.attention --device cuda --compile --batch 32 \
	    --attention mhsa vca@traced vca@aten vca@triton --widths S XL --tokens 256 1024 4096 \
	    --out bench/results/gpu/attention-compiled.json
	for run in $(GPU_TRAIN_RUNS); do \
	    set -- $$(echo $$run | tr : ' '); \
	    $(PY) -m bench.train_step --device cuda --model DiT-$$1/2 --image-size $$2 --batch $$3 \
	        --attention mhsa vca@traced vca@aten vca@triton \
	        --out bench/results/gpu/train_step-$$1-$$2.json \
	        || exit 1; \
	done
	$(PY) -m bench.compile_time --device cuda --model DiT-XL/2 --batch 32 \
	    --attention mhsa vca@traced vca@aten --out bench/results/gpu/compile_time.json
	$(PY) -m bench.sampling --device cuda --dit-model DiT-XL/2 --sit-model SiT-XL/2 --batch 32 \
	    --out bench/results/gpu/sampling.json
	$(PY) -m bench.report --dir bench/results/gpu

clean:
	rm -rf $(VENV)

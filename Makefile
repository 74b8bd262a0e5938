# `make demo` and `make test` install into .venv on first use; nothing else is needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint clean

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

# The demo: train on the built-in shapes (pixel space, no download), sample a grid, evaluate.
# Override e.g. `make demo DEMO_MODEL=DiT-T/4 DEMO_ATTENTION=mhsa`.
DEMO_MODEL ?= SiT-T/4
DEMO_ATTENTION ?= vca
DEMO_STEPS ?= 700
DEMO_DIR ?= results/demo-$(subst /,-,$(DEMO_MODEL))-$(DEMO_ATTENTION)
DEMO_CKPT = $(DEMO_DIR)/checkpoints/$(shell printf '%07d' $(DEMO_STEPS)).pt
DEMO_SAMPLER = $(if $(findstring SiT,$(DEMO_MODEL)),--sampler ode --ode-method heun --num-sampling-steps 12,--sampler ddim --num-sampling-steps 50)

demo: $(STAMP)
	$(PY) train.py --data-path synthetic:20000 --image-size 32 --vae none \
	    --model $(DEMO_MODEL) --attention $(DEMO_ATTENTION) --global-batch-size 32 --lr 2e-3 \
	    --ema-decay 0.995 --max-steps $(DEMO_STEPS) --ckpt-every $(DEMO_STEPS) --log-every 100 \
	    --num-workers 0 --results-dir $(DEMO_DIR) --resume
	$(PY) sample.py --ckpt $(DEMO_CKPT) --class-labels 0 1 2 3 4 5 6 7 8 9 --per-class 4 \
	    --cfg-scale 2.0 $(DEMO_SAMPLER) --out $(DEMO_DIR)/grid.png
	$(PY) evaluate_fid.py --ckpt $(DEMO_CKPT) --ref synthetic --num-samples 200 --batch-size 50 \
	    --cfg-scale 2.0 $(DEMO_SAMPLER) --sample-dir $(DEMO_DIR)/eval --json $(DEMO_DIR)/eval.json
	@echo "grid:       $(DEMO_DIR)/grid.png"
	@echo "log:        $(DEMO_DIR)/log.txt"
	@echo "loss curve: $(DEMO_DIR)/loss.png"
	@echo "metrics:    $(DEMO_DIR)/eval.json"

bench: $(STAMP)
	$(PY) -m bench.attention --widths S XL --tokens 256 1024 4096 --out bench/results/attention.json
	$(PY) -m bench.train_step --model DiT-S/2 --image-size 256 --batch 4 --steps 2
	$(PY) -m bench.sampling --batch 1 --steps 25
	$(PY) -m bench.report

clean:
	rm -rf $(VENV)

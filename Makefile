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

.PHONY: setup demo study bias-study test summary benchmark explain clean

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

clean:
	rm -rf $(VENV) workdir

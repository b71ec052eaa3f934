# MedCLS: two commands on a fresh machine.
#   make run   - create .venv, install requirements, start the app on the shipped models
#   make test  - the same set-up plus test requirements, then the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PORT   ?= 8501
DATA   ?= ../shared/data

.PHONY: run test test-fast bench bench-medmnist fuzz venv clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: requirements.txt pyproject.toml $(VENV)/bin/activate
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .  # medcls and ui importable from anywhere
	touch $@

$(VENV)/.installed-test: requirements-test.txt requirements-ray.txt requirements-train.txt $(VENV)/.installed
	$(PY) -m pip install -q -r requirements-test.txt -r requirements-ray.txt -r requirements-train.txt
	touch $@

venv: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m streamlit run app.py --server.port $(PORT)

# Two test processes (pytest-xdist), one test file each at a time: the suite waits on servers and
# browsers about as much as it computes, so two cores finish it in about 70% of the serial time.
TEST_JOBS ?= 2
test: $(VENV)/.installed-test
	MEDCLS_DATA=$(DATA) $(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --durations=40

# Everything but the browser, load and Ray cluster tests.
test-fast: $(VENV)/.installed-test
	MEDCLS_DATA=$(DATA) $(PY) -m pytest -q -m "not browser and not load and not cluster"

bench: $(VENV)/.installed-test
	MEDCLS_DATA=$(DATA) $(PY) -m bench.all --data $(DATA)

# Trains the MedMNIST benchmark runs (tens of minutes on 2 cores), then writes bench/results/medmnist.json.
bench-medmnist: $(VENV)/.installed-test
	$(PY) -m bench.medmnist --data $(DATA)

# The long fuzz run recorded in the README (10,000+ cases).
fuzz: $(VENV)/.installed-test
	MEDCLS_DATA=$(DATA) MEDCLS_FUZZ_EXAMPLES=10000 $(PY) -m pytest -q tests/io/test_fuzz.py

clean:
	rm -rf $(VENV) .pytest_cache test-output

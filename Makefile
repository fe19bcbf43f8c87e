VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

# Installs go through uv (about 3x faster than pip on a fresh clone: benchmarks/RESULTS.md), with the
# same inputs as before: requirements*.txt, constraints.txt, pyproject.toml. A uv already on PATH is
# used; else uv is installed from PyPI into the venv with the venv's own pip.
UV_VERSION ?= 0.13.9
UV ?= $(or $(shell command -v uv 2>/dev/null),$(VENV)/bin/uv)
# uv does not read pip's configuration: hand it the extra indexes and wheel folders pip is configured
# with (on some machines torch comes from a local index), and pick the best version across all
# indexes as pip does.
PIP_EXTRA_INDEXES := $(shell python3 -m pip config get global.extra-index-url 2>/dev/null)
PIP_FIND_LINKS_CFG := $(shell python3 -m pip config get global.find-links 2>/dev/null) $(PIP_FIND_LINKS)
UV_PIP = $(UV) pip install -q --python $(PY) --index-strategy unsafe-best-match \
	$(foreach u,$(PIP_EXTRA_INDEXES),--extra-index-url $(u)) \
	$(foreach d,$(sort $(PIP_FIND_LINKS_CFG)),--find-links $(d))

.PHONY: run test venv clean

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	test -x $(UV) || $(PIP) install -q uv==$(UV_VERSION)
	$(UV_PIP) -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(UV_PIP) -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

# Runs the main job on a small generated demo cohort with embedded defaults.
run: $(VENV)/.installed
	$(PY) -m zeus_ray.demo

test: $(VENV)/.installed-dev
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache demo_output

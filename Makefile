# tfgpud — the README's commands. `make run` and `make test` work on a fresh Debian/Ubuntu machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
FAKEDRIVER := build/fakedriver
CONFIG ?= config/local.toml
APT_TEST_PKGS := prometheus prometheus-alertmanager libsystemd-dev pkg-config gcc make
# packaging tests: the .deb is built with dpkg-deb and checked by lintian; TLS scrapes by curl
APT_TEST_PKGS += curl openssl lintian shellcheck systemd
# the page at / is tested in a real headless browser (tests/e2e/test_page_browser.py)
APT_TEST_PKGS += chromium

.PHONY: run demo test lint fakedriver bench apt-test-deps venv clean deb

# --- environments -----------------------------------------------------------------------------

# Runtime venv: the daemon, its dependencies, TensorFlow (so the default config can probe it),
# and systemd-python where libsystemd's headers are there to build it.
$(VENV)/.run-stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e '.[tensorflow]'
	if pkg-config --exists libsystemd 2>/dev/null; then $(PIP) install -q -e '.[systemd]'; fi
	touch $@

$(VENV)/.test-stamp: $(VENV)/.run-stamp pyproject.toml
	$(PIP) install -q -e '.[test]'
	touch $@

venv: $(VENV)/.run-stamp

# Debian packages the tests run for real. Installed only as root; otherwise say what is missing.
apt-test-deps:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(APT_TEST_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	  fi; \
	else echo "not root: not installing $(APT_TEST_PKGS); tests needing them are skipped"; fi

# --- the simulated NVIDIA driver ----------------------------------------------------------------

fakedriver:
	$(MAKE) -C tests/fakedriver OUT=$(abspath $(FAKEDRIVER))

# --- commands -------------------------------------------------------------------------------------

run: $(VENV)/.run-stamp
	$(VENV)/bin/tfgpud run --config $(CONFIG)

# A simulated two-GPU workstation; edit build/demo/workstation.scenario.toml while it runs.
demo: $(VENV)/.run-stamp fakedriver
	mkdir -p build/demo
	sed 's|@ROOT@|$(CURDIR)|g' config/demo/demo.toml.in > build/demo/demo.toml
	test -f build/demo/workstation.scenario.toml || \
	  cp config/demo/workstation.scenario.toml build/demo/workstation.scenario.toml
	TFGPUD_FAKE_DRIVER=$(CURDIR)/build/demo/workstation.scenario.toml \
	  $(VENV)/bin/tfgpud run --config build/demo/demo.toml

lint: $(VENV)/.test-stamp
	$(VENV)/bin/ruff check tfgpud tests benchmarks
	$(VENV)/bin/ruff format --check tfgpud tests benchmarks
	$(VENV)/bin/mypy

test: apt-test-deps $(VENV)/.test-stamp fakedriver
	$(MAKE) lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Debian package: /opt/tfgpud venv (no TensorFlow), unit, sysusers, tmpfiles, conffile.
deb: $(VENV)/.run-stamp
	PY=$(PY) bash packaging/debian/build.sh build/deb

bench: $(VENV)/.test-stamp fakedriver
	$(PY) -m benchmarks

clean:
	rm -rf build .mypy_cache .ruff_cache .pytest_cache

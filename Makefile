# tfgpud — the README's commands. `make run` and `make test` work on a fresh Debian/Ubuntu machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
FAKEDRIVER := build/fakedriver
CONFIG ?= config/local.toml
APT_TEST_PKGS := prometheus prometheus-alertmanager gcc make
# packaging tests: the .deb is built with dpkg-deb (its library dependencies by dpkg-shlibdeps)
# and checked by lintian; TLS scrapes by curl
APT_TEST_PKGS += curl openssl lintian shellcheck systemd dpkg-dev binutils
# the package under a real systemd: a Debian 12 minbase booted in systemd-nspawn
APT_TEST_PKGS += systemd-container debootstrap
# the page at / is tested in a real headless browser (tests/e2e/test_page_browser.py)
APT_TEST_PKGS += chromium

.PHONY: run demo demo-files test lint fakedriver bench apt-test-deps venv clean deb nspawn-rootfs

# --- environments -----------------------------------------------------------------------------

# Runtime venv: the daemon, its dependencies, TensorFlow (so the default config can probe it).
# The journal is written with its native protocol (tfgpud/systemd.py): no systemd-python.
$(VENV)/.run-stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e '.[tensorflow]'
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
# build/fakedriver: libnvidia-ml.so.1, libcuda.so.1; build/fakedriver/cuda-userspace: the
# simulated CUDA user-space (cudart, cuBLAS, cuFFT, cuSOLVER, cuSPARSE, cuDNN 9 and 8).

fakedriver:
	$(MAKE) -C tests/fakedriver OUT=$(abspath $(FAKEDRIVER))

# --- commands -------------------------------------------------------------------------------------

run: $(VENV)/.run-stamp
	$(VENV)/bin/tfgpud run --config $(CONFIG)

# A simulated two-GPU workstation on which TensorFlow can use both GPUs. Edit
# build/demo/workstation.scenario.toml or remove a library from build/demo/cuda while it runs;
# both are kept across runs (`rm -r build/demo` starts afresh).
DEMO ?= build/demo
DEMO_DIR = $(abspath $(DEMO))
CUDA_USERSPACE := $(FAKEDRIVER)/cuda-userspace

demo: $(VENV)/.run-stamp demo-files
	TFGPUD_FAKE_DRIVER=$(DEMO_DIR)/workstation.scenario.toml \
	  $(VENV)/bin/tfgpud run --config $(DEMO)/demo.toml

# The demo's configuration, scenario and CUDA user-space (the seven libraries TensorFlow 2.21
# dlopens: not cuDNN 8) in $(DEMO).
demo-files: fakedriver
	mkdir -p $(DEMO)/cuda
	sed -e 's|@DEMO@|$(DEMO_DIR)|g' -e 's|@ROOT@|$(CURDIR)|g' config/demo/demo.toml.in \
	  > $(DEMO)/demo.toml
	test -f $(DEMO)/workstation.scenario.toml || \
	  cp config/demo/workstation.scenario.toml $(DEMO)/workstation.scenario.toml
	test -f $(DEMO)/cuda/.laid-out || { \
	  cp $(CUDA_USERSPACE)/*.so.1[12] $(CUDA_USERSPACE)/libcudnn.so.9 $(DEMO)/cuda/ && \
	  touch $(DEMO)/cuda/.laid-out; }

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

# The root file system tests/e2e/test_systemd_nspawn.py boots (Debian 12 minbase + systemd, a
# TensorFlow venv), cached in build/nspawn/ by a hash of its contents; the test builds it itself
# when missing (~1-3 min, as root), this target only warms the cache.
nspawn-rootfs: $(VENV)/.run-stamp
	$(PY) tests/e2e/nspawn.py

bench: $(VENV)/.test-stamp fakedriver
	$(PY) -m benchmarks

clean:
	rm -rf build .mypy_cache .ruff_cache .pytest_cache

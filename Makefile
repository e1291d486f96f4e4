# vip-elector — the two commands a newcomer needs:
#   make demo    a live local demo: a Consul dev agent, three electors, a handover
#   make test    install what the tests need (apt, Consul, vip-manager) and run them all
PYTHON  ?= /usr/bin/python3
CACHE   ?= /var/cache/vip-elector-test
export VIP_ELECTOR_CACHE := $(CACHE)
PYTEST  := $(PYTHON) -m pytest -ra -p no:cacheprovider
OTHER_LIBS := $(CACHE)/python3-consul/usr/lib/python3/dist-packages $(CACHE)/py-consul

.PHONY: all deps rootfs test unit compat demo demo-vip bench chaos deb clean

all: test

# Consul, vip-manager, the other Consul libraries and apt packages (cached).
deps:
	tests/tools/fetch-deps

# The booted-systemd test containers' trees (cached, built when missing or
# when their package lists change): bookworm (~1 min to build) and trixie,
# with trixie's lintian (~2 min).
rootfs: deps
	tests/tools/rootfs --suite bookworm >/dev/null
	tests/tools/rootfs --suite trixie >/dev/null

# Everything: unit tests, the real-Consul suite (with each of the three Consul
# libraries), the booted-systemd container and .deb tests, the vip-manager
# end-to-end test.
# The compat runs go beside the main suite: they are light (a dev agent on free
# ports each, ~45 s of CPU in 5 minutes) and would otherwise add 5 minutes;
# their output is kept and shown after the suite's.
test: deps rootfs
	@log=$$(mktemp /tmp/vip-elector-compat.XXXXXX); \
	$(MAKE) --no-print-directory compat >$$log 2>&1 & compat=$$!; \
	$(PYTEST) tests; suite=$$?; \
	wait $$compat; other=$$?; \
	echo "== make compat (run beside the suite above)"; cat $$log; rm -f $$log; \
	echo "== make test: the suite exited $$suite, make compat $$other"; \
	test $$suite -eq 0 && test $$other -eq 0

# The real-Consul election tests again, with python-consul 0.7.1 (bookworm,
# what Patroni uses) and py-consul 1.5 (what trixie ships) in place of
# python3-consul2: the adapter must work with each (SPEC §7).
compat: deps
	set -e; for lib in $(OTHER_LIBS); do \
	  echo "== with the consul library from $$lib"; \
	  PYTHONPATH=$$lib $(PYTEST) -m compat tests; \
	done

# Fast: no Consul, no containers.
unit:
	$(PYTEST) -m "not consul and not container and not e2e" tests

demo: deps
	$(PYTHON) tests/tools/demo

demo-vip: deps
	$(PYTHON) tests/tools/demo --vip-manager

bench: deps
	$(PYTHON) tests/tools/bench

# Random faults of SPEC §9.6 on the three-server cluster lab for MINUTES
# minutes, invariants checked throughout (not part of `make test`).
# FENCE=1: every elector with the example fencing hook.
# VIP=1: every elector with --manage-vip, no vip-manager (SPEC §12).
MINUTES ?= 10
FENCE   ?=
VIP     ?=
chaos: deps
	$(PYTHON) tests/tools/chaos --minutes $(MINUTES) $(if $(filter 1 yes true,$(FENCE)),--fence) \
		$(if $(filter 1 yes true,$(VIP)),--manage-vip)

# Build the Debian package into the parent directory and check it with lintian.
# A clean PATH: a pyenv/virtualenv python3 first in PATH would make pybuild
# build and test with the wrong interpreter.
DEB_ENV := env -u PYTHONPATH PATH=/usr/sbin:/usr/bin:/sbin:/bin
DEB_VERSION = $(shell dpkg-parsechangelog -S Version)
DEB_CHANGES = ../vip-elector_$(DEB_VERSION)_$(shell dpkg --print-architecture).changes
deb:
	$(DEB_ENV) dpkg-buildpackage -us -uc -b
	$(DEB_ENV) lintian --fail-on error,warning $(DEB_CHANGES)
	@ls -l ../vip-elector_$(DEB_VERSION)_all.deb

clean:
	rm -rf build .pybuild *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +

# qmpnet: `make demo` runs the main job, `make test` every test tier. Both set up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := qemu-system-x86 qemu-utils iproute2 kmod ethtool iperf3 busybox-static \
	containernetworking-plugins systemd man-db groff-base zsh containerd runc \
	golang-go golang-github-appc-cni-dev
BENCH_APT_PACKAGES := libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients time
PYTEST_ARGS ?=

.PHONY: cni-shim install-cni cli-shim install-cli install-units docs man completion install-docs setup apt venv test test-unit test-kernel test-integration lint demo bench soak clean

setup: apt venv

# Install only what is missing: apt-get update costs time and needs the network.
apt:
	@missing=$$(for p in $(APT_PACKAGES) $(EXTRA_APT); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "apt: installing $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$missing; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# compat mode: a .pth path entry, not the editable finder that costs every start ~13 ms
venv: $(BIN)/python
	@$(BIN)/pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e '.[dev]'
	@# compiled once here: with PYTHONDONTWRITEBYTECODE set, every start would compile again
	@$(BIN)/python -m compileall -q qmpnet

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/pytest tests -m "not kernel and not qemu" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy qmpnet bench

demo: setup
	$(BIN)/qmpnet demo

bench: EXTRA_APT = $(BENCH_APT_PACKAGES)
bench: setup
	$(BIN)/python -m bench

soak: setup
	QMPNET_SOAK_CYCLES=500 QMPNET_SOAK_KEPT_CYCLES=1000 QMPNET_SOAK_SERVICE_CYCLES=1000 \
		$(BIN)/pytest integration/test_soak.py integration/test_service_soak.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# systemd units for qmpnetd, with ExecStart pointing at this install's qmpnetd
UNIT_DIR ?= /etc/systemd/system
QMPNETD ?= $(shell command -v qmpnetd || echo $(abspath $(BIN))/qmpnetd)
install-units:
	install -d $(DESTDIR)$(UNIT_DIR)
	install -m 0644 contrib/systemd/qmpnetd.socket $(DESTDIR)$(UNIT_DIR)/
	sed 's|/usr/local/bin/qmpnetd|$(QMPNETD)|' contrib/systemd/qmpnetd.service \
		> $(DESTDIR)$(UNIT_DIR)/qmpnetd.service
	chmod 0644 $(DESTDIR)$(UNIT_DIR)/qmpnetd.service
	@echo "then: systemctl daemon-reload && systemctl enable --now qmpnetd.socket"

# the compiled qmpnet-cni front for a node's CNI bin_dir: VERSION and every call qmpnetd takes
# cost a few ms instead of a Python start-up; it runs the Python plugin ($(QMPNET_CNI)) when
# no service takes a call. Offline, standard library only: Debian's golang-go builds it.
QMPNET_CNI ?= $(shell command -v qmpnet-cni 2>/dev/null | grep -v '^$(CNI_BIN_DIR)/' || \
	echo $(abspath $(BIN))/qmpnet-cni)
CNI_BIN_DIR ?= /opt/cni/bin
cni-shim: build/cni/qmpnet-cni
build/cni/qmpnet-cni: contrib/cni-shim/main.go
	@mkdir -p $(@D)
	GO111MODULE=off GOFLAGS= go build -trimpath \
		-ldflags "-s -w -X main.fullPlugin=$(QMPNET_CNI)" -o $@.partial $<
	@mv $@.partial $@
install-cni: build/cni/qmpnet-cni
	install -d $(DESTDIR)$(CNI_BIN_DIR)
	install -m 0755 build/cni/qmpnet-cni $(DESTDIR)$(CNI_BIN_DIR)/qmpnet-cni

# the compiled qmpnet front: a command line qmpnetd takes costs a few ms instead of a Python
# start-up; it runs the Python qmpnet ($(QMPNET)) for every other (no service, --direct, help).
QMPNET ?= $(shell command -v qmpnet 2>/dev/null | grep -v '^$(CLI_BIN_DIR)/' || \
	echo $(abspath $(BIN))/qmpnet)
CLI_BIN_DIR ?= /usr/local/bin
cli-shim: build/cli/qmpnet
build/cli/qmpnet: contrib/cli-shim/main.go
	@mkdir -p $(@D)
	GO111MODULE=off GOFLAGS= go build -trimpath \
		-ldflags "-s -w -X main.fullCli=$(QMPNET)" -o $@.partial $<
	@mv $@.partial $@
install-cli: build/cli/qmpnet
	install -d $(DESTDIR)$(CLI_BIN_DIR)
	install -m 0755 build/cli/qmpnet $(DESTDIR)$(CLI_BIN_DIR)/qmpnet

# man pages and shell completion, generated from the argparse parsers into $(DOCS_DIR)
DOCS_DIR ?= build
COMPLETION_PARSERS := qmpnet=qmpnet.cli.build_parser qmpnetd=qmpnet.service.daemon.build_parser

docs: man completion

man: $(BIN)/argparse-manpage
	$(BIN)/python contrib/docs/manpages.py $(DOCS_DIR)/man

completion: $(BIN)/shtab
	@mkdir -p $(DOCS_DIR)/completion/bash $(DOCS_DIR)/completion/zsh
	@set -e; for pair in $(COMPLETION_PARSERS); do \
		prog=$${pair%%=*}; parser=$${pair#*=}; \
		for shell in bash zsh; do \
			case $$shell in zsh) file=_$$prog;; *) file=$$prog;; esac; \
			out=$(DOCS_DIR)/completion/$$shell/$$file; \
			echo "shtab --shell=$$shell $$parser > $$out"; \
			$(BIN)/shtab --shell=$$shell --prog=$$prog --error-unimportable $$parser > $$out.tmp; \
			mv $$out.tmp $$out; \
		done; \
	done

# an older venv, set up before these were dev tools
$(BIN)/argparse-manpage $(BIN)/shtab:
	$(MAKE) venv

PREFIX ?= /usr/local
MAN_DIR ?= $(PREFIX)/share/man
BASH_COMPLETION_DIR ?= $(PREFIX)/share/bash-completion/completions
ZSH_COMPLETION_DIR ?= $(PREFIX)/share/zsh/site-functions
install-docs: docs
	install -d $(DESTDIR)$(MAN_DIR)/man1 $(DESTDIR)$(MAN_DIR)/man8 \
		$(DESTDIR)$(BASH_COMPLETION_DIR) $(DESTDIR)$(ZSH_COMPLETION_DIR)
	install -m 0644 $(DOCS_DIR)/man/qmpnet.1 $(DESTDIR)$(MAN_DIR)/man1/
	install -m 0644 $(DOCS_DIR)/man/qmpnetd.8 $(DOCS_DIR)/man/qmpnet-cni.8 $(DESTDIR)$(MAN_DIR)/man8/
	install -m 0644 $(DOCS_DIR)/completion/bash/qmpnet $(DOCS_DIR)/completion/bash/qmpnetd \
		$(DESTDIR)$(BASH_COMPLETION_DIR)/
	install -m 0644 $(DOCS_DIR)/completion/zsh/_qmpnet $(DOCS_DIR)/completion/zsh/_qmpnetd \
		$(DESTDIR)$(ZSH_COMPLETION_DIR)/

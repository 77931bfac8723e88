# Background agent targets, included by the top-level Makefile (`include mk/agent.mk`).
#
#   make install-agent [AGENT=launchd|systemd]   install or upgrade, then (re)start the agent
#   make uninstall-agent [AGENT=…]               stop and remove it; config, credentials, logs stay
#   make logs [LOGS_ARGS=…]                      follow the structured log (tinyserve-backup logs -f)
#
# The agent runs from a venv of its own, outside this checkout, so deleting or switching the
# checkout never breaks it:
#   macOS  ~/Library/Application Support/tinyserve-backup/venv
#   Linux  ${XDG_DATA_HOME:-~/.local/share}/tinyserve-backup/venv
#   ($TINYSERVE_BACKUP_HOME/venv when that is set; tests use it.)
# Everything past the venv (config, plist/unit, launchctl/systemctl) is done by
# `tinyserve-backup agent install` in Python (daemon/agent.py).

PYTHON ?= python3
VENV ?= .venv
# Where `pip install` takes the project from (this checkout).
AGENT_SRC ?= $(CURDIR)
# Extra `pip install` flags, e.g. --no-deps --no-build-isolation in the fast test.
AGENT_PIP_FLAGS ?=
LOGS_ARGS ?=

# Same rule as daemon.paths.data_home(); computed by the shell at recipe time, because the path
# has a space on macOS, which make's own functions cannot carry.
AGENT_HOME_SH = if [ -n "$$TINYSERVE_BACKUP_HOME" ]; then printf '%s' "$$TINYSERVE_BACKUP_HOME"; \
	elif [ "$$(uname -s)" = Darwin ]; then printf '%s' "$$HOME/Library/Application Support/tinyserve-backup"; \
	else printf '%s' "$${XDG_DATA_HOME:-$$HOME/.local/share}/tinyserve-backup"; fi
AGENT_KIND_ARG = $(if $(AGENT),--kind $(AGENT))

.PHONY: install-agent uninstall-agent logs agent-home

agent-home:
	@$(AGENT_HOME_SH); echo

install-agent:
	@set -e; \
	if [ "$$(id -u)" = 0 ] && [ -n "$$SUDO_USER" ]; then \
		echo "error: the agent is per-user — run make install-agent as yourself, without sudo" >&2; exit 1; \
	fi; \
	if ! $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
		echo "error: $(PYTHON) is missing or older than Python 3.11 — install Python 3.11+ and run make install-agent PYTHON=python3.12 (for example)" >&2; exit 1; \
	fi; \
	home="$$($(AGENT_HOME_SH))"; venv="$$home/venv"; \
	if [ -x "$$venv/bin/python" ] && "$$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
		echo "==> Upgrading the agent's venv: $$venv"; \
	else \
		echo "==> Creating the agent's venv: $$venv"; \
		mkdir -p "$$home"; \
		$(PYTHON) -m venv --clear "$$venv"; \
	fi; \
	echo "==> Installing tinyserve-backup from $(AGENT_SRC) into it (pip; the first time takes a minute)"; \
	rm -rf "$(AGENT_SRC)/build"; \
	"$$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade $(AGENT_PIP_FLAGS) "$(AGENT_SRC)"; \
	echo "==> Installing the agent"; \
	TINYSERVE_BACKUP_HOME="$$home" "$$venv/bin/tinyserve-backup" agent install $(AGENT_KIND_ARG)

uninstall-agent:
	@home="$$($(AGENT_HOME_SH))"; prog="$$home/venv/bin/tinyserve-backup"; \
	if [ -x "$$prog" ] && "$$prog" --help >/dev/null 2>&1; then :; \
	elif [ -x "$(VENV)/bin/tinyserve-backup" ]; then prog="$(VENV)/bin/tinyserve-backup"; \
	else \
		echo "error: no working tinyserve-backup in $$home/venv or $(VENV) to run the uninstall — run make install-agent (or make run) first, then make uninstall-agent" >&2; exit 1; \
	fi; \
	TINYSERVE_BACKUP_HOME="$$home" "$$prog" agent uninstall $(AGENT_KIND_ARG)

logs:
	@home="$$($(AGENT_HOME_SH))"; prog="$$home/venv/bin/tinyserve-backup"; \
	if [ ! -x "$$prog" ]; then prog="$(VENV)/bin/tinyserve-backup"; fi; \
	if [ ! -x "$$prog" ]; then \
		echo "error: tinyserve-backup is not installed — run make install-agent first" >&2; exit 1; \
	fi; \
	exec "$$prog" logs -f $(LOGS_ARGS)

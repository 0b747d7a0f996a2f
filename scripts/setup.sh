#!/usr/bin/env bash
# Prepare a fresh Debian/Ubuntu host to run Catalyst International from this checkout. Safe to run again: every
# step checks first and only does what is missing. --dry-run prints what it would do and changes nothing.
set -euo pipefail

usage() {
	cat <<'EOF'
Usage: sudo scripts/setup.sh [--dry-run] [--user NAME]

Prepares this Debian/Ubuntu host to run the agent from this checkout (run it from where the checkout will stay,
e.g. /opt/catalyst). Every step checks first, so running it again only does what is missing:

  1. system packages   python3-venv, make, cron, netcat-openbsd, openssl, docker (docker.io unless Docker is
                       already installed) and its compose plugin
  2. service user      a system user (default: catalyst) in the docker group, so the health check can restart
                       the OpenD container
  3. folders           logs/ and var/, owned by the service user
  4. .env              copied from .env.example if missing (never overwritten), mode 600: fill it in
  5. virtualenv        make venv (.venv with requirements-dev.txt)
  6. OpenD container   docker compose -f docker-compose.opend.yml up -d (once FUTU_USER is filled in .env)
  7. cron schedule     scripts/install_cron.sh --install, as the service user

Options:
  --dry-run     print every step and what it would run; change nothing (no root needed)
  --user NAME   the service user (default: catalyst)
  -h, --help    this help

Needs root (sudo) unless --dry-run. The host's clock should be UTC: the cron times are UTC.
EOF
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
DRY_RUN=0
SERVICE_USER="catalyst"
STEPS=7
APT_UPDATED=0

while (($# > 0)); do
	case "$1" in
	--dry-run) DRY_RUN=1 ;;
	--user)
		[[ $# -ge 2 && -n "$2" ]] || {
			echo "setup.sh: --user needs a name" >&2
			exit 2
		}
		SERVICE_USER="$2"
		shift
		;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		echo "setup.sh: unknown argument '$1'" >&2
		usage >&2
		exit 2
		;;
	esac
	shift
done
[[ "$SERVICE_USER" =~ ^[a-z_][a-z0-9_-]*$ ]] || {
	echo "setup.sh: '$SERVICE_USER' is not a valid user name" >&2
	exit 2
}

# ------------------------------------------------------------------------------------------------ helpers

step() { # number title
	printf '\n[%s/%s] %s\n' "$1" "$STEPS" "$2"
}

ok() {
	printf '  ok: %s\n' "$*"
}

info() {
	printf '  %s\n' "$*"
}

run() { # a command that changes the system: printed, and run unless --dry-run
	local shown
	shown="$(printf ' %q' "$@")"
	if ((DRY_RUN)); then
		printf '  would run:%s\n' "$shown"
	else
		printf '  running:%s\n' "$shown"
		"$@"
	fi
}

as_service_user() { # command... run as the service user
	if command -v runuser >/dev/null 2>&1; then
		run runuser -u "$SERVICE_USER" -- "$@"
	else
		run sudo -u "$SERVICE_USER" -- "$@"
	fi
}

die() {
	echo "setup.sh: $*" >&2
	exit 1
}

is_installed() { # Debian package name
	dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

apt_update_once() {
	if ((APT_UPDATED == 0)); then
		run apt-get update
		APT_UPDATED=1
	fi
}

apt_has() { # package -> is it known to apt (after apt-get update)?
	[[ -n "$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2 }' | grep -v '(none)' || true)" ]]
}

compose_works() {
	docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1
}

compose() { # docker compose or the older docker-compose, whichever this host has
	if docker compose version >/dev/null 2>&1; then
		run docker compose "$@"
	else
		run docker-compose "$@"
	fi
}

user_exists() {
	id -u "$SERVICE_USER" >/dev/null 2>&1
}

env_value() { # NAME -> its value in .env (empty if unset)
	sed -n "s/^$1=//p" "$REPO/.env" 2>/dev/null | tail -n 1 | tr -d "\"' \r"
}

# ------------------------------------------------------------------------------------------------- checks

if ((DRY_RUN)); then
	echo "setup.sh: DRY RUN for $REPO: nothing is changed, each change is printed as 'would run'."
else
	[[ "$(id -u)" -eq 0 ]] || die "run it as root (sudo scripts/setup.sh), or try --dry-run first"
	echo "setup.sh: preparing this host for $REPO (service user: $SERVICE_USER)"
fi
if [[ -r /etc/os-release ]] && grep -qiE '^(ID|ID_LIKE)=.*(debian|ubuntu)' /etc/os-release; then
	:
elif ((DRY_RUN)); then
	info "warning: this does not look like Debian/Ubuntu; the real run would stop here"
else
	die "this script supports Debian and Ubuntu only (apt, dpkg); see README for the steps to do by hand"
fi
case "$REPO" in
/root | /root/*)
	info "warning: the checkout is under /root, which the service user cannot enter; move it to e.g. /opt/catalyst"
	;;
esac

# ----------------------------------------------------------------------------------------- 1. packages

step 1 "system packages"
wanted=(python3 python3-venv make cron netcat-openbsd openssl ca-certificates)
missing=()
for pkg in "${wanted[@]}"; do
	is_installed "$pkg" || missing+=("$pkg")
done
if command -v docker >/dev/null 2>&1; then
	ok "docker is installed ($(command -v docker))"
else
	missing+=(docker.io)
fi
if ((${#missing[@]} > 0)); then
	apt_update_once
	run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
else
	ok "${wanted[*]} are installed"
fi
if compose_works; then
	ok "docker compose is available"
else
	# Docker's own repository calls it docker-compose-plugin, Ubuntu docker-compose-v2, Debian docker-compose.
	apt_update_once
	compose_pkg=""
	for candidate in docker-compose-plugin docker-compose-v2 docker-compose; do
		if apt_has "$candidate"; then
			compose_pkg="$candidate"
			break
		fi
	done
	if [[ -n "$compose_pkg" ]]; then
		run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$compose_pkg"
	elif ((DRY_RUN)); then
		info "would install the first available of: docker-compose-plugin docker-compose-v2 docker-compose"
	else
		die "no docker compose package found (tried docker-compose-plugin, docker-compose-v2, docker-compose)"
	fi
fi
if python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
	ok "$(python3 --version) is 3.11 or newer"
elif ((DRY_RUN)); then
	info "warning: python3 is missing or older than 3.11; the agent needs 3.11+"
else
	die "python3 $(python3 --version 2>&1) is older than 3.11; install 3.11+ (e.g. Debian 12, Ubuntu 24.04) first"
fi
if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
	for service in docker cron; do
		if systemctl is-active --quiet "$service" 2>/dev/null; then
			ok "$service service is running"
		else
			run systemctl enable --now "$service"
		fi
	done
else
	info "no systemd here: make sure the docker and cron services start at boot"
fi

# -------------------------------------------------------------------------------------- 2. service user

step 2 "service user $SERVICE_USER"
if user_exists; then
	ok "user $SERVICE_USER exists"
else
	run useradd --system --user-group --create-home --home-dir "/var/lib/$SERVICE_USER" \
		--shell /usr/sbin/nologin "$SERVICE_USER"
fi
if user_exists && id -nG "$SERVICE_USER" | tr ' ' '\n' | grep -qx docker; then
	ok "$SERVICE_USER is in the docker group"
else
	# Membership of the docker group is root-equivalent; it is what lets the health check restart OpenD.
	run usermod -aG docker "$SERVICE_USER"
fi

# ------------------------------------------------------------------------------------------- 3. folders

step 3 "folders logs/ and var/"
for folder in logs var; do
	path="$REPO/$folder"
	if [[ -d "$path" ]] && user_exists && [[ "$(stat -c %U "$path")" == "$SERVICE_USER" ]]; then
		ok "$path exists and belongs to $SERVICE_USER"
	else
		[[ -d "$path" ]] || run mkdir -p "$path"
		run chown -R "$SERVICE_USER:" "$path"
	fi
done

# ----------------------------------------------------------------------------------------------- 4. .env

step 4 ".env (secrets)"
if [[ -e "$REPO/.env" ]]; then
	ok "$REPO/.env exists (never overwritten)"
	mode="$(stat -c %a "$REPO/.env")"
	[[ "$mode" == "600" || "$mode" == "400" ]] ||
		info "warning: .env is mode $mode; it holds passwords: chmod 600 $REPO/.env"
else
	run install -m 600 -o "$SERVICE_USER" -g "$SERVICE_USER" "$REPO/.env.example" "$REPO/.env"
	info "fill in $REPO/.env (FUTU_USER, FUTU_PWD, ANTHROPIC_API_KEY, SMTP_*), then run this script again"
fi

# ----------------------------------------------------------------------------------------- 5. virtualenv

step 5 "virtualenv .venv"
if [[ -x "$REPO/.venv/bin/python" ]] && command -v make >/dev/null 2>&1 && make -C "$REPO" -q venv >/dev/null 2>&1; then
	ok "$REPO/.venv is up to date"
else
	run make -C "$REPO" venv
fi

# ----------------------------------------------------------------------------------- 6. OpenD container

step 6 "OpenD container (docker-compose.opend.yml)"
compose_file="$REPO/docker-compose.opend.yml"
if [[ -z "$(env_value FUTU_USER)" ]]; then
	info "skipped: FUTU_USER is empty in $REPO/.env; fill it in, then run this script again or:"
	info "  docker compose -f $compose_file up -d"
elif compose_works && [[ -n "$(docker ps -q --filter name=^catalyst-opend$ --filter status=running 2>/dev/null)" ]]; then
	ok "container catalyst-opend is running"
else
	compose -f "$compose_file" up -d
	info "watch the login: docker logs -f catalyst-opend (Futu may ask for a verification code; see the compose file)"
fi

# ------------------------------------------------------------------------------------------------ 7. cron

step 7 "cron schedule (as $SERVICE_USER)"
# install_cron.sh is idempotent: it replaces its own block and keeps every other line.
as_service_user "$REPO/scripts/install_cron.sh" --install

echo
if ((DRY_RUN)); then
	echo "setup.sh: dry run finished; nothing was changed."
else
	echo "setup.sh: done. Check: scripts/health_check.sh, then $REPO/.venv/bin/python $REPO/agent.py --help"
fi

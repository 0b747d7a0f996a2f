#!/usr/bin/env bash
# The agent's cron schedule: print it, or install/remove it in the current user's crontab between marker lines.
set -euo pipefail

usage() {
	cat <<'EOF'
Usage: scripts/install_cron.sh [--install | --uninstall | --help]

  (no option)   print the schedule for this checkout
  --install     put it in the current user's crontab (replacing an earlier copy; other lines are kept)
  --uninstall   remove it from the current user's crontab

The schedule (times in UTC; Hong Kong is UTC+8 with no daylight saving), Monday to Friday:
  01:30, 05:00          trading cycles (09:30 and 13:00 HKT): agent.py
  01:32-07:57 every 5'  the guard (09:32-15:57 HKT): agent.py --guard. Its minutes end in 2 and 7, so a guard
                        never starts in the same minute as a cycle; a cycle that still finds one running waits
                        for it (agent.lock_wait_s), while a guard yields to a running cycle at once.
  08:20                 the daily digest e-mail (16:20 HKT): agent.py --digest
  08:30                 journal backup (16:30 HKT, after the close): scripts/backup.sh
  08:45 (every day)     log retention and rotation: python -m data.housekeeping
  every 5 minutes       scripts/health_check.sh (every day: OpenD must stay up)
The agent itself skips holidays, half-day afternoons and the lunch break.

Each line loads the checkout's .env (if readable), runs with the checkout's .venv python and appends its output
to logs/cron.log. Paths are absolute, taken from where this script lives. The host clock must be UTC (cron reads
the times in the system time zone); the script warns if it is not.
EOF
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
PY="$REPO/.venv/bin/python"
MARK_BEGIN="# >>> catalyst-international (managed by scripts/install_cron.sh; changes inside are overwritten) >>>"
MARK_END="# <<< catalyst-international <<<"

die() {
	echo "install_cron.sh: $*" >&2
	exit 2
}

mode="print"
case "${1:-}" in
"") ;;
--install) mode="install" ;;
--uninstall) mode="uninstall" ;;
-h | --help)
	usage
	exit 0
	;;
*)
	echo "install_cron.sh: unknown argument '$1'" >&2
	usage >&2
	exit 2
	;;
esac
(($# <= 1)) || die "one option at a time (got: $*)"

# Paths go into crontab lines unquoted, run by /bin/sh: allow only characters that need no quoting there.
[[ "$REPO" =~ ^[A-Za-z0-9/._+-]+$ ]] ||
	die "the checkout path '$REPO' has characters unsafe in a crontab line; move it (e.g. to /opt/catalyst)"

job() { # schedule command-and-arguments -> one crontab line
	printf '%s cd %s && { set -a; [ ! -r .env ] || . ./.env; set +a; %s; } >> %s/logs/cron.log 2>&1\n' \
		"$1" "$REPO" "$2" "$REPO"
}

block() {
	printf '%s\n' "$MARK_BEGIN"
	printf '%s\n' "# Times are UTC (HKT = UTC+8). Checkout: $REPO"
	printf '%s\n' "# Trading cycles at 09:30 and 13:00 HKT"
	job "30 1 * * 1-5" "$PY $REPO/agent.py"
	job "0 5 * * 1-5" "$PY $REPO/agent.py"
	printf '%s\n' "# Guard every 5 minutes, 09:32-15:57 HKT (never in a cycle's minute)"
	job "32-57/5 1 * * 1-5" "$PY $REPO/agent.py --guard"
	job "2-57/5 2-7 * * 1-5" "$PY $REPO/agent.py --guard"
	printf '%s\n' "# Daily digest e-mail (the day's report) at 16:20 HKT, after the close"
	job "20 8 * * 1-5" "$PY $REPO/agent.py --digest"
	printf '%s\n' "# Journal backup after the close (16:30 HKT); log retention and rotation every day"
	job "30 8 * * 1-5" "$REPO/scripts/backup.sh"
	job "45 8 * * *" "$PY -m data.housekeeping"
	printf '%s\n' "# OpenD health check and missed-run alarm, every 5 minutes"
	job "*/5 * * * *" "$REPO/scripts/health_check.sh"
	printf '%s\n' "$MARK_END"
}

warn_environment() {
	local offset
	offset="$(date +%z)"
	if [[ "$offset" != "+0000" ]]; then
		echo "install_cron.sh: warning: this host's time zone is not UTC (date +%z says $offset), but the times" \
			"above are UTC; set it with: timedatectl set-timezone Etc/UTC" >&2
	fi
	if [[ ! -x "$PY" ]]; then
		echo "install_cron.sh: warning: $PY does not exist yet; create it with: make -C $REPO venv" >&2
	fi
}

current_crontab() { # the user's crontab, empty if there is none; fails on any other error
	local output rc=0
	output="$(crontab -l 2>&1)" || rc=$?
	if ((rc == 0)); then
		printf '%s\n' "$output"
	elif [[ "$output" == *"no crontab for"* ]]; then
		return 0
	else
		echo "install_cron.sh: could not read the crontab (crontab -l exited $rc): $output" >&2
		exit 1
	fi
}

without_block() { # stdin without our block and without trailing blank lines
	awk -v begin="$MARK_BEGIN" -v end="$MARK_END" '
		$0 == begin { skipping = 1; next }
		$0 == end { skipping = 0; next }
		skipping { next }
		/^[[:space:]]*$/ { blanks = blanks $0 "\n"; next }
		{ printf "%s%s\n", blanks, $0; blanks = "" }
	'
}

write_crontab() { # stdin -> the user's crontab
	crontab - || {
		echo "install_cron.sh: crontab - failed; the crontab was not changed" >&2
		exit 1
	}
}

case "$mode" in
print)
	block
	warn_environment
	;;
install)
	current="$(current_crontab)"
	kept="$(printf '%s\n' "$current" | without_block)"
	if [[ -n "$kept" ]]; then
		wanted="$(printf '%s\n\n' "$kept"; block)"
	else
		wanted="$(block)"
	fi
	if [[ "$current" == "$wanted" ]]; then
		echo "install_cron.sh: the schedule is already installed and up to date:"
	else
		printf '%s\n' "$wanted" | write_crontab
		echo "install_cron.sh: installed in the crontab of $(id -un):"
	fi
	block
	warn_environment
	;;
uninstall)
	current="$(current_crontab)"
	if ! grep -qxF -- "$MARK_BEGIN" <<<"$current"; then
		echo "install_cron.sh: the crontab of $(id -un) has no catalyst schedule; nothing to remove"
		exit 0
	fi
	kept="$(printf '%s\n' "$current" | without_block)"
	if [[ -n "$kept" ]]; then
		printf '%s\n' "$kept" | write_crontab
	else
		: | write_crontab
	fi
	echo "install_cron.sh: removed the catalyst schedule from the crontab of $(id -un)"
	;;
esac

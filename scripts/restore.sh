#!/usr/bin/env bash
# Restore the journal from a backup written by scripts/backup.sh. The work is done by data/backup.py.
set -euo pipefail

usage() {
	cat <<'USAGE'
Usage: scripts/restore.sh FILE [--force] [--help]

Replaces the journal (DATABASE_URL, or the embedded PostgreSQL) with the backup FILE, in one transaction:
it either happens completely or not at all. FILE is checked with pg_restore --list first.

It refuses (exit 2, nothing changed):
  - a journal that already holds data, unless --force is given; with --force the current journal is first
    dumped to the backup folder as pre-restore-YYYYMMDDTHHMMSSZ.dump (verified), then replaced;
  - while an agent run holds an account lock (stop the schedule: scripts/install_cron.sh --uninstall).

After a restore the next agent run reconciles with the broker: orders journalled before the backup are
looked up by their client order id, positions the backup does not know are adopted under a default stop.

Exit status: 0 restored; 1 failed (the journal is unchanged); 2 bad usage, or refused.
Environment: DATABASE_URL, CATALYST_CONFIG; CATALYST_PYTHON (default the checkout's .venv/bin/python).
USAGE
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
file=""
force=()
while (($# > 0)); do
	case "$1" in
	-h | --help)
		usage
		exit 0
		;;
	--force)
		force=(--force)
		shift
		;;
	-*)
		echo "restore.sh: unknown argument '$1'" >&2
		usage >&2
		exit 2
		;;
	*)
		if [[ -n "$file" ]]; then
			echo "restore.sh: one FILE at a time (got '$file' and '$1')" >&2
			exit 2
		fi
		file="$1"
		shift
		;;
	esac
done
if [[ -z "$file" ]]; then
	echo "restore.sh: which backup? give the FILE to restore (see: ls var/backups)" >&2
	usage >&2
	exit 2
fi
# Relative to where the user stands, not to the checkout this script changes into.
[[ "$file" == /* ]] || file="$PWD/$file"

if [[ -n "${CATALYST_PYTHON:-}" ]]; then
	PY="$CATALYST_PYTHON"
elif [[ -x "$REPO/.venv/bin/python" ]]; then
	PY="$REPO/.venv/bin/python"
else
	PY="python3"
fi
cd "$REPO"
exec "$PY" -m data.backup restore "$file" "${force[@]}"

#!/usr/bin/env bash
# Journal backup (cron, nightly after the close): a verified pg_dump custom-format file in var/backups/, with
# retention. A failed backup alerts (high priority) and exits non-zero. The work is done by data/backup.py.
set -euo pipefail

usage() {
	cat <<'USAGE'
Usage: scripts/backup.sh [--dir DIR] [--help]

Dumps the journal (DATABASE_URL, or the embedded PostgreSQL in database.embedded_dir) with pg_dump in custom
format into backup.dir (default var/backups/) as journal-YYYYMMDDTHHMMSSZ.dump. The file is written under a
temporary name, checked with pg_restore --list and only then renamed, so a file with that name is always
complete. Then retention deletes older journal-*.dump files, keeping the newest of each of the last
backup.keep_daily days (14) and backup.keep_weekly weeks (8).

  --dir DIR   write into DIR instead of backup.dir

Exit status: 0 written and verified; 1 failed (an alert was attempted, the message says why); 2 bad usage or
settings. Restore with scripts/restore.sh FILE.

Environment: DATABASE_URL, CATALYST_CONFIG, the SMTP settings for the alert; CATALYST_PYTHON (interpreter,
default the checkout's .venv/bin/python).
USAGE
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
args=()
while (($# > 0)); do
	case "$1" in
	-h | --help)
		usage
		exit 0
		;;
	--dir)
		(($# >= 2)) || {
			echo "backup.sh: --dir needs a folder" >&2
			exit 2
		}
		args+=(--dir "$2")
		shift 2
		;;
	*)
		echo "backup.sh: unknown argument '$1'" >&2
		usage >&2
		exit 2
		;;
	esac
done

if [[ -n "${CATALYST_PYTHON:-}" ]]; then
	PY="$CATALYST_PYTHON"
elif [[ -x "$REPO/.venv/bin/python" ]]; then
	PY="$REPO/.venv/bin/python"
else
	PY="python3"
fi
cd "$REPO"
exec "$PY" -m data.backup backup "${args[@]}"

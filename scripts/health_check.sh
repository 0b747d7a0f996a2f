#!/usr/bin/env bash
# OpenD health check (cron, every 5 minutes): TCP port, then a real API call; on failure restart the container
# (at most once per cooldown), wait, re-check, and alert through the agent's own path if it is still down.
# Also the missed-run alarm: runs `agent.py --check` (which alerts once per missed cycle) and reports its result.
set -euo pipefail

usage() {
	cat <<'EOF'
Usage: scripts/health_check.sh [--broker futu|ibkr] [--help]

Checks the broker gateway (Futu OpenD by default; IB Gateway with --broker ibkr): the TCP port, then a real API call (the gateway's global state) within a
timeout. If either fails it restarts the container (no more than once per cooldown),
waits, checks again and sends a high-priority alert (python -m data.alerts) if OpenD is still unhealthy.
It then runs `agent.py --check`, which alerts (once per missed cycle) when a scheduled cycle did not run today,
and checks free disk space (python -m data.housekeeping --disk), alerting below housekeeping.warn_free_disk_mb
(at most once per CATALYST_HEALTH_DISK_ALERT_EVERY_S).

Writes ONE line per run to logs/health.log and to standard output.

Exit status: 0 healthy (including "recovered after a restart"), 1 unhealthy (OpenD down, a missed run or low
disk), 2 bad usage or settings.

Environment (all optional):
  OPEND_HOST, OPEND_PORT            gateway address (default 127.0.0.1:11111)
  IB_HOST, IB_PORT                  with --broker ibkr: IB Gateway's address (default 127.0.0.1:4002)
  CATALYST_PYTHON                   interpreter (default: the checkout's .venv/bin/python, else python3)
  CATALYST_HEALTH_API_CMD           command for the API check, run with bash -c (default:
                                    scripts/test_connection.py --quick if it exists, else a futu-api call)
  CATALYST_HEALTH_API_TIMEOUT_S     limit for the API check (default 30)
  CATALYST_HEALTH_TCP_TIMEOUT_S     limit for the TCP check (default 5)
  CATALYST_OPEND_RESTART_CMD        restart command, run with bash -c
                                    (default: docker compose -f <repo>/docker-compose.opend.yml restart opend)
  CATALYST_HEALTH_WAIT_S            wait after a restart before re-checking (default 60)
  CATALYST_HEALTH_COOLDOWN_S        minimum time between two restarts (default 900); doubled after each
                                    restart that did not help, up to 16 times
  CATALYST_HEALTH_STATE_DIR         state folder: last restart, back-off, lock (default <repo>/var/health)
  CATALYST_HEALTH_LOG               log file (default <repo>/logs/health.log)
  CATALYST_MISSED_RUN_CMD           missed-run check, run with bash -c in the checkout (default: agent.py --check
                                    when agent.py supports it); set it empty to turn the check off
  CATALYST_DISK_CHECK_CMD           free-disk check, run with bash -c in the checkout: exit 0 enough, 1 low
                                    (default: python -m data.housekeeping --disk); set it empty to turn it off
  CATALYST_HEALTH_DISK_ALERT_EVERY_S  minimum time between two low-disk alerts (default 21600)
EOF
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
# cron's PATH is minimal; docker often lives in /usr/local/bin.
PATH="${PATH:-/usr/bin:/bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
export PATH

BROKER="futu"
if [[ "${1:-}" == "--broker" ]]; then
	BROKER="${2:-}"
	shift 2 || shift
	if [[ "$BROKER" != "futu" && "$BROKER" != "ibkr" ]]; then
		echo "health_check.sh: --broker must be futu or ibkr, not '$BROKER'" >&2
		exit 2
	fi
fi

case "${1:-}" in
-h | --help)
	usage
	exit 0
	;;
"") ;;
*)
	echo "health_check.sh: unknown argument '$1'" >&2
	usage >&2
	exit 2
	;;
esac

if [[ -n "${CATALYST_PYTHON:-}" ]]; then
	PY="$CATALYST_PYTHON"
elif [[ -x "$REPO/.venv/bin/python" ]]; then
	PY="$REPO/.venv/bin/python"
else
	PY="python3"
fi
OPEND_HOST="${OPEND_HOST:-127.0.0.1}"
OPEND_PORT="${OPEND_PORT:-11111}"
GATEWAY="OpenD gateway"
COMPOSE_FILE="docker-compose.opend.yml"
SERVICE="opend"
if [[ "$BROKER" == "ibkr" ]]; then # the same checks against IB Gateway
	OPEND_HOST="${IB_HOST:-127.0.0.1}"
	OPEND_PORT="${IB_PORT:-4002}"
	GATEWAY="IB Gateway"
	COMPOSE_FILE="docker-compose.ibgateway.yml"
	SERVICE="ibgateway"
fi
API_TIMEOUT_S="${CATALYST_HEALTH_API_TIMEOUT_S:-30}"
TCP_TIMEOUT_S="${CATALYST_HEALTH_TCP_TIMEOUT_S:-5}"
WAIT_S="${CATALYST_HEALTH_WAIT_S:-60}"
COOLDOWN_S="${CATALYST_HEALTH_COOLDOWN_S:-900}"
DISK_ALERT_EVERY_S="${CATALYST_HEALTH_DISK_ALERT_EVERY_S:-21600}"
STATE_DIR="${CATALYST_HEALTH_STATE_DIR:-$REPO/var/health}"
LOG_FILE="${CATALYST_HEALTH_LOG:-$REPO/logs/health.log}"
API_CMD="${CATALYST_HEALTH_API_CMD:-}"

for pair in "OPEND_PORT=$OPEND_PORT" "CATALYST_HEALTH_API_TIMEOUT_S=$API_TIMEOUT_S" \
	"CATALYST_HEALTH_TCP_TIMEOUT_S=$TCP_TIMEOUT_S" "CATALYST_HEALTH_WAIT_S=$WAIT_S" \
	"CATALYST_HEALTH_COOLDOWN_S=$COOLDOWN_S" "CATALYST_HEALTH_DISK_ALERT_EVERY_S=$DISK_ALERT_EVERY_S"; do
	if ! [[ "${pair#*=}" =~ ^[0-9]+$ ]]; then
		echo "health_check.sh: ${pair%%=*} must be a whole number, not '${pair#*=}'" >&2
		exit 2
	fi
done
if ((API_TIMEOUT_S < 1 || TCP_TIMEOUT_S < 1)); then
	echo "health_check.sh: the check timeouts must be at least 1 second" >&2
	exit 2
fi

mkdir -p "$STATE_DIR" "$(dirname "$LOG_FILE")"

# ------------------------------------------------------------------------------------------------ helpers

DETAILS=()

note() { # add a detail to this run's log line
	DETAILS+=("$*")
}

last_line() { # the last non-empty line of $1, on one line, at most 300 characters
	local text
	text="$(printf '%s\n' "$1" | tr -d '\r' | grep -v '^[[:space:]]*$' | tail -n 1 || true)"
	printf '%s' "${text:0:300}"
}

write_log() { # the run's ONE line, to the log file and standard output
	local line detail=""
	if ((${#DETAILS[@]} > 0)); then
		detail="$(printf '%s; ' "${DETAILS[@]}")"
		detail="${detail%; }"
	fi
	detail="${detail//\"/\'}"
	line="$(date -u +%Y-%m-%dT%H:%M:%SZ) $* detail=\"${detail}\""
	line="${line//$'\n'/ }"
	printf '%s\n' "$line" >>"$LOG_FILE"
	printf '%s\n' "$line"
}

send_alert() { # subject message event -> ALERT_RESULT is sent or failed
	local output rc=0
	output="$(cd "$REPO" && "$PY" -m data.alerts --subject "$1" --message "$2" --priority high --event "$3" 2>&1)" || rc=$?
	if ((rc == 0)); then
		ALERT_RESULT="sent"
	else
		ALERT_RESULT="failed"
		output="$(last_line "$output")"
		note "alert not sent (exit $rc): ${output#alert not sent: }"
	fi
}

tcp_check() {
	# shellcheck disable=SC2016 # $1 and $2 are expanded by the inner bash
	timeout "$TCP_TIMEOUT_S" bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$OPEND_HOST" "$OPEND_PORT" 2>/dev/null
}

# The default API check: one real request through futu-api (the agent's own client library). The context is
# opened asynchronously with a deadline because futu's constructor retries forever when OpenD does not answer.
read -r -d '' INLINE_API_CHECK <<'PYEOF' || true
import sys
import threading
import time

host, port, limit_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
import futu

futu.SysConfig.enable_console_log(False)
futu.SysConfig.set_all_thread_daemon(True)
futu.SysConfig.enable_proto_encrypt(False)
ctx = futu.OpenQuoteContext(host=host, port=port, is_async_connect=True)
deadline = time.monotonic() + limit_s * 0.8
pause = threading.Event()
while ctx.status != futu.ContextStatus.READY:
    if time.monotonic() > deadline:
        ctx.close()
        print(f"OpenD at {host}:{port} accepted TCP but did not complete the API handshake within {limit_s * 0.8:.0f} s")
        sys.exit(1)
    pause.wait(0.05)
ret, data = ctx.get_global_state()
ctx.close()
if ret != futu.RET_OK:
    print(f"get_global_state failed: {data}")
    sys.exit(1)


def logged_in(value):
    return value in (True, 1, "1", "True", "true")


quote, trade = data.get("qot_logined"), data.get("trd_logined")
if not (logged_in(quote) and logged_in(trade)):
    print(
        f"OpenD answers but is not logged in (quote server: {quote}, trade server: {trade}); "
        "see `docker logs catalyst-opend` (a login verification code may be needed)"
    )
    sys.exit(1)
print(f"OpenD {data.get('server_ver')} logged in; HK market state {data.get('market_hk')}")
PYEOF

api_check() { # sets CHECK_DETAIL
	local output rc=0
	if [[ -n "$API_CMD" ]]; then
		output="$(timeout -k 5 "$API_TIMEOUT_S" bash -c "$API_CMD" 2>&1 9>&-)" || rc=$?
	elif [[ -f "$REPO/scripts/test_connection.py" ]]; then
		output="$(cd "$REPO" && timeout -k 5 "$API_TIMEOUT_S" "$PY" scripts/test_connection.py --broker "$BROKER" \
			--quick 2>&1)" || rc=$?
	else
		output="$(cd "$REPO" && timeout -k 5 "$API_TIMEOUT_S" "$PY" -c "$INLINE_API_CHECK" \
			"$OPEND_HOST" "$OPEND_PORT" "$API_TIMEOUT_S" 2>&1)" || rc=$?
	fi
	if ((rc == 124 || rc == 137)); then
		CHECK_DETAIL="API check timed out after ${API_TIMEOUT_S} s"
	elif ((rc != 0)); then
		CHECK_DETAIL="API check failed (exit $rc): $(last_line "$output")"
	else
		CHECK_DETAIL="$(last_line "$output")"
	fi
	return "$rc"
}

check_opend() { # 0 when healthy; sets CHECK_DETAIL either way
	if ! tcp_check; then
		CHECK_DETAIL="nothing accepts TCP connections at ${OPEND_HOST}:${OPEND_PORT}"
		return 1
	fi
	api_check
}

default_restart_cmd() {
	local compose_file="$REPO/$COMPOSE_FILE"
	if ! docker compose version >/dev/null 2>&1 && command -v docker-compose >/dev/null 2>&1; then
		printf 'docker-compose -f %q restart %s' "$compose_file" "$SERVICE"
	else
		printf 'docker compose -f %q restart %s' "$compose_file" "$SERVICE"
	fi
}

# ---------------------------------------------------------------------------------------------- the run

# One health check at a time: a second one started while the first waits for a restart just reports that.
if command -v flock >/dev/null 2>&1; then
	exec 9>"$STATE_DIR/lock"
	if ! flock -n 9; then
		note "another health check is still running"
		write_log "status=skipped opend=unknown restart=none missed_run=unknown alert=none"
		exit 0
	fi
fi

OPEND_STATE="ok"
RESTART="none"
ALERT_RESULT="none"
MISSED="off"
HEALTHY=1
CHECK_DETAIL=""

# Consecutive restarts that did not bring OpenD back. Each doubles the cooldown (up to 16x): Futu rate-limits
# logins, and restarting a gateway that cannot log in every 15 minutes only prolongs that.
failures="$(cat "$STATE_DIR/restart_failures" 2>/dev/null || echo 0)"
[[ "$failures" =~ ^[0-9]+$ ]] || failures=0

if check_opend; then
	note "$CHECK_DETAIL"
	rm -f "$STATE_DIR/restart_failures"
else
	first_failure="$CHECK_DETAIL"
	note "$first_failure"
	now="$(date +%s)"
	last_restart="$(cat "$STATE_DIR/last_restart" 2>/dev/null || echo 0)"
	[[ "$last_restart" =~ ^[0-9]+$ ]] || last_restart=0
	cooldown=$((COOLDOWN_S << (failures < 4 ? failures : 4)))
	if ((now - last_restart < cooldown)); then
		OPEND_STATE="down"
		RESTART="cooldown"
		HEALTHY=0
		note "no restart: the last one was $((now - last_restart)) s ago (cooldown ${cooldown} s)"
	else
		# Record the restart before doing it, so a concurrent or failing run cannot restart in a loop.
		printf '%s\n' "$now" >"$STATE_DIR/last_restart"
		restart_cmd="${CATALYST_OPEND_RESTART_CMD:-$(default_restart_cmd)}"
		restart_rc=0
		restart_output="$(cd "$REPO" && bash -c "$restart_cmd" 2>&1 9>&-)" || restart_rc=$?
		if ((restart_rc == 0)); then
			RESTART="done"
			sleep "$WAIT_S"
		else
			RESTART="failed"
			note "restart command failed (exit $restart_rc): $(last_line "$restart_output")"
		fi
		if check_opend; then
			OPEND_STATE="recovered"
			note "after restart: $CHECK_DETAIL"
			rm -f "$STATE_DIR/restart_failures"
		else
			OPEND_STATE="down"
			HEALTHY=0
			note "after restart: $CHECK_DETAIL"
			failures=$((failures + 1))
			printf '%s\n' "$failures" >"$STATE_DIR/restart_failures"
			next_s=$((COOLDOWN_S << (failures < 4 ? failures : 4)))
			if [[ "$RESTART" == "done" ]]; then
				restart_text="The container was restarted and checked again after ${WAIT_S} s."
			else
				restart_text="The restart command failed (exit $restart_rc): $(last_line "$restart_output")"
			fi
			send_alert "${GATEWAY} down at ${OPEND_HOST}:${OPEND_PORT}" \
				"The health check found ${GATEWAY} unhealthy: ${first_failure}.
${restart_text}
Still unhealthy: ${CHECK_DETAIL}.

Until it is back, trading cycles exit with code 3 (gateway unreachable) and send no orders, and the guard
cannot enforce stops: check any open positions in the broker's app.
What to do: docker logs catalyst-${SERVICE} --tail 50 (a login or 2FA confirmation may be needed), then
docker compose -f ${REPO}/${COMPOSE_FILE} up -d.
Restarts that did not help so far: ${failures}; the next one is attempted in ${next_s} s." \
				"health_check"
		fi
	fi
fi

# --------------------------------------------------------------------------------------- missed-run alarm
# `agent.py --check` compares today's journal with the calendar and sends its own alert, once per missed cycle
# (it remembers in the journal), so this script only runs it and reports the result.

if [[ -n "${CATALYST_MISSED_RUN_CMD+set}" ]]; then
	missed_cmd="$CATALYST_MISSED_RUN_CMD"
elif grep -q -- '"--check"' "$REPO/agent.py" 2>/dev/null; then
	missed_cmd="$(printf '%q agent.py --check' "$PY")"
else
	missed_cmd=""
	MISSED="unsupported"
fi
if [[ -n "$missed_cmd" ]]; then
	missed_rc=0
	missed_output="$(cd "$REPO" && timeout -k 5 120 bash -c "$missed_cmd" 2>&1 9>&-)" || missed_rc=$?
	if ((missed_rc == 0)); then
		MISSED="ok"
	elif ((missed_rc == 1)); then
		MISSED="missed"
		HEALTHY=0
		note "$(last_line "$missed_output")"
	else
		MISSED="error"
		HEALTHY=0
		note "missed-run check exited ${missed_rc}: $(last_line "$missed_output")"
	fi
fi

# ------------------------------------------------------------------------------------------------ free disk

DISK="off"
if [[ -n "${CATALYST_DISK_CHECK_CMD+set}" ]]; then
	disk_cmd="$CATALYST_DISK_CHECK_CMD"
elif [[ -f "$REPO/data/housekeeping.py" ]]; then
	disk_cmd="$(printf '%q -m data.housekeeping --disk' "$PY")"
else
	disk_cmd=""
	DISK="unsupported"
fi
if [[ -n "$disk_cmd" ]]; then
	disk_rc=0
	disk_output="$(cd "$REPO" && timeout -k 5 60 bash -c "$disk_cmd" 2>&1 9>&-)" || disk_rc=$?
	note "disk: $(last_line "$disk_output")"
	if ((disk_rc == 0)); then
		DISK="ok"
	elif ((disk_rc == 1)); then
		DISK="low"
		HEALTHY=0
		now="$(date +%s)"
		last_disk_alert="$(cat "$STATE_DIR/disk_alerted" 2>/dev/null || echo 0)"
		[[ "$last_disk_alert" =~ ^[0-9]+$ ]] || last_disk_alert=0
		if ((now - last_disk_alert >= DISK_ALERT_EVERY_S)); then
			printf '%s\n' "$now" >"$STATE_DIR/disk_alerted"
			previous_alert="$ALERT_RESULT"
			send_alert "Low disk space on ${HOSTNAME:-$(uname -n)}" \
				"The health check found little free disk: $(last_line "$disk_output").

Below housekeeping.min_free_disk_mb a trading cycle refuses to start (no orders); a full disk stops the
journal. What to do: df -h; delete or move old backups (var/backups) and logs; python -m data.housekeeping
compresses and deletes old agent logs. This alert repeats at most every ${DISK_ALERT_EVERY_S} s." \
				"disk_space"
			[[ "$previous_alert" != "failed" ]] || ALERT_RESULT="failed"
		fi
	else
		DISK="error"
		HEALTHY=0
	fi
fi

if ((HEALTHY)); then
	status="healthy"
else
	status="unhealthy"
fi
write_log "status=$status opend=$OPEND_STATE endpoint=${OPEND_HOST}:${OPEND_PORT} restart=$RESTART" \
	"missed_run=$MISSED alert=$ALERT_RESULT disk=$DISK"
((HEALTHY)) && exit 0
exit 1

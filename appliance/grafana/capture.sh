#!/usr/bin/env bash
# Reproduces dashboard.png from real data: dashboard-load drives the daemon (4k random
# writes and reads at queue depth 32 through libblkio, raw then qcow2 exports), the
# Prometheus server of bookworm's `prometheus` package scrapes its /metrics every second,
# and render_panels.py evaluates every panel of dashboard.json on that Prometheus and
# plots it. Grafana itself is not packaged for Debian; the panels' PromQL is the same.
#
#     appliance/grafana/capture.sh [seconds per bench phase, default 15]
#
# Needs: tests/scripts/install-deps.sh (unpacks prometheus), python3-matplotlib.
set -euo pipefail
cd "$(dirname "$0")/../.."

secs="${1:-15}"
listen=127.0.0.1:19410
api=127.0.0.1:19090
bin=$(ls -d /var/cache/vhost-appliance/prometheus-*/usr/bin 2>/dev/null | tail -n 1)
[ -x "$bin/prometheus" ] || { echo "run tests/scripts/install-deps.sh first" >&2; exit 1; }
# Debian's python3-matplotlib lives in /usr/bin/python3's path (a pyenv python3 first on
# PATH does not see it).
py=""
for candidate in /usr/bin/python3 python3; do
    if "$candidate" -c 'import matplotlib' 2>/dev/null; then py=$candidate; break; fi
done
[ -n "$py" ] || { echo "apt-get install python3-matplotlib" >&2; exit 1; }

cargo build --release --locked -p appliance -p appliance-tests --bins
work=$(mktemp -d)
cat > "$work/prometheus.yml" <<END
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: vhost-appliance
    static_configs:
      - targets: ["$listen"]
END
"$bin/prometheus" --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
    --web.listen-address="$api" >"$work/prometheus.log" 2>&1 &
prometheus=$!
trap 'kill "$prometheus" 2>/dev/null; wait "$prometheus" 2>/dev/null; rm -rf "$work"' EXIT

start=$(date +%s)
sleep 3
BENCH_METRICS_LISTEN=$listen target/release/dashboard-load "$secs" raw qcow2
sleep 5
end=$(date +%s)
"$py" appliance/grafana/render_panels.py --prometheus "http://$api" \
    --start "$start" --end "$end" --out appliance/grafana/dashboard.png

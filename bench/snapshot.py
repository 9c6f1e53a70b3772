#!/usr/bin/env python3
"""Fast starts, measured side by side in one run: cold boot vs snapshot restore vs a warm-pool
hand-out, for `print(42)` in Python, on the machine this runs on (QEMU TCG on the CI hosts).

    sudo python3 bench/snapshot.py                 # builds release, REPS=5
    sudo REPS=10 BIN=target/.../infra-operator python3 bench/snapshot.py

Needs a home with the Python image and kernel (INFRA_OPERATOR_HOME, default: the VM tests'
home under the target dir; `infra.operator run -l python -c 1` makes them). Writes
bench/results/snapshot-DATE.md (+ .csv). What is measured:

- cold:    `run --cold --json`: boot_time (VMM start to agent ready), exec_time (in the guest),
           total_time, and the command's wall time.
- restore: `run --json` with a snapshot made by `snapshot create --warmup 'print(1)'`:
           the same fields; boot_time is restore + reseed.
- pool:    `api` with `runs.pool: {python: 1}`: HTTP round trip of POST /api/v1/execute with a
           ready pool VM, minus the exec_time the guest reports (= what the pool adds), and the
           refill time (hand-out to the gauge showing a ready VM again).
- sizes:   the snapshot's state file, raw and `zstd -3`, against guest RAM; RSS of a pooled
           (idle) VM's QEMU.
Runs alternate cold/restore per repetition; medians and p90 are reported.
"""
import json, os, platform, statistics, subprocess, sys, tempfile, time, urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
BIN = os.environ.get("BIN", os.path.join(TARGET, "x86_64-unknown-linux-gnu/release/infra-operator"))
REPS = int(os.environ.get("REPS", "5"))
HOME = os.environ.get("INFRA_OPERATOR_HOME",
                      os.path.join(TARGET, "x86_64-unknown-linux-gnu/tmp/private/vm-home"))
DATE = time.strftime("%Y-%m-%d")
OUT = os.environ.get("RESULTS", os.path.join(REPO, f"bench/results/snapshot-{DATE}.md"))
ENV = dict(os.environ, INFRA_OPERATOR_HOME=HOME)
ENV.pop("RUST_LOG", None)


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


def cli(*args, check=True):
    t = time.monotonic()
    p = subprocess.run([BIN, *args], env=ENV, capture_output=True, text=True)
    wall = time.monotonic() - t
    if check and p.returncode != 0:
        sys.exit(f"{args} failed ({p.returncode}): {p.stderr}")
    return p, wall


def run_json(*extra):
    p, wall = cli("run", "-l", "python", "-c", "print(42)", "--json", *extra)
    r = json.loads(p.stdout)
    assert r["stdout"] == "42\n", r
    return r, wall


def stats(xs):
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]
    return xs[0], statistics.median(xs), p90


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) // 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return f"{os.cpu_count()} vCPU ({cpu}), {mem} MiB RAM, Linux {platform.release()}, {qemu}"


def main():
    if not os.environ.get("SKIP_BUILD") and "BIN" not in os.environ:
        log("building infra-cli (release)")
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "infra-cli"], cwd=REPO, check=True)
    agent = os.path.join(os.path.dirname(BIN), "infra-operator-agent")
    if not os.path.exists(agent):  # a cargo target directory: the `agent` profile's output
        agent = os.path.join(os.path.dirname(os.path.dirname(BIN)), "agent", "infra-operator-agent")
    sizes = {"cli": os.path.getsize(BIN), "agent": os.path.getsize(agent) if os.path.exists(agent) else 0}
    snap_dir = os.path.join(HOME, "snapshots", "python")
    log("snapshot create")
    p, create_wall = cli("snapshot", "create", "-l", "python", "--warmup", "print(1)", "--json")
    m = json.loads(p.stdout)
    state = os.path.join(snap_dir, next(iter(m["files"])))
    raw = os.path.getsize(state)
    zst = subprocess.run(["zstd", "-3", "-q", "-c", state], capture_output=True).stdout
    rows = []
    cold, restore = [], []
    try:
        for i in range(REPS):
            order = [("cold", ("--cold",)), ("restore", ())]
            if i % 2:
                order.reverse()
            for name, extra in order:
                r, wall = run_json(*extra)
                want = "boot" if name == "cold" else "restore"
                assert r["start"] == want, r
                (cold if name == "cold" else restore).append((r, wall))
                rows.append([name, i, r["boot_time"], r["exec_time"], r["total_time"], wall])
                log(name, i, f"ready {r['boot_time']:.3f}s exec {r['exec_time']:.3f}s total {r['total_time']:.3f}s wall {wall:.3f}s")
        pool = measure_pool()
    finally:
        cli("snapshot", "rm", "-l", "python", check=False)
    write(m, raw, len(zst), sizes, create_wall, cold, restore, pool, rows)


def measure_pool():
    cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    cfg.write("runs: {pool: {python: 1}}\n")
    cfg.close()
    srv = subprocess.Popen([BIN, "api", "--port", "0", "--config", cfg.name], env=ENV,
                           stderr=subprocess.PIPE, text=True)
    base = None
    for line in srv.stderr:
        if "listening on " in line:
            base = line.split("listening on ")[1].split()[0]
            break
    import threading
    threading.Thread(target=lambda: [None for _ in srv.stderr], daemon=True).start()

    def pooled():
        text = urllib.request.urlopen(f"{base}/metrics").read().decode()
        return next((int(float(l.split()[1])) for l in text.splitlines()
                     if l.startswith("infra_operator_vms_pooled ")), -1)

    def wait_ready():
        t = time.monotonic()
        while pooled() != 1:
            time.sleep(0.02)
        return time.monotonic() - t

    out = {"overhead": [], "rtt": [], "exec": [], "refill": [], "rss_mib": None}
    try:
        wait_ready()
        time.sleep(1)
        out["rss_mib"] = qemu_rss_mib(srv.pid)
        for i in range(REPS):
            body = json.dumps({"language": "python", "code": "print(42)"}).encode()
            req = urllib.request.Request(f"{base}/api/v1/execute", body, {"content-type": "application/json"})
            t = time.monotonic()
            r = json.loads(urllib.request.urlopen(req).read())
            rtt = time.monotonic() - t
            assert r["start"] == "pool" and r["stdout"] == "42\n", r
            out["rtt"].append(rtt)
            out["exec"].append(r["exec_time"])
            out["overhead"].append(rtt - r["exec_time"])
            out["refill"].append(wait_ready())
            log("pool", i, f"rtt {rtt:.3f}s exec {r['exec_time']:.3f}s refill {out['refill'][-1]:.3f}s")
    finally:
        srv.terminate()
        srv.wait(60)
        os.unlink(cfg.name)
    return out


def qemu_rss_mib(parent):
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = open(f"/proc/{pid}/stat").read()
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"qemu-system" in cmd:
            rss = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS"))
            total += rss // 1024
    return total


def write(m, raw, zst, sizes, create_wall, cold, restore, pool, rows):
    ram = m["mem_mib"] << 20
    def line(name, key, data):
        lo, med, p90 = stats([x[0][key] if key else x[1] for x in data])
        return lo, med, p90
    md = [f"# Fast starts — {DATE}", "", f"Machine: {machine()}.", "",
          f"`print(42)` in Python, {REPS} repetitions per mode, cold and restore alternating, "
          f"{m['mem_mib']} MiB / {m['vcpus']} vCPU, {m['backend']} {m['accel']}. Seconds: min / median / p90.", "",
          "| mode | ready (VMM start → agent) | exec (in guest) | run total | command wall |", "|---|---|---|---|---|"]
    for name, data in (("cold boot", cold), ("snapshot restore", restore)):
        cells = []
        for key in ("boot_time", "exec_time", "total_time", None):
            lo, med, p90 = line(name, key, data)
            cells.append(f"{lo:.3f} / {med:.3f} / {p90:.3f}")
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    cold_ready = statistics.median([x[0]["boot_time"] for x in cold])
    rest_ready = statistics.median([x[0]["boot_time"] for x in restore])
    rest_wall = statistics.median([x[1] for x in restore])
    md += ["", f"- Restore to ready is **{cold_ready / rest_ready:.1f}×** faster than a cold boot (goal ≥ 5×).",
           f"- `run` from a snapshot: median command wall time **{rest_wall:.2f} s** (goal ≤ 1.0 s under TCG).",
           ""]
    if pool["rtt"]:
        lo, med, p90 = stats(pool["overhead"])
        rlo, rmed, rp90 = stats(pool["refill"])
        md += ["| warm pool | min | median | p90 |", "|---|---|---|---|",
               f"| HTTP round trip | {min(pool['rtt']):.3f} | {statistics.median(pool['rtt']):.3f} | {stats(pool['rtt'])[2]:.3f} |",
               f"| exec in guest | {min(pool['exec']):.3f} | {statistics.median(pool['exec']):.3f} | {stats(pool['exec'])[2]:.3f} |",
               f"| added by the pool path (round trip − exec) | {lo:.3f} | {med:.3f} | {p90:.3f} |",
               f"| response → pool full again (0: refilled while the run was still going) | {rlo:.3f} | {rmed:.3f} | {rp90:.3f} |", "",
               f"- Added latency with a ready pool VM, p50: **{med * 1000:.0f} ms** (goal ≤ 10 ms).",
               f"- Host memory per pooled idle VM (QEMU RSS): **{pool['rss_mib']} MiB** for {m['mem_mib']} MiB of guest RAM.",
               f"- Refill: a pool VM is one restore, {rest_ready:.2f} s to ready here (median above), so with `pool_parallel: 1` "
               f"the pool makes about {1 / rest_ready:.1f} VMs/s; it was full again before each response was written.", ""]
    md += [f"Snapshot: `snapshot create --warmup 'print(1)'` took {create_wall:.1f} s; state file "
           f"{raw / 2**20:.1f} MiB raw, {zst / 2**20:.1f} MiB with `zstd -3` = **{100 * zst / ram:.1f}%** of guest RAM (goal ≤ 25%).", "",
           f"Binaries (release): CLI {sizes['cli'] / 2**20:.1f} MiB, agent {sizes['agent'] / 2**20:.2f} MiB (goal ≤ 3 MB).", ""]
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write("\n".join(md))
    with open(OUT[:-3] + ".csv", "w") as f:
        f.write("mode,rep,ready_s,exec_s,total_s,wall_s\n")
        for r in rows:
            f.write(",".join(str(x) for x in r) + "\n")
    print("\n".join(md))
    log("wrote", OUT)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Builds every installable language's image and proves it in a microVM.

Called by scripts/verify-languages.sh. For each language of crates/languages/languages.toml:
  1. `rootfs create --lang L` (timed; skipped when the image exists, unless --rebuild),
  2. `rootfs verify --lang L --json` (boots it, version, hello, stdin, compile error),
  3. the same hello-world program natively on this host, in a chroot of the same image
     (mounted read-only with a tmpfs overlay, run as uid 65534 with the table's env), to
     compare the guest's exec time with the host's,
then writes bench/results/languages-DATE.md and .json. Builds run one language ahead of the
verification (downloads and dpkg overlap the emulated CPU work). Per-language results are
kept in the work directory, so a rerun continues where an interrupted one stopped.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "crates/languages/languages.toml")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def load_table():
    with open(TABLE, "rb") as f:
        table = tomllib.load(f)
    for key, lang in table.items():
        lang["key"] = key
    return table


def run_json(argv, log_path, timeout):
    """Runs a CLI command with --json; returns (rc, parsed stdout or None, seconds)."""
    start = time.monotonic()
    with open(log_path, "w") as log:
        try:
            p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=log, timeout=timeout)
            rc, out = p.returncode, p.stdout
        except subprocess.TimeoutExpired:
            rc, out = 124, b""
    secs = time.monotonic() - start
    try:
        parsed = json.loads(out) if out.strip() else None
    except json.JSONDecodeError:
        parsed = None
    return rc, parsed, secs


def tail(path, n=3):
    try:
        with open(path, errors="replace") as f:
            lines = [l.strip() for l in f if l.strip()]
        return " | ".join(lines[-n:])
    except OSError:
        return ""


class Mounted:
    """The image read-only with a tmpfs overlay on top, /proc and /dev/null inside."""

    def __init__(self, image):
        self.image = image
        self.dir = tempfile.mkdtemp(prefix="langs-host-")
        self.mounts = []

    def __enter__(self):
        d = self.dir
        lower, upper_fs, merged = f"{d}/lower", f"{d}/rw", f"{d}/merged"
        for x in (lower, upper_fs, merged):
            os.makedirs(x)
        self._mount(["mount", "-o", "loop,ro", self.image, lower], lower)
        self._mount(["mount", "-t", "tmpfs", "-o", "size=2g", "tmpfs", upper_fs], upper_fs)
        os.makedirs(f"{upper_fs}/upper")
        os.makedirs(f"{upper_fs}/work")
        self._mount(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={lower},upperdir={upper_fs}/upper,workdir={upper_fs}/work", merged],
            merged,
        )
        self._mount(["mount", "-t", "proc", "proc", f"{merged}/proc"], f"{merged}/proc")
        self._mount(["mount", "-t", "devtmpfs", "devtmpfs", f"{merged}/dev"], f"{merged}/dev")
        return merged

    def _mount(self, argv, target):
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.mounts.append(target)

    def __exit__(self, *exc):
        for m in reversed(self.mounts):
            subprocess.run(["umount", "-l", m], stderr=subprocess.DEVNULL)
        shutil.rmtree(self.dir, ignore_errors=True)


def host_hello(lang, image, runs=3):
    """Median native run time (s) of the hello program in a chroot of the image, the build
    excluded; None with a reason when it cannot be measured."""
    try:
        with Mounted(image) as root:
            work = os.path.join(root, "tmp/host-hello")
            os.makedirs(work, exist_ok=True)
            with open(os.path.join(work, lang["file"]), "w") as f:
                f.write(lang["hello"]["code"])
            subprocess.run(["chown", "-R", "65534:65534", work], check=True)
            env = dict(lang.get("env", {}))
            env["PATH"] = ":".join(lang.get("path", []) + [DEFAULT_PATH])
            envargs = [f"{k}={v}" for k, v in env.items()]

            def inside(argv):
                argv = [a.replace("{file}", lang["file"]) for a in argv]
                cmd = "cd /tmp/host-hello && exec " + " ".join(shlex_quote(a) for a in argv)
                return ["chroot", "--userspec=65534:65534", root, "/usr/bin/env", "-i",
                        *envargs, "/bin/sh", "-c", cmd]

            if lang.get("build"):
                b = subprocess.run(inside(lang["build"]), capture_output=True, timeout=600)
                if b.returncode != 0:
                    return None, "host build failed: " + b.stderr.decode(errors="replace")[-200:]
            times = []
            for _ in range(runs):
                start = time.monotonic()
                r = subprocess.run(inside(lang["run"]), capture_output=True, timeout=600)
                times.append(time.monotonic() - start)
                if r.stdout.decode(errors="replace") != lang["hello"]["stdout"]:
                    return None, "host output differs: " + repr(r.stdout[:100])
            times.sort()
            return times[len(times) // 2], None
    except (subprocess.SubprocessError, OSError) as e:
        return None, f"host run failed: {e}"


def shlex_quote(s):
    import shlex
    return shlex.quote(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="the infra.operator binary")
    ap.add_argument("--work", required=True, help="directory for per-language results and logs")
    ap.add_argument("--langs", default="", help="comma-separated keys (default: all installable)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild images that exist")
    ap.add_argument("--reverify", action="store_true", help="verify again languages with a result")
    ap.add_argument("--discard-images", action="store_true",
                    help="remove each image once verified (all of them take tens of GB)")
    ap.add_argument("--report-only", action="store_true",
                    help="write the results file from what the work directory holds")
    ap.add_argument("--out", default=None, help="results file stem (default bench/results/languages-DATE)")
    args = ap.parse_args()

    table = load_table()
    keys = [k for k, l in table.items() if not l.get("unavailable")]
    if args.langs:
        keys = [k for k in args.langs.split(",") if k]
    os.makedirs(args.work, exist_ok=True)
    if args.report_only:
        all_keys = [k for k, l in table.items() if not l.get("unavailable")]
        return write_report(table, all_keys, args)
    listed = subprocess.run([args.bin, "rootfs", "list", "--json"], capture_output=True, text=True)
    existing = {}
    if listed.returncode == 0 and listed.stdout.strip():
        for img in json.loads(listed.stdout):
            existing[img.get("name")] = img.get("path")

    built = {}
    cond = threading.Condition()

    def image_of(key):
        return existing.get(key)

    def builder():
        for key in keys:
            res_path = os.path.join(args.work, f"build-{key}.json")
            img = image_of(key)
            if img and os.path.exists(img) and not args.rebuild:
                prior = None
                if os.path.exists(res_path):
                    with open(res_path) as f:
                        prior = json.load(f)
                res = prior or {"ok": True, "secs": None, "note": "image existed"}
            else:
                argv = [args.bin, "rootfs", "create", "--lang", key, "--json"]
                rc, out, secs = run_json(argv, os.path.join(args.work, f"build-{key}.log"), 3600)
                res = {"ok": rc == 0, "secs": round(secs, 1), "manifest": out,
                       "error": None if rc == 0 else tail(os.path.join(args.work, f"build-{key}.log"))}
                with open(res_path, "w") as f:
                    json.dump(res, f)
            print(f"built {key}: {'ok' if res['ok'] else 'FAILED'} {res.get('secs')}", flush=True)
            with cond:
                built[key] = res
                cond.notify_all()

    t = threading.Thread(target=builder, daemon=True)
    t.start()
    for key in keys:
        with cond:
            while key not in built:
                cond.wait()
        res_path = os.path.join(args.work, f"verify-{key}.json")
        if os.path.exists(res_path) and not args.reverify and not args.rebuild:
            continue
        if not built[key]["ok"]:
            with open(res_path, "w") as f:
                json.dump({"ok": False, "error": "image build failed: " + (built[key].get("error") or "")}, f)
            continue
        argv = [args.bin, "rootfs", "verify", "--lang", key, "--json", "--accel", "tcg"]
        rc, out, secs = run_json(argv, os.path.join(args.work, f"verify-{key}.log"), 3600)
        row = (out or {}).get("results", [{}])[0] if out else {}
        host, host_note = (None, "no image")
        img = row.get("image") or image_of(key)
        if row.get("ok") and img:
            host, host_note = host_hello(table[key], img)
        result = {"ok": rc == 0 and bool(row.get("ok")), "verify": row, "secs": round(secs, 1),
                  "host_hello_s": host, "host_note": host_note,
                  "error": None if row else tail(os.path.join(args.work, f"verify-{key}.log"))}
        with open(res_path, "w") as f:
            json.dump(result, f)
        if args.discard_images and img:
            for p in (img, img[: -len(".ext4")] + ".json"):
                try:
                    os.remove(p)
                except OSError:
                    pass
        print(f"verified {key}: {'PASS' if result['ok'] else 'FAIL'} ({secs:.0f} s)", flush=True)
    t.join()
    all_keys = [k for k, l in table.items() if not l.get("unavailable")]
    return write_report(table, all_keys, args)


def fmt_s(v):
    return "-" if v is None else f"{v:.2f}"


def write_report(table, keys, args):
    date = datetime.date.today().isoformat()
    stem = args.out or os.path.join(ROOT, f"bench/results/languages-{date}")
    rows, summary = [], {"passed": [], "failed": [], "unavailable": []}
    build_total = 0.0
    for key in table:
        lang = table[key]
        if lang.get("unavailable"):
            summary["unavailable"].append(key)
            rows.append({"lang": key, "unavailable": lang["unavailable"], "image": lang.get("image")})
            continue
        if key not in keys:
            continue
        b, v = {}, {}
        for name, target in (("build", b), ("verify", v)):
            p = os.path.join(args.work, f"{name}-{key}.json")
            if os.path.exists(p):
                with open(p) as f:
                    target.update(json.load(f))
        build_total += b.get("secs") or 0
        vr = v.get("verify") or {}
        checks = {c["check"]: c for c in vr.get("checks", [])}
        hello = checks.get("hello", {})
        guest = hello.get("run_ms")
        guest_s = None if guest is None else guest / 1000
        host = v.get("host_hello_s")
        ok = bool(v.get("ok"))
        (summary["passed"] if ok else summary["failed"]).append(key)
        rows.append({
            "lang": key, "name": lang["name"], "ok": ok, "version": vr.get("version", ""),
            "image_used_mb": (vr.get("image_used_bytes") or 0) >> 20 if vr.get("image_used_bytes") else None,
            "build_image_s": b.get("secs"), "boot_s": (vr.get("boot_ms") or 0) / 1000 if vr else None,
            "hello_run_s": guest_s, "hello_compile_s": (hello.get("build_ms") / 1000) if hello.get("build_ms") is not None else None,
            "stdin_ok": checks.get("stdin", {}).get("ok"), "compile_error_ok": checks.get("compile_error", {}).get("ok"),
            "host_hello_s": host, "vm_over_host": (guest_s / host) if (guest_s and host) else None,
            "agent_overhead_s": ((hello["exec_ms"] - (hello.get("build_ms") or 0) - hello["run_ms"]) / 1000)
            if hello.get("exec_ms") is not None else None,
            "problem": v.get("error") or vr.get("error") or next((c.get("problem") for c in vr.get("checks", []) if c.get("problem")), None),
        })
    machine = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
        "cpus": os.cpu_count(), "kernel": platform.release(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "accel": "tcg (QEMU -M microvm, software emulation)",
    }
    with open(stem + ".json", "w") as f:
        json.dump({"machine": machine, "rows": rows, "summary": summary, "image_build_total_s": build_total}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# Languages: every entry of the table, proven in a microVM ({date})\n\n")
        f.write(f"Machine: {machine['cpu']}, {machine['cpus']} vCPUs, {machine['mem_gib']} GiB, kernel {machine['kernel']}; "
                f"guests run under {machine['accel']}. Produced by `scripts/verify-languages.sh`.\n\n")
        f.write(f"Passed {len(summary['passed'])}, failed {len(summary['failed'])}, not installable here {len(summary['unavailable'])}. "
                f"Image builds took {build_total/60:.1f} min in all (one debootstrap base, reused; packages from the shared cache).\n\n")
        f.write("`hello run` is the program's run time inside the VM as the agent measures it (build excluded); "
                "`compile` is the build step's time; `host` is the same hello program run natively in a chroot of the same image "
                "(median of 3); `VM/host` is their ratio, mostly the cost of software CPU emulation here. "
                "`agent` is the agent's own cost per exec: the host-side time from request to exit minus the guest's build and run "
                "times (writing the source, the run directory and cgroup, frames over vsock/virtio-serial, cleanup).\n\n")
        f.write("| lang | version | result | image used | image build | boot | compile | hello run | host | VM/host | agent | stdin | compile error |\n")
        f.write("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            if "unavailable" in r:
                continue
            f.write("| {lang} | {version} | {res} | {img} | {bi} | {boot} | {comp} | {run} | {host} | {ratio} | {agent} | {stdin} | {ce} |\n".format(
                lang=r["lang"], version=(r["version"] or "").replace("|", "/")[:60],
                res="PASS" if r["ok"] else "FAIL",
                img="-" if r["image_used_mb"] is None else f"{r['image_used_mb']} MB",
                bi="-" if r["build_image_s"] is None else f"{r['build_image_s']:.0f} s",
                boot=fmt_s(r["boot_s"]) + " s" if r["boot_s"] else "-",
                comp=fmt_s(r["hello_compile_s"]) + (" s" if r["hello_compile_s"] is not None else ""),
                run=fmt_s(r["hello_run_s"]) + (" s" if r["hello_run_s"] is not None else ""),
                host=fmt_s(r["host_hello_s"]) + (" s" if r["host_hello_s"] is not None else ""),
                ratio="-" if r["vm_over_host"] is None else f"{r['vm_over_host']:.1f}x",
                agent="-" if r["agent_overhead_s"] is None else f"{r['agent_overhead_s'] * 1000:.0f} ms",
                stdin={True: "ok", False: "FAIL", None: "-"}[r["stdin_ok"]],
                ce={True: "ok", False: "FAIL", None: "-"}[r["compile_error_ok"]],
            ))
        failed = [r for r in rows if "unavailable" not in r and not r["ok"]]
        if failed:
            f.write("\n## Failures\n\n")
            for r in failed:
                f.write(f"- **{r['lang']}**: {r['problem'] or 'not run'}\n")
        f.write("\n## Not installable from the package sources these hosts reach\n\n")
        for r in rows:
            if "unavailable" in r:
                f.write(f"- **{r['lang']}**: {r['unavailable']} Recipe for hosts with a registry: `rootfs from-docker --lang {r['lang']}` ({r['image']}).\n")
    print(f"wrote {stem}.md and {stem}.json", flush=True)
    return 0 if not summary["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Load generator for bench/files.sh: the same client code against several OpenAI Files API
servers (ours and ogx's `remote::s3` provider), servers alternating per repetition.

    files.py run --server NAME=URL=PID ... --big FILE --raw OUT.csv
    files.py report --raw OUT.csv --out OUT.md

Needs httpx (a client venv made by files.sh) and curl (the 1 GiB transfers are curl
subprocesses: `-F file=@FILE` streams the multipart body from disk, `-o /dev/null` discards the
download, so neither is held in client memory). Every measurement is one CSV row:
section,server,rep,metric,value,note,cpu_busy_before. A failing request is recorded as FAIL
with its reason and the run goes on; no number is made up.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

MiB = 1024 * 1024
PURPOSE = "assistants"


def log(msg: str) -> None:
    print(f"\033[1m[bench]\033[0m {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Machine state


def cpu_busy_pct(interval: float = 1.0) -> int:
    def read() -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:9]]

    a = read()
    time.sleep(interval)
    b = read()
    total = sum(b) - sum(a)
    idle = (b[3] + b[4]) - (a[3] + a[4])
    return 100 - 100 * idle // total if total > 0 else 0


def wait_idle() -> int:
    """Waits until the CPUs were at most IDLE_BUSY_PCT busy for three consecutive seconds
    (at most IDLE_TIMEOUT s); returns the last busy percentage."""
    limit = int(os.environ.get("IDLE_BUSY_PCT", "10"))
    deadline = time.monotonic() + int(os.environ.get("IDLE_TIMEOUT", "300"))
    calm, busy = 0, 100
    while time.monotonic() < deadline:
        busy = cpu_busy_pct()
        calm = calm + 1 if busy <= limit else 0
        if calm >= 3:
            return busy
    log(f"machine still busy ({busy}% CPU); running anyway")
    return busy


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples a process's VmRSS every `period` seconds in a thread."""

    def __init__(self, pid: int, period: float = 0.05):
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), rss_kib(self.pid)))
            except OSError:
                return
            self._stop.wait(self.period)

    def __enter__(self) -> "RssSampler":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    def peak(self, t0: float, t1: float) -> int:
        return max((kb for t, kb in self.samples if t0 <= t <= t1), default=0)


# --------------------------------------------------------------------------------------------
# Servers and results


@dataclass
class Server:
    name: str
    url: str
    pid: int
    probe_id: str = ""
    small_ids: list[str] = field(default_factory=list)


class Results:
    def __init__(self, path: str):
        self.f = open(path, "w", newline="")
        self.w = csv.writer(self.f)
        self.w.writerow(["section", "server", "rep", "metric", "value", "note", "cpu_busy_before"])

    def add(self, section, server, rep, metric, value, note="", busy=""):
        if isinstance(value, float):
            value = f"{value:.4f}"
        self.w.writerow([section, server, rep, metric, value, note, busy])
        self.f.flush()


def fail_reason(r: httpx.Response | None = None, exc: BaseException | None = None) -> str:
    if exc is not None:
        return f"{type(exc).__name__}: {str(exc)[:120]}".replace(",", ";").replace("\n", " ")
    assert r is not None
    return f"HTTP {r.status_code}: {r.text[:120]}".replace(",", ";").replace("\n", " ")


def curl_upload(url: str, path: str, filename: str = "big.bin") -> tuple[int, float, dict | str]:
    """POST /v1/files with the file streamed from disk; returns (status, seconds, json|text)."""
    out = subprocess.run(
        ["curl", "-sS", "-H", "Expect:", "-o", "-", "-w", "\n%{http_code} %{time_total}",
         "-F", f"purpose={PURPOSE}", "-F", f"file=@{path};filename={filename}",
         f"{url}/v1/files"],
        capture_output=True, text=True)
    body, _, tail = out.stdout.rpartition("\n")
    try:
        code, secs = tail.split()
        code, secs = int(code), float(secs)
    except ValueError:
        return 0, 0.0, f"curl rc {out.returncode}: {out.stderr.strip()[:120]}"
    try:
        return code, secs, json.loads(body)
    except ValueError:
        return code, secs, body[:200]


def curl_download(url: str, file_id: str, dest: str = "/dev/null") -> tuple[int, float, int, str]:
    out = subprocess.run(
        ["curl", "-sS", "-o", dest, "-w", "%{http_code} %{time_total} %{size_download}",
         f"{url}/v1/files/{file_id}/content"],
        capture_output=True, text=True)
    try:
        code, secs, size = out.stdout.split()
        return int(code), float(secs), int(size), out.stderr.strip()[:120]
    except ValueError:
        return 0, 0.0, 0, f"curl rc {out.returncode}: {out.stderr.strip()[:120]}"


def delete_all(srv: Server, ids: list[str], conc: int = 8) -> int:
    """Deletes files (untimed housekeeping); returns how many failed."""
    async def go() -> int:
        sem = asyncio.Semaphore(conc)
        bad = 0
        async with httpx.AsyncClient(base_url=srv.url, timeout=120,
                                     limits=httpx.Limits(max_connections=conc)) as c:
            async def one(i: str) -> None:
                nonlocal bad
                async with sem:
                    try:
                        r = await c.delete(f"/v1/files/{i}")
                        bad += r.status_code != 200
                    except httpx.HTTPError:
                        bad += 1
            await asyncio.gather(*(one(i) for i in ids))
        return bad
    return asyncio.run(go())


def list_all(c: httpx.Client, limit: int = 100) -> tuple[list[str], str]:
    """Pages through GET /v1/files; returns (ids in page order, error or "")."""
    ids: list[str] = []
    after = None
    for _ in range(100000):
        params = {"limit": limit}
        if after:
            params["after"] = after
        r = c.get("/v1/files", params=params)
        if r.status_code != 200:
            return ids, fail_reason(r)
        body = r.json()
        page = [f["id"] for f in body["data"]]
        ids += page
        if not body.get("has_more") or not page:
            return ids, ""
        after = page[-1]
    return ids, "too many pages"


def pct(v: list[float], p: float) -> float:
    s = sorted(v)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


# --------------------------------------------------------------------------------------------
# Sections


def big_transfer(res: Results, srv: Server, rep: int, big: str, big_sha: str) -> None:
    """1 and 2: 1 GiB upload (with the server's RSS) and download of it."""
    size = os.path.getsize(big)
    busy = wait_idle()
    with RssSampler(srv.pid) as s:
        time.sleep(0.5)
        base = rss_kib(srv.pid)
        cpu0 = cpu_seconds(srv.pid)
        t0 = time.monotonic()
        code, secs, body = curl_upload(srv.url, big)
        t1 = time.monotonic()
        end = rss_kib(srv.pid)
        cpu1 = cpu_seconds(srv.pid)
        time.sleep(0.3)
    peak = s.peak(t0, t1 + 0.3)
    res.add("upload-1g", srv.name, rep, "rss_base_mib", base / 1024, busy=busy)
    res.add("upload-1g", srv.name, rep, "rss_peak_mib", peak / 1024)
    res.add("upload-1g", srv.name, rep, "rss_growth_mib", (peak - base) / 1024)
    res.add("upload-1g", srv.name, rep, "rss_end_mib", end / 1024)
    res.add("upload-1g", srv.name, rep, "server_cpu_s", cpu1 - cpu0)
    if code != 200 or not isinstance(body, dict) or body.get("bytes") != size:
        reason = body if isinstance(body, str) else json.dumps(body)[:150]
        res.add("upload-1g", srv.name, rep, "mib_s", "FAIL", f"HTTP {code}: {reason}".replace(",", ";"))
        log(f"upload-1g {srv.name} #{rep}: FAIL HTTP {code} {str(reason)[:150]}")
        return
    res.add("upload-1g", srv.name, rep, "mib_s", size / MiB / secs, f"{secs:.2f}s")
    log(f"upload-1g {srv.name} #{rep}: {size / MiB / secs:.1f} MiB/s, RSS {base // 1024} -> peak "
        f"{peak // 1024} MiB (+{(peak - base) // 1024}), end {end // 1024} MiB, server CPU {cpu1 - cpu0:.1f}s")
    fid = body["id"]

    busy = wait_idle()
    with RssSampler(srv.pid) as s:
        base = rss_kib(srv.pid)
        cpu0 = cpu_seconds(srv.pid)
        t0 = time.monotonic()
        code, secs, got, err = curl_download(srv.url, fid)
        t1 = time.monotonic()
        cpu1 = cpu_seconds(srv.pid)
    peak = s.peak(t0, t1)
    res.add("download-1g", srv.name, rep, "rss_growth_mib", (peak - base) / 1024, busy=busy)
    res.add("download-1g", srv.name, rep, "server_cpu_s", cpu1 - cpu0)
    if code != 200 or got != size:
        res.add("download-1g", srv.name, rep, "mib_s", "FAIL", f"HTTP {code}; {got} bytes; {err}".replace(",", ";"))
        log(f"download-1g {srv.name} #{rep}: FAIL HTTP {code}, {got} bytes {err}")
    else:
        res.add("download-1g", srv.name, rep, "mib_s", size / MiB / secs, f"{secs:.2f}s")
        log(f"download-1g {srv.name} #{rep}: {size / MiB / secs:.1f} MiB/s (+{(peak - base) // 1024} MiB RSS)")
    if rep == 1:  # integrity, once per server, untimed
        p = subprocess.run(f"curl -sS {srv.url}/v1/files/{fid}/content | sha256sum",
                           shell=True, capture_output=True, text=True)
        ok = p.stdout.split()[0] == big_sha if p.stdout else False
        res.add("download-1g", srv.name, rep, "sha256_ok", int(ok))
        if not ok:
            log(f"download-1g {srv.name}: sha256 MISMATCH")
    delete_all(srv, [fid])


async def _small_uploads(srv: Server, n: int, conc: int, size: int) -> tuple[float, list[str], list[str]]:
    payloads = [os.urandom(size) for _ in range(n)]
    q: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        q.put_nowait(i)
    ids: list[str] = []
    errors: list[str] = []
    async with httpx.AsyncClient(base_url=srv.url, timeout=60,
                                 limits=httpx.Limits(max_connections=conc,
                                                     max_keepalive_connections=conc)) as c:
        async def worker() -> None:
            while True:
                try:
                    i = q.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    r = await c.post("/v1/files", data={"purpose": PURPOSE},
                                     files={"file": (f"small-{i}.bin", payloads[i], "application/octet-stream")})
                    if r.status_code == 200:
                        ids.append(r.json()["id"])
                    else:
                        errors.append(fail_reason(r))
                except httpx.HTTPError as e:
                    errors.append(fail_reason(exc=e))
        # one warm connection per worker is part of the measurement (a client would reuse them)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        secs = time.perf_counter() - t0
    return secs, ids, errors


def small_and_list(res: Results, srv: Server, rep: int, n: int, conc: int) -> None:
    """4 (n 1 KiB uploads, conc clients), then 3 (list 100 of the n files), then cleanup."""
    busy = wait_idle()
    secs, ids, errors = asyncio.run(_small_uploads(srv, n, conc, 1024))
    note = f"{len(ids)} ok; {len(errors)} failed" + (f"; first: {errors[0]}" if errors else "")
    if errors:
        res.add("small-uploads", srv.name, rep, "uploads_s", "FAIL", note, busy)
    else:
        res.add("small-uploads", srv.name, rep, "uploads_s", len(ids) / secs, note, busy)
    res.add("small-uploads", srv.name, rep, "failed", len(errors))
    log(f"small-uploads {srv.name} #{rep}: {len(ids) / secs:.1f}/s ({note})")

    with httpx.Client(base_url=srv.url, timeout=60) as c:
        present, err = list_all(c)
        res.add("list-100", srv.name, rep, "files_present", len(present), err)
        busy = wait_idle()
        lat: list[float] = []
        bad = ""
        for i in range(10 + int(os.environ.get("LIST_N", "200"))):
            t0 = time.perf_counter()
            r = c.get("/v1/files", params={"limit": 100})
            dt = time.perf_counter() - t0
            if r.status_code != 200 or len(r.json()["data"]) != min(100, len(present)):
                bad = fail_reason(r)
                break
            if i >= 10:  # 10 warm-up requests
                lat.append(dt * 1000)
    if bad:
        res.add("list-100", srv.name, rep, "p50_ms", "FAIL", bad, busy)
        res.add("list-100", srv.name, rep, "p99_ms", "FAIL", bad)
        log(f"list-100 {srv.name} #{rep}: FAIL {bad}")
    else:
        res.add("list-100", srv.name, rep, "p50_ms", statistics.median(lat), f"{len(lat)} requests", busy)
        res.add("list-100", srv.name, rep, "p99_ms", pct(lat, 99))
        log(f"list-100 {srv.name} #{rep}: p50 {statistics.median(lat):.2f} ms, p99 {pct(lat, 99):.2f} ms "
            f"({len(present)} files present)")
    failed = delete_all(srv, present)
    if failed:
        log(f"cleanup {srv.name}: {failed} deletes failed")


def probe_during_transfers(res: Results, srv: Server, rep: int, big: str) -> None:
    """5: GET /v1/files/{probe} sequentially from one client while a 1 GiB upload and then a
    1 GiB download run."""
    size = os.path.getsize(big)
    busy = wait_idle()
    stop = threading.Event()
    samples: list[tuple[float, float, str]] = []  # (start, ms, error)

    def prober() -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = c.get(f"/v1/files/{srv.probe_id}")
                    e = "" if r.status_code == 200 else f"HTTP {r.status_code}"
                except httpx.HTTPError as ex:
                    e = type(ex).__name__
                samples.append((t0, (time.monotonic() - t0) * 1000, e))

    th = threading.Thread(target=prober, daemon=True)
    th.start()
    time.sleep(1.0)
    tu0 = time.monotonic()
    code, secs, body = curl_upload(srv.url, big)
    tu1 = time.monotonic()
    fid = body.get("id") if isinstance(body, dict) and code == 200 else None
    td0 = time.monotonic()
    if fid:
        dcode, dsecs, got, _ = curl_download(srv.url, fid)
    td1 = time.monotonic()
    stop.set()
    th.join()

    def phase(a: float, b: float) -> list[float]:
        return [ms for t, ms, _ in samples if a <= t <= b]

    errs = [e for _, _, e in samples if e]
    up, down = phase(tu0, tu1), phase(td0, td1)
    both = up + down
    note = f"{len(both)} requests; {len(errs)} errors"
    res.add("probe-during-transfer", srv.name, rep, "p99_ms", pct(both, 99) if both else "FAIL", note, busy)
    res.add("probe-during-transfer", srv.name, rep, "max_ms", max(both) if both else "FAIL")
    res.add("probe-during-transfer", srv.name, rep, "p50_ms", statistics.median(both) if both else "FAIL")
    res.add("probe-during-transfer", srv.name, rep, "upload_p99_ms", pct(up, 99) if up else "FAIL", f"{len(up)} requests")
    res.add("probe-during-transfer", srv.name, rep, "upload_max_ms", max(up) if up else "FAIL")
    res.add("probe-during-transfer", srv.name, rep, "download_p99_ms", pct(down, 99) if down else "FAIL", f"{len(down)} requests")
    res.add("probe-during-transfer", srv.name, rep, "download_max_ms", max(down) if down else "FAIL")
    res.add("probe-during-transfer", srv.name, rep, "errors", len(errs), ";".join(sorted(set(errs)))[:100])
    if fid:
        res.add("probe-during-transfer", srv.name, rep, "upload_mib_s", size / MiB / secs)
        if dcode == 200 and got == size:
            res.add("probe-during-transfer", srv.name, rep, "download_mib_s", size / MiB / dsecs)
    else:
        res.add("probe-during-transfer", srv.name, rep, "upload_mib_s", "FAIL", f"HTTP {code}")
    log(f"probe {srv.name} #{rep}: p99 {pct(both, 99):.1f} ms, max {max(both, default=0):.1f} ms "
        f"(upload phase p99 {pct(up, 99):.1f} / max {max(up, default=0):.1f}; download phase p99 "
        f"{pct(down, 99):.1f} / max {max(down, default=0):.1f}); {len(both)} requests, {len(errs)} errors")
    if fid:
        delete_all(srv, [fid])


async def _burst(srv: Server, n: int) -> tuple[float, list[tuple[int, str, str]], list[str]]:
    payloads = [f"burst {i} ".encode() + os.urandom(1000) for i in range(n)]
    shas = [hashlib.sha256(p).hexdigest() for p in payloads]
    results: list[tuple[int, str, str]] = []  # (index, id, sha)
    errors: list[str] = []
    start = asyncio.Event()
    async with httpx.AsyncClient(base_url=srv.url, timeout=httpx.Timeout(300, connect=60),
                                 limits=httpx.Limits(max_connections=n, max_keepalive_connections=n)) as c:
        async def one(i: int) -> None:
            await start.wait()
            try:
                r = await c.post("/v1/files", data={"purpose": PURPOSE},
                                 files={"file": (f"burst-{i}.bin", payloads[i], "application/octet-stream")})
                if r.status_code == 200:
                    results.append((i, r.json()["id"], shas[i]))
                else:
                    errors.append(fail_reason(r))
            except httpx.HTTPError as e:
                errors.append(fail_reason(exc=e))
        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
        secs = time.perf_counter() - t0
    return secs, results, errors


def burst(res: Results, srv: Server, rep: int, n: int) -> None:
    """6: n uploads started at once; then every returned id must be retrievable with the right
    content, and paging the list must find each exactly once."""
    busy = wait_idle()
    secs, results, errors = asyncio.run(_burst(srv, n))
    res.add("burst-500", srv.name, rep, "seconds", secs, f"{len(results)} ok; {len(errors)} failed", busy)
    res.add("burst-500", srv.name, rep, "upload_failed", len(errors),
            (Counter(errors).most_common(1)[0][0] if errors else ""))
    ids = [i for _, i, _ in results]
    dup_ids = len(ids) - len(set(ids))
    lost = 0
    reasons: Counter[str] = Counter()
    listed, err = [], ""
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        for _, fid, sha in results:
            try:
                r = c.get(f"/v1/files/{fid}")
                if r.status_code != 200:
                    lost += 1
                    reasons[f"retrieve HTTP {r.status_code}"] += 1
                    continue
                r = c.get(f"/v1/files/{fid}/content")
                if r.status_code != 200 or hashlib.sha256(r.content).hexdigest() != sha:
                    lost += 1
                    reasons[f"content HTTP {r.status_code}" if r.status_code != 200 else "sha256 mismatch"] += 1
            except httpx.HTTPError as e:  # a server that stopped answering: not verifiable
                lost += 1
                reasons[f"verify {type(e).__name__}"] += 1
        try:
            listed, err = list_all(c)
        except httpx.HTTPError as e:
            err = fail_reason(exc=e)
    seen = Counter(listed)
    missing = sum(1 for i in set(ids) if seen[i] == 0)
    dup_listed = sum(1 for i in set(ids) if seen[i] > 1)
    extra = sum(1 for i in seen if i not in set(ids) and i != srv.probe_id)
    res.add("burst-500", srv.name, rep, "lost", lost, "; ".join(f"{k}: {v}" for k, v in reasons.items()))
    if err:
        res.add("burst-500", srv.name, rep, "missing_in_list", "FAIL", f"listing: {err}")
    else:
        res.add("burst-500", srv.name, rep, "missing_in_list", missing)
    res.add("burst-500", srv.name, rep, "duplicated_in_list", dup_listed)
    res.add("burst-500", srv.name, rep, "duplicate_ids", dup_ids)
    res.add("burst-500", srv.name, rep, "unexpected_in_list", extra)
    log(f"burst-500 {srv.name} #{rep}: {secs:.1f}s, {len(results)} ok, {len(errors)} failed"
        f"{' (' + Counter(errors).most_common(1)[0][0] + ')' if errors else ''}; lost {lost}, "
        f"missing in list {missing}, listed twice {dup_listed}, duplicate ids {dup_ids}, unexpected {extra}")
    try:
        delete_all(srv, sorted(set(listed) | set(ids)))
    except httpx.HTTPError as e:
        log(f"cleanup {srv.name}: {e!r}")


def cmd_run(a: argparse.Namespace) -> None:
    servers = []
    for spec in a.server:
        name, url, pid = spec.split("=", 2)
        servers.append(Server(name, url.rstrip("/"), int(pid)))
    res = Results(a.raw)
    big_sha = hashlib.sha256()
    with open(a.big, "rb") as f:
        while chunk := f.read(8 * MiB):
            big_sha.update(chunk)
    sha = big_sha.hexdigest()
    sections = [s.strip() for s in a.sections.split(",")]

    def ordered(rep: int) -> list[Server]:  # rotate the server order each repetition
        k = (rep - 1) % len(servers)
        return servers[k:] + servers[:k]

    for srv in servers:  # start from an empty server
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            ids, err = list_all(c)
            if err:
                log(f"{srv.name}: listing failed: {err}")
        if ids:
            delete_all(srv, ids)
    if "big" in sections:
        for rep in range(1, a.reps + 1):
            for srv in ordered(rep):
                big_transfer(res, srv, rep, a.big, sha)
    if "small" in sections:
        for rep in range(1, a.reps + 1):
            for srv in ordered(rep):
                small_and_list(res, srv, rep, a.small_n, a.small_conc)
    if "probe" in sections:
        for srv in servers:
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                r = c.post("/v1/files", data={"purpose": PURPOSE},
                           files={"file": ("probe.txt", b"p" * 1024, "text/plain")})
                r.raise_for_status()
                srv.probe_id = r.json()["id"]
        for rep in range(1, a.reps + 1):
            for srv in ordered(rep):
                probe_during_transfers(res, srv, rep, a.big)
        for srv in servers:
            delete_all(srv, [srv.probe_id])
            srv.probe_id = ""
    if "burst" in sections:
        for rep in range(1, a.reps + 1):
            for srv in ordered(rep):
                burst(res, srv, rep, a.burst_n)


# --------------------------------------------------------------------------------------------
# Report


def cmd_report(a: argparse.Namespace) -> None:
    rows = list(csv.DictReader(open(a.raw)))
    E = os.environ
    names = [n for n in a.servers.split(",")]
    other, ours = names[0], names[1]

    def vals(section: str, server: str, metric: str) -> tuple[list[float], list[str]]:
        v, fails = [], []
        for r in rows:
            if r["section"] == section and r["server"] == server and r["metric"] == metric:
                if r["value"] == "FAIL":
                    fails.append(r["note"])
                else:
                    v.append(float(r["value"]))
        return v, fails

    def med(section: str, server: str, metric: str) -> float | str:
        v, fails = vals(section, server, metric)
        if fails and not v:
            return f"FAIL({fails[0][:90]})"
        if not v:
            return "n/a"
        m = statistics.median(v)
        return m if not fails else m  # partial failures are listed below the table

    def total(section: str, server: str, metric: str) -> float | str:
        v, fails = vals(section, server, metric)
        return sum(v) if v else (f"FAIL({fails[0][:90]})" if fails else "n/a")

    def fmt(x: float | str, d: int = 1) -> str:
        return x if isinstance(x, str) else f"{x:.{d}f}"

    def ratio(o, t, higher_better: bool) -> str:
        if isinstance(o, str) or isinstance(t, str) or not o or not t:
            return "–"
        return f"{(o / t if higher_better else t / o):.2f}×"

    def verdict(ok: bool | None) -> str:
        return "–" if ok is None else ("met" if ok else "**missed**")

    L: list[str] = []
    w = L.append
    w(f"# Files API benchmark: infra-operator vs ogx `remote::s3`, {E.get('DATE', '')}")
    w("")
    w(f"Machine: {E.get('M_CPU', '?')}, {E.get('M_NPROC', '?')} CPUs, {E.get('M_MEM', '?')} GiB RAM, "
      f"kernel {E.get('M_KERNEL', '?')}, {E.get('M_OS', '')}. Run started {E.get('STARTED', '?')}, took "
      f"{E.get('ELAPSED', '?')}.")
    w("")
    w(f"Servers, side by side on one single-node Garage {E.get('V_GARAGE', '?')} on 127.0.0.1 (sqlite "
      f"metadata; one bucket each), SQLite metadata for both:")
    w(f"- **ours**: `infra-operator api` {E.get('V_OURS', '?')} (release build), `files:` provider "
      f"`remote::s3` with `max_file_size: 2147483648` (the default is OpenAI's 512 MB).")
    w(f"- **ogx**: ogx {E.get('V_OGX', '?')} (PyPI; Python {E.get('V_OGX_PY', '?')}, uvicorn "
      f"{E.get('V_UVICORN', '?')}, boto3 {E.get('V_BOTO3', '?')}), `ogx run --insecure CONFIG` with only the `files` "
      f"API and its `remote::s3` provider (`sql_sqlite` store), default server settings (1 worker).")
    w(f"  ogx refuses uploads over 100 MiB: `ogx_api/common/upload_limits.py` "
      f"`DEFAULT_MAX_UPLOAD_SIZE_BYTES = 100 * 1024 * 1024`, the default argument of "
      f"`ogx_api.files.fastapi_routes.create_router`, which ogx calls without it; there is no config "
      f"key or environment variable. files.sh patches that one line in the venv to 4 GiB "
      f"(`sed`, idempotent, checked) — nothing else of ogx is changed.")
    w("")
    w(f"Client: the same Python code (bench/files.py, httpx {E.get('V_HTTPX', '?')}) for both; the 1 GiB "
      f"transfers are `curl -F file=@FILE` (multipart streamed from disk) and `curl -o /dev/null`. "
      f"{E.get('REPS', '?')} repetitions, server order alternating, machine idle (≤{E.get('IDLE_BUSY_PCT', '10')}% "
      f"CPU for 3 s) before each timed section; medians. Raw numbers: `{os.path.basename(a.raw)}`.")
    w("")

    up = (med("upload-1g", other, "mib_s"), med("upload-1g", ours, "mib_s"))
    growth = (med("upload-1g", other, "rss_growth_mib"), med("upload-1g", ours, "rss_growth_mib"))
    end = (med("upload-1g", other, "rss_end_mib"), med("upload-1g", ours, "rss_end_mib"))
    down = (med("download-1g", other, "mib_s"), med("download-1g", ours, "mib_s"))
    l50 = (med("list-100", other, "p50_ms"), med("list-100", ours, "p50_ms"))
    l99 = (med("list-100", other, "p99_ms"), med("list-100", ours, "p99_ms"))
    sm = (med("small-uploads", other, "uploads_s"), med("small-uploads", ours, "uploads_s"))
    pr = (med("probe-during-transfer", other, "p99_ms"), med("probe-during-transfer", ours, "p99_ms"))
    prmax = (med("probe-during-transfer", other, "max_ms"), med("probe-during-transfer", ours, "max_ms"))
    lost = tuple(total("burst-500", s, "lost") for s in (other, ours))
    miss = tuple(total("burst-500", s, "missing_in_list") for s in (other, ours))
    dupl = tuple(total("burst-500", s, "duplicated_in_list") for s in (other, ours))
    dupi = tuple(total("burst-500", s, "duplicate_ids") for s in (other, ours))
    bfail = tuple(total("burst-500", s, "upload_failed") for s in (other, ours))

    def num(x) -> bool:
        return not isinstance(x, str)

    def ge(x, g):
        return (x >= g) if num(x) else False

    def le(x, g):
        return (x <= g) if num(x) else False

    def rat(o, t, hb):
        return (o / t if hb else t / o) if num(o) and num(t) and o and t else None

    w("| # | metric | ogx | ours | ours vs ogx | goal | |")
    w("|---|---|---|---|---|---|---|")
    r_up = rat(up[1], up[0], True)
    w(f"| 1 | 1 GiB upload, MiB/s | {fmt(up[0])} | {fmt(up[1])} | {ratio(up[1], up[0], True)} | ≥ 1.4× ogx | "
      f"{verdict(r_up >= 1.4 if r_up is not None else (num(up[1]) or None))} |")
    w(f"| 1 | server RSS growth during it (peak − before), MiB | {fmt(growth[0])} | {fmt(growth[1])} | "
      f"{ratio(growth[1], growth[0], False)} smaller | ≤ 64 MiB | {verdict(le(growth[1], 64))} |")
    w(f"| 1 | server RSS at the end of it, MiB | {fmt(end[0])} | {fmt(end[1])} | | | |")
    r_dn = rat(down[1], down[0], True)
    w(f"| 2 | 1 GiB download, MiB/s | {fmt(down[0])} | {fmt(down[1])} | {ratio(down[1], down[0], True)} | "
      f"≥ 1.0× ogx | {verdict(r_dn >= 1.0 if r_dn is not None else (num(down[1]) or None))} |")
    w(f"| 3 | list 100 of 1,000, median ms | {fmt(l50[0], 2)} | {fmt(l50[1], 2)} | "
      f"{ratio(l50[1], l50[0], False)} faster | ≤ 5 ms | {verdict(le(l50[1], 5))} |")
    w(f"| 3 | list 100 of 1,000, p99 ms | {fmt(l99[0], 2)} | {fmt(l99[1], 2)} | "
      f"{ratio(l99[1], l99[0], False)} faster | ≤ 5 ms | {verdict(le(l99[1], 5))} |")
    w(f"| 4 | 1 KiB uploads/s, {E.get('SMALL_N', '1000')} with {E.get('SMALL_CONC', '8')} clients | "
      f"{fmt(sm[0])} | {fmt(sm[1])} | {ratio(sm[1], sm[0], True)} | ≥ 300/s | {verdict(ge(sm[1], 300))} |")
    w(f"| 5 | GET /v1/files/{{id}} during 1 GiB up+download, p99 ms | {fmt(pr[0])} | {fmt(pr[1])} | "
      f"{ratio(pr[1], pr[0], False)} lower | ≤ 50 ms | {verdict(le(pr[1], 50))} |")
    w(f"| 5 | … its maximum, ms | {fmt(prmax[0])} | {fmt(prmax[1])} | | | |")
    ok6 = all(num(x) and x == 0 for x in (lost[1], miss[1], dupl[1], dupi[1], bfail[1]))
    w(f"| 6 | {E.get('BURST_N', '500')} concurrent uploads × {E.get('REPS', '?')}: failed / lost / missing "
      f"in list / listed twice / duplicate ids (sums) | {fmt(bfail[0], 0)} / {fmt(lost[0], 0)} / "
      f"{fmt(miss[0], 0)} / {fmt(dupl[0], 0)} / {fmt(dupi[0], 0)} | {fmt(bfail[1], 0)} / {fmt(lost[1], 0)} / "
      f"{fmt(miss[1], 0)} / {fmt(dupl[1], 0)} / {fmt(dupi[1], 0)} | | none | {verdict(ok6)} |")
    w("")

    # Details per repetition.
    w("Per repetition (in run order within each repetition the server order alternates):")
    w("")
    w("| section | metric | server | values per rep | note (first rep) |")
    w("|---|---|---|---|---|")
    seen = []
    for r in rows:
        k = (r["section"], r["metric"], r["server"])
        if k not in seen:
            seen.append(k)
    for sec, met, srv in seen:
        rs = [r for r in rows if (r["section"], r["metric"], r["server"]) == (sec, met, srv)]
        vs = ", ".join(r["value"] if r["value"] == "FAIL" else f"{float(r['value']):.2f}" for r in rs)
        note = rs[0]["note"].replace("|", "/")
        w(f"| {sec} | {met} | {srv} | {vs} | {note} |")
    w("")
    if a.notes and os.path.exists(a.notes):
        L.append(open(a.notes).read().rstrip())
        w("")
    open(a.out, "w").write("\n".join(L) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--server", action="append", required=True, help="NAME=URL=PID (PID: for RSS)")
    r.add_argument("--big", required=True, help="the 1 GiB file")
    r.add_argument("--raw", required=True)
    r.add_argument("--reps", type=int, default=3)
    r.add_argument("--small-n", type=int, default=1000)
    r.add_argument("--small-conc", type=int, default=8)
    r.add_argument("--burst-n", type=int, default=500)
    r.add_argument("--sections", default="big,small,probe,burst")
    q = sub.add_parser("report")
    q.add_argument("--raw", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--servers", default="ogx,ours", help="OTHER,OURS")
    q.add_argument("--notes", help="markdown appended to the report")
    a = p.parse_args()
    cmd_run(a) if a.cmd == "run" else cmd_report(a)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Exec round trip through the guest agent vs running the interpreter directly (no VM).

The agent runs on this host (`infra.operator guest --listen unix:... --pid1 off`), as it does in
a VM but without the VM. For each language, a trivial program is run N times both ways,
alternating: through the agent (request -> write source -> spawn as `nobody` in its own process
group and cgroup -> stream -> exit event) and directly (`subprocess.run([interpreter, file])`
from this same Python). Reports p50/p90 per exec and what the agent adds at p50, plus execs/s
on one agent connection, sequential and with 4 requests in flight.

usage: bench/exec.py [--bin PATH] [-n 200] [--out bench/results/exec-DATE.csv]
"""
import argparse, base64, json, os, socket, statistics, struct, subprocess, sys, tempfile, time

PROGRAMS = {  # lang -> (source, direct argv builder)
    "bash": (":\n", lambda f: ["bash", f]),
    "python": ("pass\n", lambda f: ["/usr/bin/python3", f]),
}


class Agent:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.next_id = 1
        self.buf = b""

    def send(self, body):
        body["id"] = self.next_id
        self.next_id += 1
        data = json.dumps(body).encode()
        self.s.sendall(struct.pack(">I", len(data)) + data)
        return body["id"]

    def recv(self):
        while True:
            if len(self.buf) >= 4:
                n = struct.unpack(">I", self.buf[:4])[0]
                if len(self.buf) >= 4 + n:
                    msg = json.loads(self.buf[4:4 + n])
                    self.buf = self.buf[4 + n:]
                    return msg
            chunk = self.s.recv(65536)
            if not chunk:
                raise RuntimeError("agent closed the connection")
            self.buf += chunk

    def exec_req(self, lang, code):
        return self.send({"type": "exec", "lang": lang, "code": code, "argv": [], "stdin": "",
                          "env": {}, "timeout_ms": 10000, "max_output_bytes": 65536})

    def wait_exit(self, pending):
        while pending:
            m = self.recv()
            if m["type"] == "exit":
                if m["status"] != "success":
                    raise RuntimeError(f"exec failed: {m}")
                pending.discard(m["id"])
            elif m["type"] == "error":
                raise RuntimeError(f"agent error: {m}")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="infra.operator")
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="exec-bench-")
    os.chmod(work, 0o755)
    sock = os.path.join(work, "agent.sock")
    agent = subprocess.Popen([a.bin, "guest", "--listen", f"unix:{sock}", "--pid1", "off",
                              "--workspace", os.path.join(work, "ws")],
                             stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        c = Agent(sock)
        c.send({"type": "hello", "version": 1, "client": "bench"})
        hello = c.recv()
        assert hello["type"] == "hello_reply", hello
        rows = []
        for lang, (code, argv) in PROGRAMS.items():
            src = os.path.join(work, f"direct-{lang}")
            with open(src, "w") as f:
                f.write(code)
            for _ in range(5):  # warm caches both ways
                c.wait_exit({c.exec_req(lang, code)})
                subprocess.run(argv(src), check=True)
            agent_t, direct_t = [], []
            for i in range(a.n):
                order = [0, 1] if i % 2 == 0 else [1, 0]
                for which in order:
                    t0 = time.perf_counter()
                    if which == 0:
                        c.wait_exit({c.exec_req(lang, code)})
                        agent_t.append(time.perf_counter() - t0)
                    else:
                        subprocess.run(argv(src), check=True)
                        direct_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(a.n):
                c.wait_exit({c.exec_req(lang, code)})
            seq = a.n / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            pending, done = set(), 0
            while done < a.n:
                while len(pending) < 4 and done + len(pending) < a.n:
                    pending.add(c.exec_req(lang, code))
                before = len(pending)
                m = c.recv()
                if m["type"] == "exit":
                    pending.discard(m["id"])
                    done += before - len(pending)
            par = a.n / (time.perf_counter() - t0)
            row = {
                "lang": lang, "n": a.n,
                "agent_p50_ms": pct(agent_t, 50) * 1e3, "agent_p90_ms": pct(agent_t, 90) * 1e3,
                "direct_p50_ms": pct(direct_t, 50) * 1e3, "direct_p90_ms": pct(direct_t, 90) * 1e3,
                "added_p50_ms": (pct(agent_t, 50) - pct(direct_t, 50)) * 1e3,
                "execs_per_s_seq": seq, "execs_per_s_4_in_flight": par,
            }
            rows.append(row)
            print(f"{lang:7} agent p50 {row['agent_p50_ms']:.2f} ms p90 {row['agent_p90_ms']:.2f} | "
                  f"direct p50 {row['direct_p50_ms']:.2f} ms p90 {row['direct_p90_ms']:.2f} | "
                  f"added p50 {row['added_p50_ms']:.2f} ms | {seq:.0f} execs/s seq, {par:.0f} with 4 in flight")
        if a.out:
            with open(a.out, "w") as f:
                f.write(",".join(rows[0].keys()) + "\n")
                for r in rows:
                    f.write(",".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + "\n")
    finally:
        agent.terminate()
        agent.wait()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()

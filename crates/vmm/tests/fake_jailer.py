#!/usr/bin/env python3
"""A stand-in for Firecracker's jailer + Firecracker, for CI hosts that cannot run either.

It does what the real pair does that our backend depends on: computes the jail as the jailer
does (<canonical chroot base>/<file name of the canonical exec file>/<id>/root), chroots into
it, drops to the given uid/gid, serves Firecracker's API on /api.sock in the jail, and, like
Firecracker, opens every file a request names as that uid, answering 400 with
"... Permission denied" when it cannot. With --new-pid-ns, as the jailer does, the "Firecracker"
part runs as pid 1 of a new PID namespace, its host pid is written to <root>/<exec name>.pid,
and the jailer part exits 0. Each request is appended as one JSON line to $FAKE_JAILER_LOG
(opened before the chroot), with the pid and uid that served it."""
import ctypes, json, os, socket, sys

args = sys.argv[1:]
opt = lambda k: args[args.index(k) + 1]
jail_id, exec_file, uid, gid, base = opt("--id"), opt("--exec-file"), int(opt("--uid")), int(opt("--gid")), opt("--chroot-base-dir")
exec_real = os.path.realpath(exec_file)
root = os.path.join(os.path.realpath(base), os.path.basename(exec_real), jail_id, "root")
log = open(os.environ["FAKE_JAILER_LOG"], "a", buffering=1)
cgroups = [args[i + 1] for i, a in enumerate(args) if a == "--cgroup"]
log.write(json.dumps({"jail": root, "exec_file": exec_file, "cgroups": cgroups,
                      "cgroup_version": opt("--cgroup-version") if "--cgroup-version" in args else None}) + "\n")
# The jailer creates <controller root>/<parent cgroup>/<id> per hierarchy (real cgroup
# directories; here plain ones under $FAKE_CGROUP_PARENTS, left empty so rmdir works).
for parent in filter(None, os.environ.get("FAKE_CGROUP_PARENTS", "").split(":")):
    if cgroups:
        os.makedirs(os.path.join(parent, jail_id))
# The jailer hands the jail root to the jail's uid.
os.chown(root, uid, gid)
# As the jailer: chroot, then (with --new-pid-ns) clone into a new PID namespace and write the
# child's pid, and the child (else the jailer itself) runs Firecracker as uid/gid.
os.chroot(root)
os.chdir("/")
if "--new-pid-ns" in args:
    CLONE_NEWPID = 0x20000000
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWPID) != 0:
        sys.exit(f"unshare(CLONE_NEWPID): {os.strerror(ctypes.get_errno())}")
    child = os.fork()
    if child:
        with open("/" + os.path.basename(exec_real) + ".pid", "x") as f:
            f.write(str(child))
        os._exit(0)
os.setgroups([]); os.setgid(gid); os.setuid(uid)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind("/api.sock"); srv.listen(8)
paused = False

def check(path):
    try:
        open(path, "rb").close()
        return None
    except OSError as e:
        return f"{path}: {e.strerror}"

while True:
    c, _ = srv.accept()
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = c.recv(65536)
        if not chunk: break
        data += chunk
    if not data:
        c.close(); continue
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = next((int(l.split(":", 1)[1]) for l in lines[1:] if l.lower().startswith("content-length:")), 0)
    while len(body) < length:
        body += c.recv(65536)
    req = json.loads(body or b"{}")
    log.write(json.dumps({"method": method, "path": path, "body": req, "uid": os.getuid(), "pid": os.getpid()}) + "\n")
    fault = None
    for key in ("kernel_image_path", "initrd_path", "path_on_host", "snapshot_path"):
        if key in req and fault is None and path != "/snapshot/create":
            fault = check(req[key])
    if path == "/snapshot/load" and fault is None:
        fault = check(req.get("mem_backend", {}).get("backend_path", "/missing-mem-backend"))
    if path == "/snapshot/create" and fault is None:
        # As Firecracker: the VM must be paused first; the files are written as the VM's uid.
        if not paused:
            fault = "the VM is not paused"
        else:
            for key, data in (("snapshot_path", b"vmstate"), ("mem_file_path", b"\0" * 4096)):
                with open(req[key], "wb") as f:
                    f.write(data)
    if method == "PATCH" and path == "/vm":
        paused = req.get("state") == "Paused"
    if fault:
        msg = json.dumps({"fault_message": f"Cannot open {fault}. Permission denied"}).encode()
        c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(msg), msg))
    else:
        c.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
    c.close()

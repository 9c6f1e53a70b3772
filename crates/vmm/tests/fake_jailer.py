#!/usr/bin/env python3
"""A stand-in for Firecracker's jailer + Firecracker, for CI hosts that cannot run either.

It does what the real pair does that our backend depends on: computes the jail as the jailer
does (<canonical chroot base>/<file name of the canonical exec file>/<id>/root), drops to the
given uid/gid, serves Firecracker's API on <jail>/api.sock, and, like Firecracker, opens every
file a request names (relative to the jail root) as that uid, answering 400 with
"... Permission denied" when it cannot. Each request is appended as one JSON line to
$FAKE_JAILER_LOG (written before the uid drop)."""
import json, os, socket, sys

args = sys.argv[1:]
opt = lambda k: args[args.index(k) + 1]
jail_id, exec_file, uid, gid, base = opt("--id"), opt("--exec-file"), int(opt("--uid")), int(opt("--gid")), opt("--chroot-base-dir")
exec_real = os.path.realpath(exec_file)
root = os.path.join(os.path.realpath(base), os.path.basename(exec_real), jail_id, "root")
log = open(os.environ["FAKE_JAILER_LOG"], "a", buffering=1)
log.write(json.dumps({"jail": root, "exec_file": exec_file}) + "\n")
# The jailer hands the jail root to the jail's uid.
os.chown(root, uid, gid)
os.chdir(root)
sock_path = os.path.join(root, "api.sock")
os.setgroups([]); os.setgid(gid); os.setuid(uid)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(sock_path); srv.listen(8)

def check(path):
    try:
        open(os.path.join(root, path.lstrip("/")), "rb").close()
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
    log.write(json.dumps({"method": method, "path": path, "body": req, "uid": os.getuid()}) + "\n")
    fault = None
    for key in ("kernel_image_path", "initrd_path", "path_on_host"):
        if key in req and fault is None:
            fault = check(req[key])
    if fault:
        msg = json.dumps({"fault_message": f"Cannot open {fault}. Permission denied"}).encode()
        c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(msg), msg))
    else:
        c.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
    c.close()

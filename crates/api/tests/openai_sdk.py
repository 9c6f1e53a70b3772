"""The official OpenAI Python SDK against infra.operator's Files and Uploads APIs.

Run by tests/openai_sdk.rs with BASE_URL and API_KEY set; exits non-zero on the first
mismatch. Every call is the SDK's own (no raw HTTP), so request shapes, multipart encoding,
pagination and error classes are exactly what applications get.
"""
import hashlib
import os
import pathlib
import sys
import tempfile

import openai
from openai import OpenAI

base = os.environ["BASE_URL"].rstrip("/") + "/v1"
client = OpenAI(base_url=base, api_key=os.environ["API_KEY"], max_retries=0)


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)


# files.create, retrieve, content
f = client.files.create(file=("hello.txt", b"hello world"), purpose="assistants")
check(f.id.startswith("file-"), f"id {f.id}")
check(f.object == "file" and f.bytes == 11 and f.filename == "hello.txt", f"file {f}")
check(f.purpose == "assistants" and f.expires_at is None, f"purpose/expiry {f}")
check(client.files.retrieve(f.id).id == f.id, "retrieve")
check(client.files.content(f.id).read() == b"hello world", "content")

# expires_after
g = client.files.create(
    file=("rows.jsonl", b'{"a": 1}\n'),
    purpose="batch",
    expires_after={"anchor": "created_at", "seconds": 3600},
)
check(g.expires_at == g.created_at + 3600, f"expires_at {g}")

# list: the SDK's auto-pagination walks `after` cursors page by page
more = [client.files.create(file=(f"n{i}.txt", b"n"), purpose="user_data").id for i in range(5)]
walked = list(client.files.list(limit=2, order="asc"))
ids = [x.id for x in walked]
check(sorted(ids) == sorted([f.id, g.id] + more) and len(set(ids)) == len(ids), f"pagination {ids}")
check([(x.created_at, x.id) for x in walked] == sorted((x.created_at, x.id) for x in walked), "asc order")
only = [x.id for x in client.files.list(purpose="batch")]
check(only == [g.id], f"purpose filter {only}")
newest = client.files.list(limit=1)
check(newest.data[0].id == ids[-1] and newest.has_more, "default order is newest first")

# errors map to the SDK's classes
client.files.delete(more[0])
try:
    client.files.retrieve(more[0])
    check(False, "retrieve after delete")
except openai.NotFoundError as e:
    check(e.status_code == 404 and e.body.get("code") == "not_found", f"404 body {e.body}")
try:
    client.files.create(file=("x.txt", b"x"), purpose="nonsense")
    check(False, "bad purpose")
except openai.BadRequestError as e:
    check(e.body.get("param") == "purpose", f"param {e.body}")
try:
    OpenAI(base_url=base, api_key="sk-io-wrong", max_retries=0).files.list()
    check(False, "wrong key")
except openai.AuthenticationError as e:
    check(e.status_code == 401, "401")

# Uploads: the SDK's own chunked uploader (parts in order, then complete with md5)
data = os.urandom(12 * 1024 * 1024 + 12345)
with tempfile.NamedTemporaryFile(suffix=".bin") as tmp:
    tmp.write(data)
    tmp.flush()
    up = client.uploads.upload_file_chunked(
        file=pathlib.Path(tmp.name), mime_type="application/octet-stream", purpose="assistants",
        part_size=5 * 1024 * 1024, md5=hashlib.md5(data).hexdigest(),
    )
check(up.status == "completed" and up.file is not None, f"upload {up}")
check(up.file.bytes == len(data), "upload size")
body = client.files.content(up.file.id).read()
check(hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest(), "upload content")

# Uploads by hand: create, a part, cancel
u = client.uploads.create(bytes=3, filename="c.txt", mime_type="text/plain", purpose="assistants")
client.uploads.parts.create(upload_id=u.id, data=b"abc")
c = client.uploads.cancel(u.id)
check(c.status == "cancelled", f"cancel {c}")
try:
    client.uploads.complete(upload_id=u.id, part_ids=[])
    check(False, "complete after cancel")
except openai.APIStatusError as e:
    check(e.status_code in (400, 409), f"complete after cancel: {e.status_code}")

print(f"ok: openai {openai.__version__}: files, pagination, errors, uploads ({len(data)} bytes)")

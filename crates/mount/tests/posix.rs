//! The POSIX subset of docs/mount-semantics.md, through a real FUSE mount of a real Garage
//! bucket (as root). Each block names the line of the semantics doc it checks.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use common::*;
use infra_store::{Body, Metadata};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posix_subset() {
    let (_g, s) = garage("posix").await;
    let mut m = TestMount::start(s.clone(), "ttl=1");

    // create, write, read: a new file is one object with the s3fs metadata.
    let data = pattern(300_000, 1);
    fs::write(m.p("a.bin"), &data).unwrap();
    assert_eq!(fs::read(m.p("a.bin")).unwrap(), data);
    assert_eq!(object(&s, "a.bin").await, data);
    let info = s.head("a.bin", None).await.unwrap();
    assert_eq!(
        info.metadata["mode"],
        (0o100000 | 0o644).to_string(),
        "{info:?}"
    );
    assert_eq!(info.metadata["uid"], "0");
    assert!(info.metadata.contains_key("mtime"));

    // seek + read: ranged reads return the right bytes anywhere in the file.
    let mut f = fs::File::open(m.p("a.bin")).unwrap();
    for off in [299_990u64, 7, 150_000, 0] {
        f.seek(SeekFrom::Start(off)).unwrap();
        let mut b = [0u8; 10];
        let n = f.read(&mut b).unwrap();
        assert_eq!(
            &b[..n],
            &data[off as usize..(off as usize + n)],
            "offset {off}"
        );
    }
    drop(f);

    // random write into an existing file, append.
    let mut f = OpenOptions::new().write(true).open(m.p("a.bin")).unwrap();
    f.seek(SeekFrom::Start(10)).unwrap();
    f.write_all(b"XYZ").unwrap();
    drop(f);
    let mut want = data.clone();
    want[10..13].copy_from_slice(b"XYZ");
    assert_eq!(object(&s, "a.bin").await, want, "random write");
    let mut f = OpenOptions::new().append(true).open(m.p("a.bin")).unwrap();
    f.write_all(b"tail").unwrap();
    f.sync_all().unwrap(); // fsync: durable in the bucket before close
    want.extend_from_slice(b"tail");
    assert_eq!(object(&s, "a.bin").await, want, "append + fsync");
    drop(f);

    // truncate: shrink, extend with zeros, O_TRUNC.
    let f = OpenOptions::new().write(true).open(m.p("a.bin")).unwrap();
    f.set_len(100).unwrap();
    drop(f);
    assert_eq!(object(&s, "a.bin").await, &want[..100]);
    std::process::Command::new("truncate")
        .args(["-s", "200"])
        .arg(m.p("a.bin"))
        .status()
        .unwrap();
    let got = object(&s, "a.bin").await;
    assert_eq!(got.len(), 200);
    assert_eq!(&got[..100], &want[..100]);
    assert!(got[100..].iter().all(|&b| b == 0));
    fs::write(m.p("a.bin"), b"short").unwrap();
    assert_eq!(object(&s, "a.bin").await, b"short");
    assert_eq!(fs::metadata(m.p("a.bin")).unwrap().len(), 5);

    // empty file.
    fs::File::create(m.p("empty")).unwrap();
    assert_eq!(s.head("empty", None).await.unwrap().size, 0);

    // chmod, chown, utimens: stored as x-amz-meta-mode/uid/gid/mtime.
    fs::set_permissions(m.p("a.bin"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(m.p("a.bin"), Some(1234), Some(5678)).unwrap();
    sh(&format!(
        "touch -m -d @1700000000.25 '{}'",
        m.p("a.bin").display()
    ));
    let meta = s.head("a.bin", None).await.unwrap().metadata;
    assert_eq!(meta["mode"], (0o100600).to_string());
    assert_eq!(
        (meta["uid"].as_str(), meta["gid"].as_str()),
        ("1234", "5678")
    );
    assert_eq!(meta["mtime"], "1700000000.250000000");
    assert_eq!(
        object(&s, "a.bin").await,
        b"short",
        "metadata change keeps data"
    );
    std::thread::sleep(Duration::from_millis(1100)); // past ttl: attributes come from the bucket
    let md = fs::metadata(m.p("a.bin")).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o600);
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    assert_eq!(md.mtime(), 1700000000);

    // mkdir: a `dir/` object; rmdir refuses a non-empty directory.
    fs::create_dir(m.p("d")).unwrap();
    let di = s.head("d/", None).await.unwrap();
    assert_eq!(di.metadata["mode"], (0o40755).to_string());
    fs::write(m.p("d/inner"), b"1").unwrap();
    let e = fs::remove_dir(m.p("d")).unwrap_err();
    assert_eq!(errno(&e), nix::libc::ENOTEMPTY);
    assert_eq!(
        errno(&fs::create_dir(m.p("d")).unwrap_err()),
        nix::libc::EEXIST
    );
    fs::remove_file(m.p("d/inner")).unwrap();
    fs::remove_dir(m.p("d")).unwrap();
    assert!(s.head("d/", None).await.is_err());
    assert!(!exists(&m.p("d")));

    // directories implied by prefixes (no `dir/` object) are listed and entered.
    s.put(
        "implied/deep/x.txt",
        Body::Bytes(Bytes::from_static(b"x")),
        &Metadata::new(),
    )
    .await
    .unwrap();
    assert!(fs::metadata(m.p("implied")).unwrap().is_dir());
    assert_eq!(fs::read(m.p("implied/deep/x.txt")).unwrap(), b"x");
    // An object without metadata: 0644, the mount's owner, mtime from LastModified.
    let md = fs::metadata(m.p("implied/deep/x.txt")).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o644);
    assert!(md.mtime() > 1_700_000_000);

    // rename of a file (copy + delete, metadata kept) and of a directory tree.
    fs::rename(m.p("a.bin"), m.p("b.bin")).unwrap();
    assert!(s.head("a.bin", None).await.is_err());
    let meta = s.head("b.bin", None).await.unwrap().metadata;
    assert_eq!(meta["uid"], "1234", "rename keeps metadata");
    assert_eq!(fs::read(m.p("b.bin")).unwrap(), b"short");
    fs::create_dir_all(m.p("tree/sub")).unwrap();
    fs::write(m.p("tree/sub/f1"), b"f1").unwrap();
    fs::write(m.p("tree/f2"), b"f2").unwrap();
    fs::rename(m.p("tree"), m.p("moved")).unwrap();
    assert_eq!(fs::read(m.p("moved/sub/f1")).unwrap(), b"f1");
    assert_eq!(fs::read(m.p("moved/f2")).unwrap(), b"f2");
    assert!(!exists(&m.p("tree")));
    let left = s.list("tree/").await.unwrap();
    assert!(left.is_empty(), "{left:?}");
    // rename over an existing file replaces it.
    fs::write(m.p("x1"), b"one").unwrap();
    fs::write(m.p("x2"), b"two").unwrap();
    fs::rename(m.p("x1"), m.p("x2")).unwrap();
    assert_eq!(fs::read(m.p("x2")).unwrap(), b"one");
    assert!(!exists(&m.p("x1")));

    // symlinks: the target as content, mode S_IFLNK|0777 (s3fs's form).
    std::os::unix::fs::symlink("b.bin", m.p("link")).unwrap();
    assert_eq!(fs::read_link(m.p("link")).unwrap().to_str(), Some("b.bin"));
    assert_eq!(object(&s, "link").await, b"b.bin");
    assert_eq!(
        s.head("link", None).await.unwrap().metadata["mode"],
        (0o120777).to_string()
    );
    assert_eq!(fs::read(m.p("link")).unwrap(), b"short");
    fs::remove_file(m.p("link")).unwrap();

    // unlink.
    fs::remove_file(m.p("b.bin")).unwrap();
    assert!(s.head("b.bin", None).await.is_err());
    assert_eq!(
        errno(&fs::read(m.p("b.bin")).unwrap_err()),
        nix::libc::ENOENT
    );

    // hard links and device nodes are refused.
    fs::write(m.p("h"), b"h").unwrap();
    assert_eq!(
        errno(&fs::hard_link(m.p("h"), m.p("h2")).unwrap_err()),
        nix::libc::EPERM
    );

    // statfs answers.
    let st = nix::sys::statvfs::statvfs(&m.path).unwrap();
    assert!(st.blocks_available() > 0);

    // readdir of thousands of entries (paginated listing), created in the bucket directly,
    // and `ls -l` (readdirplus: attributes of every entry).
    let n = 2500;
    futures::future::join_all((0..n).map(|i| {
        let s = s.clone();
        async move {
            let mut meta = Metadata::new();
            meta.insert("mode".into(), (0o100640).to_string());
            s.put(
                &format!("many/f{i:05}"),
                Body::Bytes(Bytes::from(vec![b'x'; i % 7])),
                &meta,
            )
            .await
            .unwrap()
        }
    }))
    .await;
    let names: Vec<String> = fs::read_dir(m.p("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), n);
    let ls = sh(&format!("ls -l '{}'", m.p("many").display()));
    let rows: Vec<&str> = ls.lines().filter(|l| l.starts_with('-')).collect();
    assert_eq!(rows.len(), n);
    assert!(
        rows.iter().all(|r| r.starts_with("-rw-r-----")),
        "{}",
        rows[0]
    );

    // mtime set by the writer survives (utimens after write).
    fs::write(m.p("t"), b"t").unwrap();
    let f = fs::File::options().write(true).open(m.p("t")).unwrap();
    f.set_modified(UNIX_EPOCH + Duration::from_secs(1_600_000_000))
        .unwrap();
    drop(f);
    assert_eq!(
        s.head("t", None).await.unwrap().metadata["mtime"],
        "1600000000"
    );

    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_ro_uid_gid_umask() {
    let (_g, s) = garage("opts").await;
    let mut meta = Metadata::new();
    meta.insert("mode".into(), (0o100666).to_string());
    meta.insert("uid".into(), "7".into());
    s.put("f", Body::Bytes(Bytes::from_static(b"data")), &meta)
        .await
        .unwrap();
    let mut m = TestMount::start(s.clone(), "ro,uid=1000,gid=2000,umask=027");
    let md = fs::metadata(m.p("f")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1000, 2000));
    assert_eq!(md.permissions().mode() & 0o777, 0o640);
    assert_eq!(fs::read(m.p("f")).unwrap(), b"data");
    for e in [
        fs::write(m.p("new"), b"x").unwrap_err(),
        fs::create_dir(m.p("dir")).unwrap_err(),
        fs::remove_file(m.p("f")).unwrap_err(),
    ] {
        assert_eq!(errno(&e), nix::libc::EROFS, "{e}");
    }
    assert_eq!(object(&s, "f").await, b"data");
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_file_multipart_and_streamed_read() {
    let (_g, s) = garage("large").await;
    let mut m = TestMount::start(s.clone(), "part_size=5");
    // 23 MiB: five parts of 5 MiB (the mount's part size here) and a shorter last one.
    let data = pattern(23 << 20, 9);
    fs::write(m.p("big"), &data).unwrap();
    let info = s.head("big", None).await.unwrap();
    assert!(
        info.etag.as_deref().unwrap_or("").ends_with("-5"),
        "multipart ETag: {info:?}"
    );
    // Read back in small sequential pieces (the prefetch path), compared piecewise.
    let mut f = fs::File::open(m.p("big")).unwrap();
    let mut buf = vec![0u8; 128 << 10];
    let mut off = 0;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        assert_eq!(&buf[..n], &data[off..off + n], "at {off}");
        off += n;
    }
    assert_eq!(off, data.len());
    drop(f);
    m.stop();
}

/// "Large files written from the start go up part by part while they are written": what is
/// stored is what was written last, whatever the writer did to parts already on their way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_sent_while_writing_never_win_over_later_writes() {
    let (_g, s) = garage("early").await;
    let mut m = TestMount::start(s.clone(), "part_size=5");
    let chunk = 1 << 20;

    // Sequential, with a chmod and an explicit mtime before close: the data is complete and
    // the metadata is the final one, not what the upload began with.
    let data = pattern(17 << 20, 1);
    let mut f = fs::File::create(m.p("seq")).unwrap();
    for c in data.chunks(chunk) {
        f.write_all(c).unwrap();
    }
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .unwrap();
    f.set_modified(UNIX_EPOCH + Duration::from_secs(1_500_000_000))
        .unwrap();
    drop(f);
    assert!(
        object(&s, "seq").await == data,
        "sequential write stored differently"
    );
    let info = s.head("seq", None).await.unwrap();
    assert_eq!(info.metadata["mode"], (0o100600).to_string());
    assert_eq!(info.metadata["mtime"], "1500000000");

    // Sequential, then an overwrite at the start (a part already sent) and one in the middle.
    let mut want = pattern(16 << 20, 2);
    let mut f = fs::File::create(m.p("rewritten")).unwrap();
    for c in want.chunks(chunk) {
        f.write_all(c).unwrap();
    }
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(b"HEAD").unwrap();
    f.seek(SeekFrom::Start(7 << 20)).unwrap();
    f.write_all(b"MIDDLE").unwrap();
    drop(f);
    want[..4].copy_from_slice(b"HEAD");
    want[7 << 20..(7 << 20) + 6].copy_from_slice(b"MIDDLE");
    assert!(
        object(&s, "rewritten").await == want,
        "the rewritten part was lost"
    );

    // Truncated below what was sent, then written again.
    let mut f = fs::File::create(m.p("truncated")).unwrap();
    for c in pattern(12 << 20, 3).chunks(chunk) {
        f.write_all(c).unwrap();
    }
    f.set_len(3 << 20).unwrap();
    f.seek(SeekFrom::Start(3 << 20)).unwrap();
    f.write_all(b"tail").unwrap();
    drop(f);
    let mut want = pattern(12 << 20, 3);
    want.truncate(3 << 20);
    want.extend_from_slice(b"tail");
    same(&object(&s, "truncated").await, &want, "truncation");

    // fsync in the middle makes what was written durable; writing on continues the file.
    let data = pattern(13 << 20, 4);
    let mut f = fs::File::create(m.p("synced")).unwrap();
    f.write_all(&data[..11 << 20]).unwrap();
    f.sync_all().unwrap();
    assert!(
        object(&s, "synced").await == data[..11 << 20],
        "fsync did not store"
    );
    f.write_all(&data[11 << 20..]).unwrap();
    drop(f);
    assert!(
        object(&s, "synced").await == data,
        "writes after fsync were lost"
    );

    // Removed while written: nothing is stored.
    let mut f = fs::File::create(m.p("gone")).unwrap();
    for c in pattern(11 << 20, 5).chunks(chunk) {
        f.write_all(c).unwrap();
    }
    fs::remove_file(m.p("gone")).unwrap();
    drop(f);
    assert!(
        s.head("gone", None).await.is_err(),
        "an unlinked file was stored"
    );
    m.stop();
}

/// Panics naming the first differing byte (the objects are too big to print).
fn same(got: &[u8], want: &[u8], what: &str) {
    let at = got.iter().zip(want).position(|(a, b)| a != b);
    assert!(
        at.is_none() && got.len() == want.len(),
        "{what}: stored {} bytes, wrote {}, first difference at {at:?}",
        got.len(),
        want.len()
    );
}

/// "Our own changes update the cached listing": names created, written and removed through
/// the mount show at once; changes behind its back show once the listing expires (`ttl=`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_changes_keep_the_listing_current() {
    let (_g, s) = garage("listing").await;
    let mut m = TestMount::start(s.clone(), "ttl=1");
    fs::create_dir(m.p("d")).unwrap();
    let names = |m: &TestMount| {
        let mut v: Vec<String> = fs::read_dir(m.p("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert!(names(&m).is_empty());
    for i in 0..20 {
        fs::write(m.p(&format!("d/f{i:02}")), format!("{i}")).unwrap();
    }
    assert_eq!(names(&m).len(), 20);
    assert_eq!(fs::metadata(m.p("d/f07")).unwrap().len(), 1);
    assert_eq!(fs::metadata(m.p("d/f17")).unwrap().len(), 2);
    fs::create_dir(m.p("d/sub")).unwrap();
    std::os::unix::fs::symlink("f01", m.p("d/link")).unwrap();
    fs::remove_file(m.p("d/f00")).unwrap();
    let now = names(&m);
    assert_eq!(now.len(), 21);
    assert!(now.contains(&"sub".to_string()) && now.contains(&"link".to_string()));
    assert!(!exists(&m.p("d/f00")));
    assert_eq!(fs::read_link(m.p("d/link")).unwrap().to_str(), Some("f01"));
    assert!(fs::symlink_metadata(m.p("d/link"))
        .unwrap()
        .file_type()
        .is_symlink());
    // Behind the mount's back: visible once the listing is older than the TTL.
    s.put(
        "d/outside",
        Body::Bytes(Bytes::from_static(b"o")),
        &Metadata::new(),
    )
    .await
    .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    assert!(names(&m).contains(&"outside".to_string()));
    assert_eq!(fs::read(m.p("d/outside")).unwrap(), b"o");

    // Attributes changed behind its back show once they expire, however often the directory
    // is listed meanwhile (`ls -l` every 300 ms with ttl=1: a cached answer must not count as
    // a fresh one).
    let ls_l = |m: &TestMount| -> u64 {
        let mut size = 0;
        for e in fs::read_dir(m.p("d")).unwrap() {
            let e = e.unwrap();
            let md = fs::symlink_metadata(e.path()).unwrap();
            if e.file_name() == "outside" {
                size = md.len();
            }
        }
        size
    };
    assert_eq!(ls_l(&m), 1);
    s.put(
        "d/outside",
        Body::Bytes(Bytes::from_static(b"12345")),
        &Metadata::new(),
    )
    .await
    .unwrap();
    let mut last = 0;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(300));
        last = ls_l(&m);
    }
    assert_eq!(last, 5, "a size changed 3 s ago still shows the old one");
    m.stop();
}

//! Faults (docs/mount-semantics.md, "Errors and faults"): the server killed during a read and
//! during a write, unmount with open files, a full staging directory; and untrusted keys.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::IntoRawFd;

use bytes::Bytes;
use common::*;
use infra_store::{Body, Metadata};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_during_read_and_write() {
    let _serial = SERIAL.lock().await;
    let (mut g, s) = garage("faults").await;
    let old = pattern(3 << 20, 3);
    s.put(
        "keep.bin",
        Body::Bytes(Bytes::from(old.clone())),
        &Metadata::new(),
    )
    .await
    .unwrap();
    let big = pattern(40 << 20, 4);
    s.put(
        "big.bin",
        Body::Bytes(Bytes::from(big.clone())),
        &Metadata::new(),
    )
    .await
    .unwrap();
    let mut m = TestMount::start(s.clone(), "timeout=5,part_size=5");

    // Read: the first MiB arrives, then the server dies: the reader gets EIO, it does not hang.
    let mut f = fs::File::open(m.p("big.bin")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(buf, big[..1 << 20]);
    // Writers open before the kill.
    let mut w_new = fs::File::create(m.p("new.bin")).unwrap();
    let mut w_keep = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.p("keep.bin"))
        .unwrap();
    g.kill();
    let mut read_err = None;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) => {
                read_err = Some(e);
                break;
            }
        }
    }
    let e = read_err.expect("reading 40 MiB with the server down must fail");
    assert_eq!(errno(&e), nix::libc::EIO, "{e}");

    // Write: data is staged locally; fsync and close report that it could not be stored.
    w_new.write_all(&pattern(12 << 20, 5)).unwrap();
    let e = w_new.sync_all().unwrap_err();
    assert_eq!(errno(&e), nix::libc::EIO, "{e}");
    w_keep
        .write_all(b"new content that must not half-replace the old")
        .unwrap();
    let r = nix::unistd::close(w_keep.into_raw_fd());
    assert_eq!(
        r,
        Err(nix::errno::Errno::EIO),
        "close reports the failed upload"
    );
    drop(w_new);

    g.restart().await;
    // No corrupt object: the old content is intact, the new file was never half-written.
    assert_eq!(object(&s, "keep.bin").await, old);
    match s.head("new.bin", None).await {
        Err(infra_store::Error::NoSuchKey { .. }) => {}
        other => panic!("new.bin must not exist after a failed upload: {other:?}"),
    }
    let pending = s.list("").await.unwrap();
    assert_eq!(pending.len(), 2, "{pending:?}");
    // The mount works again once the server is back.
    fs::write(m.p("after.bin"), b"ok").unwrap();
    assert_eq!(object(&s, "after.bin").await, b"ok");
    let mut again = Vec::new();
    fs::File::open(m.p("big.bin"))
        .unwrap()
        .read_to_end(&mut again)
        .unwrap();
    assert!(again == big, "big.bin reads whole after the restart");
    drop(f);
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmount_with_open_files_and_full_cache() {
    let _serial = SERIAL.lock().await;
    let (_g, s) = garage("unmount").await;
    let mut m = TestMount::start(s.clone(), "cache_size=1M");

    // A full staging directory: the write that does not fit fails with ENOSPC.
    let mut f = fs::File::create(m.p("too-big")).unwrap();
    f.write_all(&vec![1u8; 512 << 10]).unwrap();
    let e = f.write_all(&vec![2u8; 1 << 20]).unwrap_err();
    assert_eq!(errno(&e), nix::libc::ENOSPC, "{e}");
    drop(f);
    // Space is given back when the file is released (the kernel sends that after close
    // returns, so wait for it, boundedly).
    let mut tries = 0;
    while let Err(e) = fs::write(m.p("fits"), vec![3u8; 900 << 10]) {
        assert_eq!(errno(&e), nix::libc::ENOSPC, "{e}");
        tries += 1;
        assert!(tries < 100, "staging space was not given back");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(object(&s, "fits").await.len(), 900 << 10);

    // Unmount while a file is open for writing: refused (EBUSY), nothing lost; after the
    // close the data is in the bucket and unmount succeeds.
    let mut w = fs::File::create(m.p("open.txt")).unwrap();
    w.write_all(b"written before umount").unwrap();
    let e = infra_mount::unmount(&m.path, false).unwrap_err();
    assert!(e.to_string().contains("files are open"), "{e}");
    drop(w);
    assert_eq!(object(&s, "open.txt").await, b"written before umount");
    infra_mount::unmount(&m.path, false).unwrap();
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_keys_are_hidden_never_resolved_outside() {
    let _serial = SERIAL.lock().await;
    let (_g, s) = garage("hostile").await;
    let ok = Body::Bytes(Bytes::from_static(b"fine"));
    s.put("dir/fine.txt", ok.clone(), &Metadata::new())
        .await
        .unwrap();
    // Keys that cannot be file names. The server may refuse some; those it stores must be
    // hidden.
    let hostile = [
        "dir//empty-component",
        "dir/./dot",
        "dir/../escape",
        "../outside",
        "dir/trailing/",
    ];
    let mut stored = 0;
    for k in hostile {
        if s.put(k, ok.clone(), &Metadata::new()).await.is_ok() {
            stored += 1;
        }
    }
    assert!(stored >= 3, "the server should store most of these keys");
    let keys: Vec<String> = s
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert!(
        keys.iter().any(|k| k.contains("//") || k.contains("/../")),
        "hostile keys reached the bucket: {keys:?}"
    );
    let m = TestMount::start(s.clone(), "");
    let mut seen: Vec<String> = sh(&format!("cd '{}' && find . | sort", m.path.display()))
        .lines()
        .map(str::to_string)
        .collect();
    seen.sort();
    // `dir/trailing/` is a `dir/` object: an (empty) directory, which is a valid name.
    assert_eq!(
        seen,
        [".", "./dir", "./dir/fine.txt", "./dir/trailing"],
        "only valid names are shown"
    );
    // Nothing resolves to a name that is not a component.
    for bad in ["dir/..", "dir/."] {
        let p = m.p(bad);
        // These are the kernel's own `.`/`..` and stay inside the mount.
        let c = fs::canonicalize(&p).unwrap();
        assert!(c.starts_with(&m.path), "{bad} -> {}", c.display());
    }
    assert_eq!(fs::read(m.p("dir/fine.txt")).unwrap(), b"fine");
}

/// Work the mount does behind the program's back (attributes fetched ahead for a listing,
/// parts sent while a file is written, metadata replaced after an upload) fails or wastes
/// nothing the program would notice: an error reaches the listing at once, a failed create
/// leaves no name behind, bytes are sent once, and stored data is reported stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_work_fails_cleanly() {
    let _serial = SERIAL.lock().await;
    use infra_store::testing::{Faults, FaultyStore};
    use infra_store::ObjectStore;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::Arc;
    use std::time::Duration;

    let (_g, inner) = garage("background").await;
    let faults = Faults::none();
    let s: Arc<dyn ObjectStore> = Arc::new(FaultyStore::new(inner.clone(), faults.clone()));
    // A long request timeout: a stalled HEAD holds whatever waits for it for ten minutes.
    let mut m = TestMount::start(s, "ttl=60,timeout=600,part_size=5");

    // A listing whose fifth entry cannot be read while a later one hangs: the error reaches
    // the program (ls -l: getdents, then lstat of each entry) without waiting for the hang.
    for i in 0..200 {
        inner
            .put(
                &format!("d/f{i:03}"),
                Body::Bytes(Bytes::from_static(b"x")),
                &Metadata::new(),
            )
            .await
            .unwrap();
    }
    faults.fail_heads.lock().unwrap().insert("d/f005".into());
    faults.stall_heads.lock().unwrap().insert("d/f150".into());
    let dir = m.p("d");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = (|| -> std::io::Result<usize> {
            let mut n = 0;
            for e in fs::read_dir(&dir)? {
                fs::symlink_metadata(e?.path())?;
                n += 1;
            }
            Ok(n)
        })();
        let _ = tx.send(r);
    });
    let listed = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the listing waited for an unrelated stalled request");
    let e = listed.expect_err("an entry whose HEAD fails was listed as fine");
    assert_eq!(errno(&e), nix::libc::EIO, "{e}");
    faults.stall_heads.lock().unwrap().clear();
    faults.fail_heads.lock().unwrap().clear();

    // Preallocated, then written from the start: each byte goes up once (parts are cut from
    // what was written, not from the file's size).
    let before = faults.part_bytes.load(SeqCst);
    let data = pattern(12 << 20, 7);
    let mut f = fs::File::create(m.p("prealloc")).unwrap();
    f.set_len(12 << 20).unwrap();
    for c in data.chunks(1 << 20) {
        f.write_all(c).unwrap();
    }
    drop(f);
    assert!(
        object(&inner, "prealloc").await == data,
        "prealloc stored wrong"
    );
    assert_eq!(
        faults.part_bytes.load(SeqCst) - before,
        12 << 20,
        "bytes sent in parts for a 12 MiB file"
    );

    // Removed while written: no part goes up after the unlink.
    let before = faults.part_bytes.load(SeqCst);
    let mut f = fs::File::create(m.p("unlinked")).unwrap();
    for c in pattern(6 << 20, 8).chunks(1 << 20) {
        f.write_all(c).unwrap();
    }
    fs::remove_file(m.p("unlinked")).unwrap();
    for c in pattern(10 << 20, 9).chunks(1 << 20) {
        f.write_all(c).unwrap();
    }
    drop(f);
    let sent = faults.part_bytes.load(SeqCst) - before;
    assert!(
        sent <= 5 << 20,
        "{sent} bytes sent in parts for a file removed after its first 5 MiB part"
    );
    assert!(inner.head("unlinked", None).await.is_err());

    // The data went up in parts, but replacing its metadata afterwards (a chmod before the
    // fsync) fails: fsync still succeeds, since the data is stored.
    faults.fail_copies.store(true, SeqCst);
    let data = pattern(11 << 20, 10);
    let mut f = fs::File::create(m.p("copyfail")).unwrap();
    for c in data.chunks(1 << 20) {
        f.write_all(c).unwrap();
    }
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .unwrap();
    f.sync_all()
        .expect("fsync failed although the data was stored");
    assert!(
        object(&inner, "copyfail").await == data,
        "copyfail stored wrong"
    );
    // The metadata is stored at the next close, once the server takes copies again.
    faults.fail_copies.store(false, SeqCst);
    drop(f);
    let info = inner.head("copyfail", None).await.unwrap();
    assert_eq!(
        info.metadata["mode"],
        (0o100600).to_string(),
        "the mode was not stored after the failed copy"
    );

    // A create that cannot stage (the cache directory is not a directory) leaves no name.
    fs::create_dir(m.p("e")).unwrap();
    fs::write(m.p("e/one"), b"1").unwrap();
    assert_eq!(fs::read_dir(m.p("e")).unwrap().count(), 1);
    let cache = m.cache.path().to_path_buf();
    fs::remove_dir_all(&cache).unwrap();
    fs::write(&cache, b"not a directory").unwrap();
    let e = fs::File::create(m.p("e/two")).expect_err("created without a staging file");
    // Not EEXIST or ENOTDIR: they would be about the program's file, not our cache.
    assert_eq!(errno(&e), nix::libc::EIO, "{e}");
    let names: Vec<_> = fs::read_dir(m.p("e"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["one"], "a failed create left its name");
    assert!(!exists(&m.p("e/two")), "a failed create left a file");
    fs::remove_file(&cache).unwrap();
    fs::create_dir(&cache).unwrap();
    m.stop();
}

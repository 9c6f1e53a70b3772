//! File transfer against a hostile agent: a stand-in speaks the framing over a real TCP socket
//! to the real `AgentClient` and serves `list_files`/`get_file`/`put_file` with lies (unsafe
//! paths, too many entries, chunks larger than asked, sizes that change). Each case ends with
//! `RunError::Protocol`, never panics or hangs, and leaves nothing on the host: not outside
//! the output directory, and not inside it either (files of a failed collection are removed).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use infra_protocol::{
    read_message_async, write_message_async, FileEntry, Reply, Request, RequestBody,
    FEATURE_FILE_TRANSFER, PROTOCOL_VERSION,
};
use infra_runner::{
    collect_outputs, AgentClient, CollectedOutputs, OutputLimits, RunError, SkipReason, Violation,
    FILE_CHUNK_BYTES,
};
use tokio::net::{TcpListener, TcpStream};

/// How the stand-in lies in `file_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lie {
    /// Tells the truth.
    None,
    /// Sends one byte more than asked.
    ExtraByte,
    /// Reports a size one byte larger on every range after the first.
    GrowingSize,
    /// Reports a size larger than the listing said.
    BiggerThanListed,
    /// Sends one byte less than the range holds.
    ShortChunk,
    /// Sends one byte more than the range holds (but not more than asked).
    PastTheEnd,
}

/// The stand-in's files and behaviour.
struct Fake {
    /// Served by `get_file`, listed by `list_files` (unless `listing` overrides).
    files: BTreeMap<String, Vec<u8>>,
    /// Listing sent instead of the truth (hostile paths, too many entries).
    listing: Option<Vec<FileEntry>>,
    lie: Lie,
    /// Announce the file-transfer feature in hello.
    features: bool,
}

impl Fake {
    fn new(files: &[(&str, Vec<u8>)]) -> Self {
        Self {
            files: files
                .iter()
                .map(|(k, v)| (format!("output/{k}"), v.clone()))
                .collect(),
            listing: None,
            lie: Lie::None,
            features: true,
        }
    }
}

/// What the stand-in received: `(path, bytes, append)` per `put_file`.
type Puts = Arc<Mutex<Vec<(String, usize, bool)>>>;

fn entry(path: &str, size: u64) -> FileEntry {
    FileEntry {
        path: path.into(),
        size,
        mode: 0o644,
    }
}

async fn serve(mut s: TcpStream, fake: Fake, puts: Puts) {
    let hello: Request = read_message_async(&mut s).await.unwrap().unwrap();
    let features = if fake.features {
        vec![FEATURE_FILE_TRANSFER.to_string()]
    } else {
        vec![]
    };
    let reply = Reply::HelloReply {
        id: hello.id,
        version: PROTOCOL_VERSION,
        agent_version: "hostile".into(),
        languages: vec!["python".into()],
        features,
    };
    write_message_async(&mut s, &reply).await.unwrap();
    let mut ranges = 0u64;
    while let Ok(Some(req)) = read_message_async::<Request, _>(&mut s).await {
        let id = req.id;
        let reply = match req.body {
            RequestBody::ListFiles(l) => {
                let all: Vec<FileEntry> = fake
                    .files
                    .iter()
                    .map(|(k, v)| entry(k.strip_prefix("output/").unwrap(), v.len() as u64))
                    .collect();
                let truncated = all.len() as u64 > l.max_entries;
                let honest = all.into_iter().take(l.max_entries as usize).collect();
                Reply::FileList {
                    id,
                    entries: fake.listing.clone().unwrap_or(honest),
                    truncated,
                }
            }
            RequestBody::GetFile(g) => {
                let data = fake.files.get(&g.path).cloned().unwrap_or_default();
                let size = data.len() as u64;
                let start = g.offset.min(size) as usize;
                let end = (g.offset + g.length.unwrap_or(u64::MAX).min(size - g.offset)).min(size)
                    as usize;
                let mut chunk = data[start..end].to_vec();
                let mut size = size;
                // Only the file named b.bin is lied about; the others come back intact.
                let lie = if g.path.ends_with("b.bin") {
                    fake.lie
                } else {
                    Lie::None
                };
                match lie {
                    Lie::None => {}
                    Lie::ExtraByte => chunk.push(b'!'),
                    Lie::GrowingSize => size += ranges,
                    Lie::BiggerThanListed => size += 1,
                    Lie::ShortChunk => {
                        chunk.pop();
                    }
                    Lie::PastTheEnd if end == size as usize => chunk.push(b'!'),
                    Lie::PastTheEnd => {}
                }
                ranges += 1;
                Reply::FileData {
                    id,
                    data: chunk,
                    mode: 0o644,
                    size,
                }
            }
            RequestBody::PutFile(p) => {
                puts.lock().unwrap().push((p.path, p.data.len(), p.append));
                Reply::Ok { id }
            }
            _ => Reply::Ok { id },
        };
        if write_message_async(&mut s, &reply).await.is_err() {
            return;
        }
    }
}

/// A greeted client talking to `fake`.
async fn client(fake: Fake) -> (AgentClient<TcpStream>, Puts) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let puts: Puts = Arc::default();
    let p = Arc::clone(&puts);
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        serve(s, fake, p).await;
    });
    let mut c = AgentClient::new(TcpStream::connect(addr).await.unwrap());
    c.hello().await.unwrap();
    (c, puts)
}

/// A scratch area: `root/out` is the output directory; nothing else may appear under `root`.
struct Scratch {
    root: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("out")).unwrap();
        Self { root }
    }

    fn limits(&self, max_files: usize) -> OutputLimits {
        OutputLimits {
            dir: self.root.path().join("out"),
            max_files,
            max_file_bytes: 16 << 20,
            max_total_bytes: 64 << 20,
        }
    }

    /// Empties the output directory.
    fn clear(&self) {
        for e in std::fs::read_dir(self.root.path().join("out"))
            .unwrap()
            .flatten()
        {
            std::fs::remove_file(e.path()).unwrap();
        }
    }

    /// Every path under the scratch root, relative.
    fn tree(&self) -> Vec<String> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                out.push(p.strip_prefix(base).unwrap().display().to_string());
                if e.file_type().unwrap().is_dir() {
                    walk(&p, base, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(self.root.path(), self.root.path(), &mut out);
        out.sort();
        out
    }
}

async fn collect(
    fake: Fake,
    scratch: &Scratch,
    max_files: usize,
) -> Result<CollectedOutputs, RunError> {
    collect_with(fake, &scratch.limits(max_files)).await
}

async fn collect_with(fake: Fake, limits: &OutputLimits) -> Result<CollectedOutputs, RunError> {
    let (mut c, _) = client(fake).await;
    tokio::time::timeout(Duration::from_secs(60), collect_outputs(&mut c, limits))
        .await
        .expect("the host must not hang on a hostile agent")
}

fn violation(r: Result<CollectedOutputs, RunError>) -> Violation {
    match r {
        Err(RunError::Protocol { violation }) => violation,
        other => panic!("expected a protocol violation, got {other:?}"),
    }
}

/// A well-behaved agent: files come back under their index, in name order, byte for byte (the
/// 5 MiB one in three ranges); files over the caps are named as skipped, and a listing cut at
/// `max_files + 1` says so.
#[tokio::test]
async fn outputs_come_back_by_index_within_the_caps() {
    let big: Vec<u8> = (0..5u32 << 20).map(|i| (i % 251) as u8).collect();
    let files = [
        ("a-too-big.bin", vec![0; (16 << 20) + 1]),
        ("result.txt", b"hello".to_vec()),
        ("sub/b.bin", big.clone()),
        ("y.txt", b"y".to_vec()),
        ("z.txt", b"z".to_vec()),
    ];
    let s = Scratch::new();
    let got = collect(Fake::new(&files), &s, 2).await.unwrap();
    let names: Vec<(&str, u64)> = got
        .files
        .iter()
        .map(|f| (f.name.as_str(), f.bytes))
        .collect();
    assert_eq!(names, [("result.txt", 5), ("sub/b.bin", 5 << 20)]);
    assert_eq!(got.files[0].host_path, s.root.path().join("out/0"));
    assert_eq!(
        std::fs::read(s.root.path().join("out/0")).unwrap(),
        b"hello"
    );
    assert!(std::fs::read(s.root.path().join("out/1")).unwrap() == big);
    let skipped: Vec<(&str, SkipReason)> = got
        .skipped
        .iter()
        .map(|k| (k.name.as_str(), k.reason))
        .collect();
    assert_eq!(skipped, [("a-too-big.bin", SkipReason::FileTooLarge)]);
    assert!(got.truncated, "3 of 5 listed");
    assert_eq!(s.tree(), ["out", "out/0", "out/1"]);

    // The total cap, then the file count.
    s.clear();
    let mut limits = s.limits(3);
    limits.max_total_bytes = 4 << 20;
    let got = collect_with(Fake::new(&files[1..]), &limits).await.unwrap();
    let names: Vec<&str> = got.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["result.txt", "y.txt", "z.txt"]);
    let skipped: Vec<(&str, SkipReason)> = got
        .skipped
        .iter()
        .map(|k| (k.name.as_str(), k.reason))
        .collect();
    assert_eq!(skipped, [("sub/b.bin", SkipReason::TotalTooLarge)]);
    assert!(!got.truncated);
    s.clear();
    let got = collect_with(Fake::new(&files[1..]), &s.limits(2))
        .await
        .unwrap();
    assert_eq!(got.files.len(), 2);
    assert_eq!(got.skipped[0].reason, SkipReason::TooManyFiles);
    assert_eq!(got.skipped[0].name, "y.txt");
}

/// Listed paths that would leave the output directory, or that no file system can hold, end
/// the collection before anything is created.
#[tokio::test]
async fn hostile_listed_paths_are_violations_and_nothing_is_written() {
    let long = "x".repeat(256);
    let cases: Vec<(Vec<FileEntry>, &str)> = vec![
        (vec![entry("ok.txt", 1), entry("../../etc/x", 1)], "dotdot"),
        (vec![entry("/etc/x", 1)], "absolute"),
        (vec![entry("a//b", 1)], "empty component"),
        (vec![entry("a\nb", 1)], "control"),
        (vec![entry("a\0b", 1)], "nul"),
        (vec![entry(&long, 1)], "long component"),
        (vec![entry("a", 1), entry("a", 1)], "duplicate"),
        (vec![entry("a", 1), entry("a/b", 1)], "file and dir"),
    ];
    for (listing, what) in cases {
        let mut fake = Fake::new(&[]);
        fake.files.insert("output/ok.txt".into(), b"1".to_vec());
        fake.listing = Some(listing);
        let s = Scratch::new();
        let v = violation(collect(fake, &s, 10).await);
        assert!(
            matches!(
                v,
                Violation::UnsafePath { .. } | Violation::PathConflict { .. }
            ),
            "{what}: {v}"
        );
        assert!(!v.to_string().contains('\n'), "{what}: {v}");
        assert_eq!(s.tree(), ["out"], "{what}");
    }
}

#[tokio::test]
async fn too_many_entries_is_a_violation() {
    let mut fake = Fake::new(&[]);
    fake.listing = Some((0..4).map(|i| entry(&format!("f{i}"), 1)).collect());
    let s = Scratch::new();
    // max_files 2: the host asks for 3.
    let v = violation(collect(fake, &s, 2).await);
    assert!(
        matches!(v, Violation::TooManyEntries { got: 4, max: 3 }),
        "{v}"
    );
    assert_eq!(s.tree(), ["out"]);
}

/// Lies in `file_data` end the collection, and what was written is removed: the intact
/// `a.txt` downloaded first and the partly written `b.bin`.
#[tokio::test]
async fn lying_file_data_is_a_violation_and_partial_files_are_removed() {
    let big = vec![7u8; (FILE_CHUNK_BYTES as usize) * 2 + 10];
    for lie in [
        Lie::ExtraByte,
        Lie::GrowingSize,
        Lie::BiggerThanListed,
        Lie::ShortChunk,
        Lie::PastTheEnd,
    ] {
        let mut fake = Fake::new(&[("a.txt", b"fine".to_vec()), ("b.bin", big.clone())]);
        fake.lie = lie;
        let s = Scratch::new();
        let v = violation(collect(fake, &s, 10).await);
        let ok = match lie {
            Lie::ExtraByte => matches!(v, Violation::ChunkTooLarge { .. }),
            Lie::GrowingSize | Lie::BiggerThanListed => matches!(v, Violation::SizeChanged { .. }),
            Lie::ShortChunk => matches!(v, Violation::ChunkMismatch { .. }),
            // The host asks for exactly the rest, so a byte past the end is also more than
            // asked.
            Lie::PastTheEnd => matches!(
                v,
                Violation::ChunkMismatch { .. } | Violation::ChunkTooLarge { .. }
            ),
            Lie::None => unreachable!(),
        };
        assert!(ok, "{lie:?}: {v}");
        assert_eq!(s.tree(), ["out"], "{lie:?}");
    }
}

/// A size that grows between ranges is caught on the second range of a plain
/// `get_file_chunked` too, after exactly one range was written.
#[tokio::test]
async fn get_file_chunked_refuses_a_growing_size() {
    let mut fake = Fake::new(&[("b.bin", vec![1u8; (FILE_CHUNK_BYTES as usize) + 1])]);
    fake.lie = Lie::GrowingSize;
    let (mut c, _) = client(fake).await;
    let mut sink = Vec::new();
    let r = c.get_file_chunked("output/b.bin", &mut sink, 1 << 30).await;
    assert!(
        matches!(
            r,
            Err(RunError::Protocol {
                violation: Violation::SizeChanged { .. }
            })
        ),
        "{r:?}"
    );
    assert_eq!(sink.len() as u64, FILE_CHUNK_BYTES);
    // Over the caller's limit: refused before anything is written.
    let (mut c, _) = client(Fake::new(&[("b.bin", vec![1u8; 100])])).await;
    let mut sink = Vec::new();
    let r = c.get_file_chunked("output/b.bin", &mut sink, 99).await;
    assert!(
        matches!(
            r,
            Err(RunError::FileTooLarge {
                size: 100,
                max: 99,
                ..
            })
        ),
        "{r:?}"
    );
    assert!(sink.is_empty());
}

/// `put_file` sends 2 MiB chunks, the first creating the file and the rest appending; an empty
/// file is one empty chunk.
#[tokio::test]
async fn put_file_streams_in_appended_chunks() {
    let (mut c, puts) = client(Fake::new(&[])).await;
    let data = vec![3u8; (5 << 20) + 1];
    let sent = c.put_file("in/big.bin", &data[..], 0o644).await.unwrap();
    assert_eq!(sent, data.len() as u64);
    let sent = c.put_file("empty", &b""[..], 0o644).await.unwrap();
    assert_eq!(sent, 0);
    let two = 2 << 20;
    assert_eq!(
        *puts.lock().unwrap(),
        [
            ("in/big.bin".to_string(), two, false),
            ("in/big.bin".to_string(), two, true),
            ("in/big.bin".to_string(), (1 << 20) + 1, true),
            ("empty".to_string(), 0, false),
        ]
    );
}

/// An agent that does not announce the feature is not sent chunked or listing requests.
#[tokio::test]
async fn an_agent_without_file_transfer_is_refused_before_any_request() {
    let mut fake = Fake::new(&[("a", b"a".to_vec())]);
    fake.features = false;
    let (mut c, puts) = client(fake).await;
    let r = c.put_file("x", &b"data"[..], 0o644).await;
    assert!(matches!(r, Err(RunError::AgentTooOld { .. })), "{r:?}");
    let s = Scratch::new();
    let r = collect_outputs(&mut c, &s.limits(5)).await;
    assert!(matches!(r, Err(RunError::AgentTooOld { .. })), "{r:?}");
    assert!(puts.lock().unwrap().is_empty());
}

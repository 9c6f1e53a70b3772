//! Replays every saved corpus file (seeds plus what fuzzing found worth keeping) through its
//! target, so a crash the fuzzer once found stays fixed. Runs in CI with the other tests.

fn replay(target: &str, f: fn(&[u8])) {
    let dir = infra_fuzz::corpus_dir(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let r = std::panic::catch_unwind(|| f(&data));
        assert!(r.is_ok(), "{target}: {} panics", path.display());
        n += 1;
    }
    assert!(n > 0, "{target}: empty corpus at {}", dir.display());
}

#[test]
fn unpack_layer_corpus() {
    replay("unpack_layer", infra_fuzz::unpack_layer);
}

#[test]
fn archive_index_corpus() {
    replay("archive_index", infra_fuzz::archive_index);
}

#[test]
fn registry_documents_corpus() {
    replay("registry_documents", infra_fuzz::registry_documents);
}

#[test]
fn frames_corpus() {
    replay("frames", infra_fuzz::frames);
}

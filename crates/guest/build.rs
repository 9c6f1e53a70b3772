//! Fingerprints the sources the in-VM agent is built from, as `INFRA_AGENT_BUILD`: the agent
//! binary prints it in `--version`, and the host ships that binary only when it carries the
//! host's own fingerprint, so an agent built from older sources (same version number) is never
//! put into images or the initramfs.

use std::path::{Path, PathBuf};

/// What the agent's behaviour comes from, relative to this crate; missing ones are skipped.
const INPUTS: &[&str] = &[
    "src",
    "Cargo.toml",
    "build.rs",
    "../agent/src",
    "../agent/Cargo.toml",
    "../protocol/src",
    "../protocol/Cargo.toml",
    "../languages/src",
    "../languages/languages.toml",
    "../languages/Cargo.toml",
    "../config/src",
    "../config/Cargo.toml",
    "../../Cargo.toml",
    "../../Cargo.lock",
];

/// FNV-1a, 64 bits: stable across toolchains (the fingerprint is compared between builds).
fn fnv(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= u64::from(*b);
        *h = h.wrapping_mul(0x0100_0000_01b3);
    }
}

fn files(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_dir() {
        let Ok(rd) = std::fs::read_dir(p) else { return };
        for e in rd.flatten() {
            files(&e.path(), out);
        }
    } else if p.is_file() {
        out.push(p.to_path_buf());
    }
}

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let mut all = Vec::new();
    for i in INPUTS {
        let p = dir.join(i);
        println!("cargo:rerun-if-changed={}", p.display());
        files(&p, &mut all);
    }
    all.sort();
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for f in &all {
        let rel = f.strip_prefix(&dir).unwrap_or(f);
        fnv(&mut h, rel.to_string_lossy().as_bytes());
        fnv(&mut h, &[0]);
        fnv(&mut h, &std::fs::read(f).unwrap_or_default());
        fnv(&mut h, &[0]);
    }
    println!("cargo:rustc-env=INFRA_AGENT_BUILD={h:016x}");
}

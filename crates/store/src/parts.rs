//! Per-part sha256s: what lets a ranged download verify each part as it arrives, in parallel,
//! instead of a second, serial sha256 pass over the whole file.
//!
//! # What is recorded
//!
//! A multipart upload hashes the file once before sending (one read, the whole-object sha256 and
//! the part sha256s computed side by side on two threads) and records:
//!
//! - in the object's metadata (set when the upload starts, immutable afterwards, like the
//!   whole-object `sha256` already there): `part-size` and `parts-sha256`, the **part-list
//!   digest** = sha256 of the concatenated raw 32-byte part digests, in part order. That is
//!   exactly S3's `COMPOSITE` SHA-256 checksum (`x-amz-checksum-sha256: <base64>-<N>`), so on a
//!   server that computes one the two can be compared;
//! - the list itself in a small **sidecar object**, `.parts/<parts-sha256>` under the store's
//!   prefix: JSON `{"size": …, "part_size": …, "sha256": ["<hex>", …]}`.
//!
//! Why a sidecar and not the metadata: S3 limits user metadata to 2 KiB, and a 1 GiB object in
//! 16 MiB parts has 64 digests (4 KiB of hex). Larger parts (≤ 30 digests) would make the ranges
//! of a download as large as 1/30 of the object, hurting its parallelism on large objects and
//! still not fitting for a 10 GiB one. The sidecar is named by its own digest (content
//! addressed): it never changes once written, every version of an object keeps its own list,
//! and a download checks the list it fetched against the digest in the object's metadata before
//! using it, so the list is exactly as trustworthy as the whole-object sha256 beside it (both
//! are written only by whoever writes the object). Sidecars are tiny (~70 bytes per part), are
//! left out of listings (unless the prefix asked for is within `.parts/`), so `store ls` and
//! `store sync` neither show, copy nor delete them (a copy made by sync downloads with the
//! whole-object sha256, its list being absent), and are not removed with their object.
//!
//! Why not S3's own per-part checksums: Garage 2.5.0 (our test and bench server) accepts
//! `ChecksumAlgorithm=SHA256` on CreateMultipartUpload and `x-amz-checksum-sha256` on
//! UploadPart (and rejects a part whose checksum is wrong), returns them in ListParts and the
//! composite `<base64>-N` on CompleteMultipartUpload, but after completion it does not give the
//! part checksums back: GetObjectAttributes (`ObjectParts`) answers 500, and HEAD/GET with
//! `partNumber` and checksum mode returns the composite checksum, not the part's. A client
//! downloading from Garage could not get the list from the server, so it keeps its own.
//!
//! # What a download checks, and what it guarantees
//!
//! With a part list (objects uploaded by this version): each ranged GET covers exactly one
//! part; the task that fetched it hashes the bytes as they arrive and compares with the part's
//! digest before the part counts as written. A mismatch fails the download naming the part,
//! and nothing is left at the destination (temp file + rename). Every byte of the file is then
//! covered by a digest bound to the object's metadata, the same trust as the whole-object sha256.
//! The whole-object sha256 is **not recomputed** (it cannot be derived from part digests): the
//! download summary says `verified: "parts"` and reports the sha256 from the metadata.
//!
//! Without one (objects uploaded by aws-cli, s5cmd or older versions): the whole-object sha256
//! is computed in order while chunks arrive, as before (`verified: "sha256"`), or nothing is
//! verified when the metadata has no sha256 either (`verified: "none"`).
//!
//! The list comes from the store and is untrusted until checked: its digest must match the
//! metadata, the part size must be one S3 accepts, the count must be what the object size and
//! part size imply (≤ 10 000), the sizes must add up to the object's size and every digest must
//! be 64 hex digits. A list that fails any check refuses the download; a list that is missing
//! (sidecar deleted) falls back to the whole-object sha256.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::object::Metadata;
use crate::transfer::{MAX_PART, MAX_PARTS, MIN_PART};

/// Metadata key: digest of the part list (sha256 of the concatenated raw part digests, hex).
pub const META_PARTS_SHA256: &str = "parts-sha256";
/// Metadata key: part size in bytes (every part but the last).
pub const META_PART_SIZE: &str = "part-size";
/// Prefix (under the store's prefix) of the part-list sidecars.
pub const PARTS_PREFIX: &str = ".parts/";
/// Largest sidecar accepted (10 000 parts of ~70 bytes, with room to spare).
pub const MAX_SIDECAR: u64 = 1024 * 1024;

/// The sha256 of every part of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartList {
    /// Object size in bytes.
    pub size: u64,
    /// Size of every part but the last.
    pub part_size: u64,
    /// Raw sha256 of each part, in order.
    pub digests: Vec<[u8; 32]>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    size: u64,
    part_size: u64,
    sha256: Vec<String>,
}

impl PartList {
    /// Length of part `i` (0-based).
    pub fn part_len(&self, i: usize) -> u64 {
        let start = i as u64 * self.part_size;
        self.part_size.min(self.size - start)
    }

    /// The list's digest: sha256 of the concatenated raw digests (S3's composite checksum).
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for d in &self.digests {
            h.update(d);
        }
        hex::encode(h.finalize())
    }

    /// Key of the sidecar holding this list.
    pub fn sidecar_key(&self) -> String {
        sidecar_key(&self.digest())
    }

    /// The sidecar's content.
    pub fn to_json(&self) -> Vec<u8> {
        let w = Wire {
            size: self.size,
            part_size: self.part_size,
            sha256: self.digests.iter().map(hex::encode).collect(),
        };
        serde_json::to_vec(&w).unwrap_or_default()
    }

    /// Records the list's digest and part size in `meta`.
    pub fn add_to_metadata(&self, meta: &mut Metadata) {
        meta.insert(META_PARTS_SHA256.into(), self.digest());
        meta.insert(META_PART_SIZE.into(), self.part_size.to_string());
    }

    /// Parses and validates a sidecar fetched from the store for an object of `size` bytes whose
    /// metadata names the list by `expected_digest` and `part_size`.
    pub fn parse(
        bytes: &[u8],
        expected_digest: &str,
        part_size: u64,
        size: u64,
        target: &str,
    ) -> Result<Self> {
        let bad = |reason: String| Error::Corrupt {
            target: target.to_string(),
            reason: format!("its part list is invalid ({reason})"),
        };
        let w: Wire = serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        if w.size != size {
            return Err(bad(format!(
                "it covers {} bytes, the object has {size}",
                w.size
            )));
        }
        if w.part_size != part_size {
            return Err(bad(format!(
                "part size {} in the list, {part_size} in the metadata",
                w.part_size
            )));
        }
        check_part_size(part_size, size).map_err(bad)?;
        let want = size.div_ceil(part_size).max(1);
        if w.sha256.len() as u64 != want {
            return Err(bad(format!(
                "{} digests for {want} parts of {part_size} bytes",
                w.sha256.len()
            )));
        }
        let mut digests = Vec::with_capacity(w.sha256.len());
        for (i, s) in w.sha256.iter().enumerate() {
            digests.push(parse_digest(s).ok_or_else(|| {
                bad(format!(
                    "digest of part {} is not 64 hex digits: {s:.80}",
                    i + 1
                ))
            })?);
        }
        let list = Self {
            size,
            part_size,
            digests,
        };
        // Sizes implied by the part size must add up to the object (guards the arithmetic).
        let total: u64 = (0..list.digests.len()).map(|i| list.part_len(i)).sum();
        if total != size {
            return Err(bad(format!("parts add up to {total} bytes, not {size}")));
        }
        let actual = list.digest();
        if !actual.eq_ignore_ascii_case(expected_digest) {
            return Err(bad(format!(
                "its digest is {actual}, the object's metadata says {expected_digest}"
            )));
        }
        Ok(list)
    }
}

/// What the object's metadata says about its part list, if anything: (digest, part size).
pub fn from_metadata(meta: &Metadata, target: &str) -> Result<Option<(String, u64)>> {
    let (Some(d), Some(ps)) = (meta.get(META_PARTS_SHA256), meta.get(META_PART_SIZE)) else {
        return Ok(None);
    };
    let bad = |reason: String| Error::Corrupt {
        target: target.to_string(),
        reason: format!("its metadata names an invalid part list ({reason})"),
    };
    if parse_digest(d).is_none() {
        return Err(bad(format!("{META_PARTS_SHA256} is not 64 hex digits")));
    }
    let ps: u64 = ps
        .parse()
        .map_err(|_| bad(format!("{META_PART_SIZE} {ps:.40} is not a number")))?;
    Ok(Some((d.to_ascii_lowercase(), ps)))
}

/// Key of the sidecar of the list with this digest.
pub fn sidecar_key(digest: &str) -> String {
    format!("{PARTS_PREFIX}{}", digest.to_ascii_lowercase())
}

/// True for keys of part-list sidecars (not user objects).
pub fn is_sidecar_key(key: &str) -> bool {
    key.starts_with(PARTS_PREFIX)
}

fn check_part_size(part_size: u64, size: u64) -> std::result::Result<(), String> {
    // A single-part object may be smaller than S3's minimum part.
    if part_size > MAX_PART || (part_size < MIN_PART && size > part_size) || part_size == 0 {
        return Err(format!("part size {part_size} is outside 5 MiB..5 GiB"));
    }
    if size.div_ceil(part_size) > MAX_PARTS {
        return Err(format!(
            "{} parts, S3 allows 10000",
            size.div_ceil(part_size)
        ));
    }
    Ok(())
}

fn parse_digest(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn list(size: u64, part_size: u64) -> PartList {
        let n = size.div_ceil(part_size) as usize;
        PartList {
            size,
            part_size,
            digests: (0..n).map(|i| Sha256::digest([i as u8]).into()).collect(),
        }
    }

    fn reparse(l: &PartList, json: &[u8]) -> Result<PartList> {
        PartList::parse(json, &l.digest(), l.part_size, l.size, "s3://b/k")
    }

    #[test]
    fn round_trip() {
        let l = list(100 * MIB + 7, 16 * MIB);
        assert_eq!(l.digests.len(), 7);
        assert_eq!(l.part_len(6), 4 * MIB + 7);
        assert_eq!(reparse(&l, &l.to_json()).unwrap(), l);
        let mut m = Metadata::new();
        l.add_to_metadata(&mut m);
        assert_eq!(
            from_metadata(&m, "x").unwrap(),
            Some((l.digest(), 16 * MIB))
        );
        assert!(is_sidecar_key(&l.sidecar_key()));
    }

    #[test]
    fn digest_is_s3_composite() {
        // sha256 of the concatenated raw part digests, as S3 computes COMPOSITE checksums.
        let l = list(32 * MIB, 16 * MIB);
        let mut cat = Vec::new();
        cat.extend_from_slice(&l.digests[0]);
        cat.extend_from_slice(&l.digests[1]);
        assert_eq!(l.digest(), hex::encode(Sha256::digest(&cat)));
    }

    #[test]
    fn hostile_lists_are_refused() {
        let l = list(100 * MIB, 16 * MIB);
        let wire = |size: u64, ps: u64, d: Vec<String>| {
            serde_json::to_vec(&Wire {
                size,
                part_size: ps,
                sha256: d,
            })
            .unwrap()
        };
        let hexes: Vec<String> = l.digests.iter().map(hex::encode).collect();
        // Fewer parts than the size needs (and its digest recomputed to match, as a hostile
        // writer of both would do).
        let short = PartList {
            digests: l.digests[..6].to_vec(),
            ..l.clone()
        };
        let e = PartList::parse(
            &wire(l.size, l.part_size, hexes[..6].to_vec()),
            &short.digest(),
            l.part_size,
            l.size,
            "s3://b/k",
        )
        .unwrap_err();
        assert!(e.to_string().contains("6 digests for 7 parts"), "{e}");
        // Claims fewer bytes than the object has.
        let e = reparse(&l, &wire(l.size - 1, l.part_size, hexes.clone())).unwrap_err();
        assert!(e.to_string().contains("covers"), "{e}");
        // Part size disagreeing with the metadata, or out of S3's range.
        assert!(reparse(&l, &wire(l.size, 8 * MIB, hexes.clone())).is_err());
        let tiny = list(100 * MIB, MIB);
        assert!(reparse(&tiny, &tiny.to_json()).is_err());
        // Not hex, wrong length, upper-case is fine.
        let mut h2 = hexes.clone();
        h2[3] = "zz".repeat(32);
        let e = reparse(&l, &wire(l.size, l.part_size, h2)).unwrap_err();
        assert!(e.to_string().contains("part 4"), "{e}");
        let mut h3 = hexes.clone();
        h3[0].pop();
        assert!(reparse(&l, &wire(l.size, l.part_size, h3)).is_err());
        let upper: Vec<String> = hexes.iter().map(|h| h.to_ascii_uppercase()).collect();
        assert_eq!(reparse(&l, &wire(l.size, l.part_size, upper)).unwrap(), l);
        // A different list than the metadata names.
        let mut h4 = hexes.clone();
        h4.swap(0, 1);
        let e = reparse(&l, &wire(l.size, l.part_size, h4)).unwrap_err();
        assert!(e.to_string().contains("metadata says"), "{e}");
        // Unknown fields, garbage.
        assert!(reparse(&l, b"{\"size\":1}").is_err());
        assert!(reparse(&l, b"not json").is_err());
        // Metadata.
        let mut m = Metadata::new();
        m.insert(META_PARTS_SHA256.into(), "00".into());
        m.insert(META_PART_SIZE.into(), "16".into());
        assert!(from_metadata(&m, "x").is_err());
        m.insert(META_PARTS_SHA256.into(), l.digest());
        m.insert(META_PART_SIZE.into(), "-1".into());
        assert!(from_metadata(&m, "x").is_err());
        assert_eq!(from_metadata(&Metadata::new(), "x").unwrap(), None);
    }
}

//! Ids: `file-…`, `upload_…`, `part_…` (OpenAI's prefixes), unguessable.
//!
//! A file id is `file-` + 9 hex digits of its `created_at` (unix seconds) + 24 random base62
//! characters (~142 bits). Carrying the creation time lets a list cursor (`after=<file id>`)
//! be turned into the keyset position `(created_at, id)` even when that file was deleted in
//! the meantime. Upload and part ids are the prefix + 24 random base62 characters.

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Random characters in every id.
pub const RANDOM_CHARS: usize = 24;
const TS_HEX: usize = 9;

/// `n` random base62 characters from the OS generator (rejection sampling, no bias).
pub(crate) fn random_base62(n: usize) -> String {
    let mut out = String::with_capacity(n);
    while out.len() < n {
        // uuid v4: 122 random bits from getrandom; use all 16 bytes but the two with fixed bits.
        let u = uuid::Uuid::new_v4();
        for (i, b) in u.as_bytes().iter().enumerate() {
            if i == 6 || i == 8 || out.len() == n {
                continue;
            }
            if *b < 248 {
                out.push(ALPHABET[(*b % 62) as usize] as char);
            }
        }
    }
    out
}

/// A new file id created at `created_at`.
pub(crate) fn new_file_id(created_at: i64) -> String {
    format!(
        "file-{:0w$x}{}",
        created_at.max(0),
        random_base62(RANDOM_CHARS),
        w = TS_HEX
    )
}

/// A new upload id.
pub(crate) fn new_upload_id() -> String {
    format!("upload_{}", random_base62(RANDOM_CHARS))
}

/// A new part id.
pub(crate) fn new_part_id() -> String {
    format!("part_{}", random_base62(RANDOM_CHARS))
}

/// The `created_at` of a well-formed file id; `None` for anything else.
pub fn file_id_created_at(id: &str) -> Option<i64> {
    let rest = id.strip_prefix("file-")?;
    if rest.len() != TS_HEX + RANDOM_CHARS || !rest.is_ascii() {
        return None;
    }
    let (ts, rnd) = rest.split_at(TS_HEX);
    if !ts
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        || !rnd.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return None;
    }
    i64::from_str_radix(ts, 16).ok()
}

/// True for a well-formed file id (used on keys read back from the bucket).
pub fn is_file_id(id: &str) -> bool {
    file_id_created_at(id).is_some()
}

fn is_prefixed(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix)
        .is_some_and(|r| r.len() == RANDOM_CHARS && r.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// True for a well-formed upload id.
pub fn is_upload_id(id: &str) -> bool {
    is_prefixed(id, "upload_")
}

/// True for a well-formed part id.
pub fn is_part_id(id: &str) -> bool {
    is_prefixed(id, "part_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn id_formats() {
        let f = new_file_id(1_700_000_000);
        assert!(f.starts_with("file-"), "{f}");
        assert_eq!(f.len(), 5 + 9 + 24);
        assert_eq!(file_id_created_at(&f), Some(1_700_000_000));
        assert!(is_file_id(&f));
        let u = new_upload_id();
        assert!(
            u.starts_with("upload_") && u.len() == 7 + 24 && is_upload_id(&u),
            "{u}"
        );
        let p = new_part_id();
        assert!(
            p.starts_with("part_") && p.len() == 5 + 24 && is_part_id(&p),
            "{p}"
        );
        assert!(!is_file_id(&u) && !is_upload_id(&f) && !is_part_id(&u));
        for bad in [
            "",
            "file-",
            "file-../../etc",
            "file-0000000zzAAAAAAAAAAAAAAAAAAAAAAAA",
            &format!("{f}x"),
            &f.replace("file-", "file_"),
            &format!("file-{}/{}", "0".repeat(9), "a".repeat(23)),
        ] {
            assert!(!is_file_id(bad), "{bad}");
        }
    }

    #[test]
    fn ids_are_random_and_alphanumeric() {
        let ids: HashSet<String> = (0..2000).map(|_| random_base62(RANDOM_CHARS)).collect();
        assert_eq!(ids.len(), 2000);
        assert!(ids
            .iter()
            .all(|s| s.len() == RANDOM_CHARS && s.bytes().all(|b| b.is_ascii_alphanumeric())));
        // Every character of the alphabet shows up (no stuck bytes).
        let seen: HashSet<char> = ids.iter().flat_map(|s| s.chars()).collect();
        assert_eq!(seen.len(), 62);
    }
}

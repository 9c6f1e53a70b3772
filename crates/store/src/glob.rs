//! `--include` / `--exclude` filters with `aws s3 sync` semantics: every key is included at
//! first, then each filter, in command-line order, includes or excludes the keys it matches;
//! the last match wins. Patterns match the whole key relative to the sync root: `*` matches
//! any run of characters including `/`, `?` one character, `[abc]` / `[!abc]` / `[a-z]` sets.

use crate::error::{Error, Result};

/// One filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// `--include PATTERN`.
    Include(String),
    /// `--exclude PATTERN`.
    Exclude(String),
}

impl Filter {
    fn pattern(&self) -> &str {
        match self {
            Self::Include(p) | Self::Exclude(p) => p,
        }
    }
}

/// Checks that every pattern is well formed (balanced brackets).
pub fn validate(filters: &[Filter]) -> Result<()> {
    for f in filters {
        let p = f.pattern();
        let opens = p.matches('[').count();
        let closes = p.matches(']').count();
        if opens > closes {
            return Err(Error::Invalid {
                what: "filter pattern",
                value: p.to_string(),
                reason: "a '[' set is not closed with ']'".into(),
            });
        }
    }
    Ok(())
}

/// True when `key` passes the filters.
pub fn included(filters: &[Filter], key: &str) -> bool {
    let mut inc = true;
    for f in filters {
        if matches(f.pattern(), key) {
            inc = matches!(f, Filter::Include(_));
        }
    }
    inc
}

/// Glob match of a whole string.
pub fn matches(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative matcher with backtracking on the last '*'.
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ti));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                '[' => {
                    if let Some((ok, next)) = class(&p, pi, t[ti]) {
                        if ok {
                            pi = next;
                            ti += 1;
                            continue;
                        }
                    } else if t[ti] == '[' {
                        pi += 1;
                        ti += 1;
                        continue;
                    }
                }
                c if c == t[ti] => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Matches `c` against the set starting at `p[start] == '['`; returns (matched, index after `]`).
fn class(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = i < p.len() && (p[i] == '!' || p[i] == '^');
    if negate {
        i += 1;
    }
    let mut found = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((found != negate, i + 1));
        }
        first = false;
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            if p[i] <= c && c <= p[i + 2] {
                found = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                found = true;
            }
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(matches("rootfs-*.ext4", "rootfs-python.ext4"));
        assert!(!matches("rootfs-*.ext4", "rootfs-python.json"));
        assert!(matches("*", "a/b/c"));
        assert!(matches("dev/*", "dev/x/y"));
        assert!(matches("?x", "ax"));
        assert!(!matches("?x", "x"));
        assert!(matches("[a-c]*", "boo"));
        assert!(!matches("[!a-c]*", "boo"));
        assert!(matches("*.e?t4", "rootfs-go.ext4"));
        assert!(matches("a*b*c", "aXXbYYc"));
        assert!(!matches("a*b*c", "aXXbYY"));
    }

    #[test]
    fn last_match_wins_like_aws() {
        let f = vec![
            Filter::Exclude("*".into()),
            Filter::Include("rootfs-*.ext4".into()),
        ];
        assert!(included(&f, "rootfs-python.ext4"));
        assert!(!included(&f, "vmlinux"));
        let f = vec![
            Filter::Include("rootfs-*.ext4".into()),
            Filter::Exclude("*".into()),
        ];
        assert!(!included(&f, "rootfs-python.ext4"));
        assert!(included(&[], "anything"));
        assert!(validate(&[Filter::Include("[ab".into())]).is_err());
    }
}

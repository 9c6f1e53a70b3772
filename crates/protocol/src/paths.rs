//! The one rule for a relative path that crosses the wire in a listing or names a file the
//! host creates: both sides apply it (the agent leaves out names that fail it, the host
//! refuses listings that hold one, and checks its own input names with it).

/// Longest path component, in bytes (Linux `NAME_MAX`).
pub const MAX_PATH_COMPONENT: usize = 255;

/// Longest whole path, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;

/// Why a relative path is refused by [`check_relative_path`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathProblem {
    /// The path is empty.
    Empty,
    /// It starts with `/`.
    Absolute,
    /// A component is empty (`a//b`, a trailing `/`).
    EmptyComponent,
    /// A component is `.` or `..`.
    DotComponent,
    /// It holds a NUL byte.
    Nul,
    /// It holds another control character (newline, escape, DEL, C1 controls).
    Control,
    /// It holds a backslash (a separator on other systems).
    Backslash,
    /// A component is longer than [`MAX_PATH_COMPONENT`] bytes.
    ComponentTooLong,
    /// The path is longer than [`MAX_PATH_BYTES`] bytes.
    TooLong,
}

impl std::fmt::Display for PathProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathProblem::Empty => "it is empty",
            PathProblem::Absolute => "it is absolute",
            PathProblem::EmptyComponent => "it has an empty component",
            PathProblem::DotComponent => "it has a '.' or '..' component",
            PathProblem::Nul => "it contains a NUL byte",
            PathProblem::Control => "it contains a control character",
            PathProblem::Backslash => "it contains a backslash",
            PathProblem::ComponentTooLong => "a component is longer than 255 bytes",
            PathProblem::TooLong => "it is longer than 4096 bytes",
        })
    }
}

impl std::error::Error for PathProblem {}

/// Checks that `path` is a plain relative path: `/`-separated components, none empty, `.` or
/// `..`; no NUL, control character or backslash; each component at most 255 bytes, the whole
/// at most 4096. Such a path cannot leave the directory it is joined to. Pure.
pub fn check_relative_path(path: &str) -> Result<(), PathProblem> {
    if path.is_empty() {
        return Err(PathProblem::Empty);
    }
    if path.contains('\0') {
        return Err(PathProblem::Nul);
    }
    if path.chars().any(char::is_control) {
        return Err(PathProblem::Control);
    }
    if path.contains('\\') {
        return Err(PathProblem::Backslash);
    }
    if path.starts_with('/') {
        return Err(PathProblem::Absolute);
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(PathProblem::TooLong);
    }
    for c in path.split('/') {
        match c {
            "" => return Err(PathProblem::EmptyComponent),
            "." | ".." => return Err(PathProblem::DotComponent),
            c if c.len() > MAX_PATH_COMPONENT => return Err(PathProblem::ComponentTooLong),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_relative_paths_pass_and_escapes_are_refused() {
        for ok in [
            "a",
            "a/b/c.txt",
            "sub dir/ünï.bin",
            &"x".repeat(255),
            "..a/b..",
            ".hidden",
        ] {
            assert_eq!(check_relative_path(ok), Ok(()), "{ok:?}");
        }
        let long_component = format!("a/{}", "x".repeat(256));
        let long_path = vec!["d"; 2049].join("/"); // 4097 bytes
        for (bad, want) in [
            ("", PathProblem::Empty),
            ("/etc/passwd", PathProblem::Absolute),
            ("../../etc/x", PathProblem::DotComponent),
            ("a/../b", PathProblem::DotComponent),
            ("./a", PathProblem::DotComponent),
            (".", PathProblem::DotComponent),
            ("a//b", PathProblem::EmptyComponent),
            ("a/", PathProblem::EmptyComponent),
            ("a\0b", PathProblem::Nul),
            ("a\nb", PathProblem::Control),
            ("a\u{1b}[31m", PathProblem::Control),
            ("a\u{85}", PathProblem::Control),
            ("a\\..\\b", PathProblem::Backslash),
            (long_component.as_str(), PathProblem::ComponentTooLong),
            (long_path.as_str(), PathProblem::TooLong),
        ] {
            assert_eq!(check_relative_path(bad), Err(want), "{bad:?}");
        }
    }
}

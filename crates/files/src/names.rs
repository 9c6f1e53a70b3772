//! Untrusted names: the one filename check, and escaping for messages.
//!
//! A filename only ever becomes a column value and (in the server) a `Content-Disposition`
//! parameter; object keys are derived from ids. It is still refused when it could mislead
//! something downstream: path separators, `.`/`..`, NUL and other control characters
//! (header injection, terminal escapes), empty, or longer than 255 bytes.

/// Longest accepted filename, in bytes (Linux `NAME_MAX`).
pub const MAX_FILENAME: usize = 255;

/// Why a filename is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilenameProblem {
    /// It is empty.
    Empty,
    /// It is longer than [`MAX_FILENAME`] bytes.
    TooLong,
    /// It contains `/` or `\`.
    Separator,
    /// It is `.` or `..`.
    DotName,
    /// It contains NUL.
    Nul,
    /// It contains another control character (including CR/LF, DEL, C1 controls).
    Control,
}

impl std::fmt::Display for FilenameProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Empty => "it is empty",
            Self::TooLong => "it is longer than 255 bytes",
            Self::Separator => "it contains a path separator ('/' or '\\')",
            Self::DotName => "it is '.' or '..'",
            Self::Nul => "it contains a NUL byte",
            Self::Control => "it contains a control character",
        })
    }
}

/// Checks an untrusted filename (see the module doc). Pure.
pub fn check_filename(name: &str) -> Result<(), FilenameProblem> {
    if name.is_empty() {
        return Err(FilenameProblem::Empty);
    }
    if name.len() > MAX_FILENAME {
        return Err(FilenameProblem::TooLong);
    }
    if name.contains('\0') {
        return Err(FilenameProblem::Nul);
    }
    if name.chars().any(char::is_control) {
        return Err(FilenameProblem::Control);
    }
    if name.contains(['/', '\\']) {
        return Err(FilenameProblem::Separator);
    }
    if name == "." || name == ".." {
        return Err(FilenameProblem::DotName);
    }
    Ok(())
}

/// An untrusted value for messages: quoted, control characters escaped, cut at 80 characters.
pub fn display_name(value: &str) -> String {
    let cut: String = value.chars().take(80).collect();
    let more = if cut.len() < value.len() { "..." } else { "" };
    format!("\"{}\"{more}", cut.escape_debug())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_filenames_are_refused() {
        let long = "a".repeat(256);
        let long_multibyte = "é".repeat(128); // 256 bytes
        for (name, want) in [
            ("", FilenameProblem::Empty),
            (long.as_str(), FilenameProblem::TooLong),
            (long_multibyte.as_str(), FilenameProblem::TooLong),
            ("../etc/passwd", FilenameProblem::Separator),
            ("..\\..\\win.ini", FilenameProblem::Separator),
            ("/abs", FilenameProblem::Separator),
            ("a/b", FilenameProblem::Separator),
            ("..", FilenameProblem::DotName),
            (".", FilenameProblem::DotName),
            ("a\0b", FilenameProblem::Nul),
            ("a\nContent-Type: x", FilenameProblem::Control),
            ("a\r\nb", FilenameProblem::Control),
            ("\x1b[2Jx", FilenameProblem::Control),
            ("tab\there", FilenameProblem::Control),
            ("del\x7f", FilenameProblem::Control),
            ("c1\u{85}", FilenameProblem::Control),
        ] {
            assert_eq!(check_filename(name), Err(want), "{name:?}");
        }
    }

    #[test]
    fn ordinary_filenames_pass() {
        let max = "a".repeat(255);
        for name in [
            "data.jsonl",
            "...",
            "..a",
            ".hidden",
            "with space.txt",
            "ünïcode ключ.pdf",
            "quote\"and'semicolon;.csv",
            max.as_str(),
        ] {
            assert_eq!(check_filename(name), Ok(()), "{name:?}");
        }
    }

    #[test]
    fn names_are_escaped_for_messages() {
        assert_eq!(display_name("a\nb"), "\"a\\nb\"");
        assert!(display_name(&"x".repeat(100)).ends_with("\"..."));
    }
}

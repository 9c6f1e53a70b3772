//! The wire protocol between the host and the in-VM agent (`infra.operator guest`).
//!
//! This crate holds the message types, the framing and the version constant, and nothing
//! else: no sockets, no timeouts, no policy. Both sides depend on it, so a change here is a
//! change to the wire; the schema snapshot test (`tests/schema_snapshot.rs`) makes that
//! deliberate. See `docs/protocol.md` for the contract in prose.
//!
//! * Framing: a 4-byte big-endian length, then that many bytes of UTF-8 JSON
//!   ([`frame`]). Frames are at most [`MAX_FRAME`] bytes.
//! * Every request carries a `u64` id chosen by the host; every reply or event carries the
//!   id of the request it belongs to, so several requests can be in flight on one connection.
//! * The first request on a connection is [`Hello`]; it carries [`PROTOCOL_VERSION`], the one
//!   generation number both sides must share.

mod b64;
pub mod frame;
mod messages;
mod paths;

pub use frame::{
    read_frame, read_frame_async, read_frame_async_strict, read_message, read_message_async,
    read_message_async_strict, write_message, write_message_async, FrameError,
};
pub use messages::*;
pub use paths::{check_relative_path, PathProblem, MAX_PATH_BYTES, MAX_PATH_COMPONENT};

/// The protocol generation. Bump it on any change an older peer could misread.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame body, in bytes, either direction. Larger frames are refused (on read the body
/// is skipped, so the stream stays usable).
///
/// 4 MiB leaves room for a [`PutFile`] or [`FileData`] of about 3 MiB after base64.
pub const MAX_FRAME: usize = 4 << 20;

/// Exit code reported for a run killed at its wall-clock timeout (the `timeout(1)` convention).
pub const TIMEOUT_EXIT_CODE: i32 = 124;

/// Marker appended to a stream whose output was cut at `max_output_bytes`.
pub const TRUNCATION_MARKER: &str = "\n[output truncated]\n";

/// Largest `compile_output` in an [`Exit`], in bytes of UTF-8 (the marker included). The agent
/// cuts the build's output to this and ends it with [`TRUNCATION_MARKER`]; the host refuses a
/// longer one as a protocol violation.
///
/// 512 KiB keeps the `exit` frame under [`MAX_FRAME`] even when every byte is a control
/// character that JSON escapes as `\u00XX` (6 bytes each: 3 MiB).
pub const MAX_COMPILE_OUTPUT: usize = 512 << 10;

/// Largest `exec.timeout_ms` either side accepts: 24 hours. Longer values are refused
/// (`bad_request` from the agent, a usage error on the host) instead of overflowing deadlines.
pub const MAX_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1000;

/// Cuts `text` to at most `max` bytes (on a character boundary) and, when anything was cut,
/// ends it with [`TRUNCATION_MARKER`] (the result is then at most `max` bytes too).
pub fn truncate_text(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut keep = max.saturating_sub(TRUNCATION_MARKER.len());
    while !text.is_char_boundary(keep) {
        keep -= 1;
    }
    text.truncate(keep);
    if TRUNCATION_MARKER.len() <= max {
        text.push_str(TRUNCATION_MARKER);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_text_keeps_short_text_and_cuts_on_a_char_boundary() {
        assert_eq!(truncate_text("abc".into(), 3), "abc");
        let long = "é".repeat(100); // 200 bytes
        let cut = truncate_text(long, 51);
        assert!(cut.len() <= 51, "{}", cut.len());
        assert!(cut.ends_with(TRUNCATION_MARKER));
        assert!(cut.starts_with("ééé"));
        assert_eq!(truncate_text("abcdef".into(), 2), "");
    }
}

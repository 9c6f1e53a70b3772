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

pub use frame::{
    read_frame, read_frame_async, read_message, read_message_async, write_message,
    write_message_async, FrameError,
};
pub use messages::*;

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

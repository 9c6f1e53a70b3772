//! Framing: a 4-byte big-endian body length, then the body (UTF-8 JSON).
//!
//! Readers never allocate more than [`MAX_FRAME`] for a body. An oversized frame's body is
//! read and discarded, so the stream stays in step and the caller can reply and go on.

use std::io::{self, Read, Write};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::messages::{DecodeError, ErrorCode, Message};
use crate::MAX_FRAME;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The underlying stream failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes the header (or the header itself, 4) promised.
        expected: u64,
        /// Bytes that arrived.
        got: u64,
    },
    /// The frame is longer than the limit. On read its body has been skipped.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Length announced (read) or produced (write).
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The body is not a valid message.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A message could not be serialised.
    #[error("cannot encode message: {0}")]
    Encode(#[source] serde_json::Error),
}

impl FrameError {
    /// Whether the stream is still in step after this error, so the reader can reply with an
    /// error and read the next frame.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, FrameError::TooLarge { .. } | FrameError::Decode(_))
    }

    /// The id of the offending request, when it could be read.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            FrameError::Decode(d) => d.id(),
            _ => None,
        }
    }

    /// The error code to reply with.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::Decode(d) => d.code(),
            FrameError::Truncated { .. } => ErrorCode::BadFrame,
            FrameError::Io(_) => ErrorCode::Io,
            FrameError::Encode(_) => ErrorCode::Internal,
        }
    }
}

/// Fills `buf` as far as the stream allows; returns how many bytes were read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

async fn read_full_async<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).await {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn check_header(got: usize, header: [u8; 4]) -> Result<Option<u64>, FrameError> {
    match got {
        0 => Ok(None),
        4 => Ok(Some(u64::from(u32::from_be_bytes(header)))),
        n => Err(FrameError::Truncated {
            expected: 4,
            got: n as u64,
        }),
    }
}

/// Reads one frame body. `Ok(None)` means the stream ended cleanly between frames.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; 4];
    let got = read_full(r, &mut header)?;
    let Some(len) = check_header(got, header)? else {
        return Ok(None);
    };
    if len > MAX_FRAME as u64 {
        let skipped = io::copy(&mut r.take(len), &mut io::sink())?;
        if skipped < len {
            return Err(FrameError::Truncated {
                expected: len,
                got: skipped,
            });
        }
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    let mut body = vec![0u8; len as usize];
    let got = read_full(r, &mut body)?;
    if (got as u64) < len {
        return Err(FrameError::Truncated {
            expected: len,
            got: got as u64,
        });
    }
    Ok(Some(body))
}

/// Async [`read_frame`].
pub async fn read_frame_async<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<Vec<u8>>, FrameError> {
    read_frame_async_inner(r, true).await
}

/// Like [`read_frame_async`], but an oversized frame's body is not read: the error comes as
/// soon as the header is in, and the stream is out of step afterwards. For a reader that ends
/// the conversation on any violation (the host reading the agent), so a peer announcing 4 GiB
/// cannot keep it busy reading them.
pub async fn read_frame_async_strict<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<Vec<u8>>, FrameError> {
    read_frame_async_inner(r, false).await
}

async fn read_frame_async_inner<R: AsyncRead + Unpin>(
    r: &mut R,
    skip_oversized: bool,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; 4];
    let got = read_full_async(r, &mut header).await?;
    let Some(len) = check_header(got, header)? else {
        return Ok(None);
    };
    if len > MAX_FRAME as u64 && !skip_oversized {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    if len > MAX_FRAME as u64 {
        let skipped = tokio::io::copy(&mut r.take(len), &mut tokio::io::sink()).await?;
        if skipped < len {
            return Err(FrameError::Truncated {
                expected: len,
                got: skipped,
            });
        }
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    let mut body = vec![0u8; len as usize];
    let got = read_full_async(r, &mut body).await?;
    if (got as u64) < len {
        return Err(FrameError::Truncated {
            expected: len,
            got: got as u64,
        });
    }
    Ok(Some(body))
}

/// Reads and decodes one message. `Ok(None)` means the stream ended cleanly between frames.
pub fn read_message<T: Message, R: Read>(r: &mut R) -> Result<Option<T>, FrameError> {
    match read_frame(r)? {
        None => Ok(None),
        Some(body) => Ok(Some(T::decode(&body)?)),
    }
}

/// Async [`read_message`].
pub async fn read_message_async<T: Message, R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<T>, FrameError> {
    match read_frame_async(r).await? {
        None => Ok(None),
        Some(body) => Ok(Some(T::decode(&body)?)),
    }
}

/// Async [`read_message`] over [`read_frame_async_strict`]: an oversized frame is an error
/// without its body being read.
pub async fn read_message_async_strict<T: Message, R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<T>, FrameError> {
    match read_frame_async_strict(r).await? {
        None => Ok(None),
        Some(body) => Ok(Some(T::decode(&body)?)),
    }
}

/// Header plus body in one buffer, so a frame goes out in one write.
fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 4];
    serde_json::to_writer(&mut buf, msg).map_err(FrameError::Encode)?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max: MAX_FRAME,
        });
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// Encodes and writes one message as a frame, then flushes. A message over [`MAX_FRAME`] is
/// refused before anything is written.
pub fn write_message<T: Serialize, W: Write>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let buf = encode_frame(msg)?;
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Async [`write_message`].
pub async fn write_message_async<T: Serialize, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    let buf = encode_frame(msg)?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{Exec, Reply, Request, RequestBody};
    use std::io::Cursor;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    fn exec_request() -> Request {
        let mut e = Exec::new("python", "print(6*7)");
        e.stdin = vec![0, 159, 255, b'\n'];
        Request {
            id: 7,
            body: RequestBody::Exec(e),
        }
    }

    #[test]
    fn request_round_trip_sync() {
        let mut buf = Vec::new();
        write_message(&mut buf, &exec_request()).unwrap();
        let back: Request = read_message(&mut Cursor::new(&buf)).unwrap().unwrap();
        assert_eq!(back, exec_request());
    }

    #[tokio::test]
    async fn reply_round_trip_async() {
        let msgs = vec![
            Reply::Stdout {
                id: 3,
                data: (0..=255).collect(),
            },
            Reply::Ok { id: 4 },
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            write_message_async(&mut buf, m).await.unwrap();
        }
        let mut r = Cursor::new(buf);
        for m in &msgs {
            let back: Reply = read_message_async(&mut r).await.unwrap().unwrap();
            assert_eq!(&back, m);
        }
        assert!(read_message_async::<Reply, _>(&mut r)
            .await
            .unwrap()
            .is_none());
    }

    #[test]
    fn clean_eof_is_none() {
        assert!(read_frame(&mut Cursor::new(Vec::new())).unwrap().is_none());
    }

    #[test]
    fn truncated_header_and_body_are_errors() {
        let e = read_frame(&mut Cursor::new(vec![0, 0])).unwrap_err();
        assert!(
            matches!(
                e,
                FrameError::Truncated {
                    expected: 4,
                    got: 2
                }
            ),
            "{e}"
        );
        let mut f = frame(b"{\"id\":1}");
        f.truncate(f.len() - 3);
        let e = read_frame(&mut Cursor::new(f)).unwrap_err();
        assert!(
            matches!(
                e,
                FrameError::Truncated {
                    expected: 8,
                    got: 5
                }
            ),
            "{e}"
        );
        assert!(!e.is_recoverable());
    }

    #[test]
    fn oversize_frame_is_skipped_and_stream_stays_in_step() {
        let len = MAX_FRAME + 10;
        let mut data = (len as u32).to_be_bytes().to_vec();
        data.resize(4 + len, b'x');
        let mut next = Vec::new();
        write_message(&mut next, &exec_request()).unwrap();
        data.extend_from_slice(&next);
        let mut r = Cursor::new(data);
        let e = read_message::<Request, _>(&mut r).unwrap_err();
        assert!(matches!(e, FrameError::TooLarge { .. }), "{e}");
        assert!(e.is_recoverable());
        assert_eq!(e.code(), ErrorCode::FrameTooLarge);
        let back: Request = read_message(&mut r).unwrap().unwrap();
        assert_eq!(back, exec_request());
    }

    #[tokio::test]
    async fn strict_reader_refuses_an_oversize_frame_without_reading_it() {
        // Only the header is there: a skipping reader would wait for 4 GiB.
        let data = u32::MAX.to_be_bytes().to_vec();
        let e = read_frame_async_strict(&mut Cursor::new(data))
            .await
            .unwrap_err();
        assert!(
            matches!(e, FrameError::TooLarge { len, .. } if len == u64::from(u32::MAX)),
            "{e}"
        );
        // A frame of exactly MAX_FRAME is still read.
        let mut data = (MAX_FRAME as u32).to_be_bytes().to_vec();
        data.resize(4 + MAX_FRAME, b' ');
        let body = read_frame_async_strict(&mut Cursor::new(data))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(body.len(), MAX_FRAME);
    }

    #[test]
    fn oversize_header_with_short_body_is_truncated() {
        let data = u32::MAX.to_be_bytes().to_vec();
        let e = read_frame(&mut Cursor::new(data)).unwrap_err();
        assert!(matches!(e, FrameError::Truncated { got: 0, .. }), "{e}");
    }

    #[test]
    fn oversize_message_is_refused_on_write() {
        let big = Reply::Stdout {
            id: 1,
            data: vec![0; MAX_FRAME],
        };
        let mut buf = Vec::new();
        let e = write_message(&mut buf, &big).unwrap_err();
        assert!(matches!(e, FrameError::TooLarge { .. }), "{e}");
        assert!(buf.is_empty());
    }

    #[test]
    fn malformed_bodies_are_decode_errors_with_codes() {
        let cases: &[(&[u8], ErrorCode, Option<u64>)] = &[
            (b"not json", ErrorCode::BadFrame, None),
            (b"[1,2]", ErrorCode::BadFrame, None),
            (b"{\"id\":5}", ErrorCode::BadRequest, Some(5)),
            (
                b"{\"id\":6,\"type\":\"launch_missiles\"}",
                ErrorCode::UnknownType,
                Some(6),
            ),
            (
                b"{\"id\":7,\"type\":\"exec\",\"lang\":3}",
                ErrorCode::BadRequest,
                Some(7),
            ),
            (
                b"{\"id\":8,\"type\":\"put_file\",\"path\":\"a\",\"data\":\"!!\"}",
                ErrorCode::BadRequest,
                Some(8),
            ),
        ];
        for (body, code, id) in cases {
            let e = read_message::<Request, _>(&mut Cursor::new(frame(body))).unwrap_err();
            assert!(e.is_recoverable(), "{e}");
            assert_eq!(e.code(), *code, "{}: {e}", String::from_utf8_lossy(body));
            assert_eq!(e.request_id(), *id, "{e}");
        }
    }

    #[test]
    fn unknown_reply_type_is_an_error() {
        let e = Reply::decode(b"{\"type\":\"telemetry\",\"id\":1}").unwrap_err();
        assert!(matches!(e, DecodeError::UnknownType { .. }), "{e}");
    }

    #[test]
    fn exec_defaults_apply() {
        let r = Request::decode(br#"{"id":1,"type":"exec","lang":"bash","code":"true"}"#).unwrap();
        assert_eq!(
            r,
            Request {
                id: 1,
                body: RequestBody::Exec(Exec::new("bash", "true"))
            }
        );
    }

    #[test]
    fn unknown_error_code_from_newer_peer_decodes() {
        let r =
            Reply::decode(br#"{"type":"error","id":null,"code":"quota","message":"m"}"#).unwrap();
        assert!(matches!(
            r,
            Reply::Error {
                code: ErrorCode::Unknown,
                ..
            }
        ));
    }

    #[test]
    fn status_rule() {
        use crate::messages::ExecStatus;
        assert_eq!(
            ExecStatus::classify(Some(0), false),
            (ExecStatus::Success, Some(0))
        );
        assert_eq!(
            ExecStatus::classify(Some(3), false),
            (ExecStatus::Error, Some(3))
        );
        assert_eq!(ExecStatus::classify(None, false), (ExecStatus::Error, None));
        assert_eq!(
            ExecStatus::classify(Some(0), true),
            (ExecStatus::Timeout, Some(124))
        );
        assert_eq!(
            ExecStatus::classify(None, true),
            (ExecStatus::Timeout, Some(124))
        );
    }
}

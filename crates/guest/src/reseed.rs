//! Making a machine restored from a snapshot unique: fresh entropy into the kernel's RNG, an
//! immediate CRNG reseed, and the wall clock from the host ([`infra_protocol::Reseed`]).
//!
//! Without this, every VM restored from one snapshot continues from the same RNG state, so
//! `os.urandom`, `uuid4()` and TLS keys repeat between them, and the clock stands where it
//! was when the snapshot was taken. Linux only mixes new input into the CRNG it hands out on
//! its own schedule (up to a minute later), hence `RNDRESEEDCRNG` after `RNDADDENTROPY`.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

use nix::libc;
use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Credits `entropy` to the input pool, reseeds the CRNG from it, and sets `CLOCK_REALTIME`.
/// Needs `CAP_SYS_ADMIN` (the agent as init has it).
pub fn reseed(entropy: &[u8], unix_nanos: u64) -> io::Result<()> {
    if entropy.is_empty() || entropy.len() > infra_protocol::MAX_RESEED_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "entropy must be 1 to {} bytes, got {}",
                infra_protocol::MAX_RESEED_BYTES,
                entropy.len()
            ),
        ));
    }
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, in u32 words
    // so the buffer is aligned for the ints.
    let words = entropy.len().div_ceil(4);
    let mut info = vec![0u32; 2 + words];
    info[0] = (entropy.len() * 8) as u32;
    info[1] = entropy.len() as u32;
    for (i, chunk) in entropy.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(w);
    }
    let urandom = OpenOptions::new().write(true).open("/dev/urandom")?;
    // SAFETY: the descriptor is open; `info` is a rand_pool_info whose buf_size matches the
    // bytes that follow it, and it outlives the call.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } < 0 {
        return Err(with_context(io::Error::last_os_error(), "RNDADDENTROPY"));
    }
    // SAFETY: an argument-less ioctl on an open descriptor.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG as _) } < 0 {
        return Err(with_context(io::Error::last_os_error(), "RNDRESEEDCRNG"));
    }
    let ts = TimeSpec::new(
        (unix_nanos / 1_000_000_000) as libc::time_t,
        (unix_nanos % 1_000_000_000) as libc::c_long,
    );
    clock_settime(ClockId::CLOCK_REALTIME, ts)
        .map_err(|e| with_context(io::Error::from(e), "clock_settime(CLOCK_REALTIME)"))?;
    Ok(())
}

fn with_context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_oversized_entropy_are_refused_before_any_ioctl() {
        assert!(reseed(&[], 0).is_err());
        assert!(reseed(&vec![1; infra_protocol::MAX_RESEED_BYTES + 1], 0).is_err());
    }
}

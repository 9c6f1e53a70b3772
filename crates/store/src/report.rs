//! One-line reports of transfers, worded as `aws s3 cp` words them, shared by every front end.

use crate::transfer::{DownloadSummary, UploadSummary};

/// A size as `aws s3 ls --human-readable` prints it (`512.0 MiB`, `100 Bytes`), or the plain
/// byte count when `human` is false.
pub fn aws_size(bytes: u64, human: bool) -> String {
    if !human {
        return bytes.to_string();
    }
    if bytes < 1024 {
        return format!("{bytes} Bytes");
    }
    let mut v = bytes as f64;
    for unit in ["KiB", "MiB", "GiB", "TiB"] {
        v /= 1024.0;
        if v < 1024.0 {
            return format!("{v:.1} {unit}");
        }
    }
    format!("{:.1} PiB", v / 1024.0)
}

/// A transfer rate (`85.3 MiB/s`), or `-` when too small or too quick to mean anything.
pub fn rate(bytes: u64, secs: f64) -> String {
    if secs <= 0.0 || bytes < 1024 * 1024 {
        return "-".into();
    }
    format!("{}/s", aws_size((bytes as f64 / secs) as u64, true))
}

impl DownloadSummary {
    /// `download: URL to PATH (SIZE in S s, RATE, sha256 verified)`.
    pub fn line(&self) -> String {
        let resumed = if self.resumed_chunks > 0 {
            format!(", resumed after {} chunks", self.resumed_chunks)
        } else {
            String::new()
        };
        format!(
            "download: {} to {} ({} in {:.1} s, {}{resumed}, sha256 {})",
            self.url,
            self.path.display(),
            aws_size(self.size, true),
            self.seconds,
            rate(self.size, self.seconds),
            match self.verified {
                crate::Verified::Sha256 => "verified",
                crate::Verified::Parts => "verified per part",
                crate::Verified::Unverified => "not in the object's metadata: not verified",
            }
        )
    }
}

impl UploadSummary {
    /// `upload: PATH to URL (SIZE in S s, RATE, sha256 PREFIX)`.
    pub fn line(&self) -> String {
        let sent = if self.bytes_sent != self.size {
            format!(", {} sent", aws_size(self.bytes_sent, true))
        } else {
            String::new()
        };
        let resumed = if self.resumed_parts > 0 {
            format!(
                ", resumed: {} of {} parts were already there",
                self.resumed_parts, self.parts
            )
        } else {
            String::new()
        };
        format!(
            "upload: {} to {} ({}{sent} in {:.1} s, {}{resumed}, sha256 {})",
            self.path.display(),
            self.url,
            aws_size(self.size, true),
            self.seconds,
            rate(self.size, self.seconds),
            &self.sha256[..16.min(self.sha256.len())]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_sizes() {
        assert_eq!(aws_size(512 * 1024 * 1024, true), "512.0 MiB");
        assert_eq!(aws_size(2 * 1024 * 1024 * 1024, true), "2.0 GiB");
        assert_eq!(aws_size(100, true), "100 Bytes");
        assert_eq!(aws_size(100, false), "100");
        assert_eq!(aws_size(3 << 50, true), "3.0 PiB");
        assert_eq!(rate(10, 1.0), "-");
    }
}

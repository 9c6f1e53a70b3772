//! Turning a distro `vmlinuz` (bzImage) into the ELF `vmlinux` Firecracker boots.
//!
//! A bzImage is a real-mode setup block followed by a self-decompressing payload. Its boot
//! header (`HdrS`, boot protocol ≥ 2.08) says where the compressed payload is; we decompress
//! it ourselves instead of running the kernel's `extract-vmlinux` script, which scans for
//! every magic number and needs the matching command-line tool for each.

use std::io::Read;

use crate::error::KernelError;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
const GZIP_MAGIC: [u8; 3] = [0x1f, 0x8b, 0x08];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// LZ4 legacy frames use fixed 8 MiB blocks.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// Refuse to inflate beyond this: no real kernel is near it, a hostile file could be.
const MAX_VMLINUX: usize = 1 << 30;

/// Compression of a bzImage payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// The input was already an ELF image.
    None,
    /// `CONFIG_KERNEL_LZ4` (Debian's cloud kernels).
    Lz4,
    /// `CONFIG_KERNEL_GZIP`.
    Gzip,
    /// `CONFIG_KERNEL_ZSTD`.
    Zstd,
}

/// Returns the ELF vmlinux inside `image` (a bzImage, or already an ELF, returned unchanged)
/// and the compression that was undone.
pub fn extract_vmlinux(image: &[u8]) -> Result<(Vec<u8>, Compression), KernelError> {
    if image.starts_with(ELF_MAGIC) {
        check_elf(image)?;
        return Ok((image.to_vec(), Compression::None));
    }
    let payload = bzimage_payload(image)?;
    let (elf, kind) = if payload.starts_with(&LZ4_LEGACY_MAGIC) {
        (lz4_legacy(payload)?, Compression::Lz4)
    } else if payload.starts_with(&GZIP_MAGIC) {
        (
            read_limited(flate2::read::GzDecoder::new(payload))?,
            Compression::Gzip,
        )
    } else if payload.starts_with(&ZSTD_MAGIC) {
        let dec = zstd::stream::read::Decoder::new(payload).map_err(bad("zstd payload"))?;
        (read_limited(dec)?, Compression::Zstd)
    } else {
        let magic: Vec<String> = payload.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return Err(KernelError::Format(format!(
            "unsupported kernel compression (payload starts with {}); supported: lz4, gzip, zstd",
            magic.join(" ")
        )));
    };
    check_elf(&elf)?;
    Ok((elf, kind))
}

/// The compressed payload of a bzImage, located through its boot header.
fn bzimage_payload(image: &[u8]) -> Result<&[u8], KernelError> {
    if image.len() < 0x250 || &image[0x202..0x206] != b"HdrS" {
        return Err(KernelError::Format(
            "neither an ELF vmlinux nor a bzImage (no HdrS boot header)".into(),
        ));
    }
    let version = u16::from_le_bytes([image[0x206], image[0x207]]);
    if version < 0x0208 {
        return Err(KernelError::Format(format!(
            "bzImage boot protocol {}.{:02} is too old to locate the payload (need 2.08)",
            version >> 8,
            version & 0xff
        )));
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let u32_at = |off: usize| u32::from_le_bytes(image[off..off + 4].try_into().unwrap()) as usize;
    let start = (setup_sects + 1) * 512 + u32_at(0x248);
    let end = start + u32_at(0x24c);
    image.get(start..end).ok_or_else(|| {
        KernelError::Format("bzImage payload lies outside the file (truncated?)".into())
    })
}

/// Decompresses an LZ4 legacy frame as the kernel's build writes it: magic, then blocks of
/// `u32 size` + data, then (appended by the build) the `u32` uncompressed size.
fn lz4_legacy(payload: &[u8]) -> Result<Vec<u8>, KernelError> {
    let mut rest = &payload[4..];
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    while rest.len() >= 4 {
        let size = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        if size == u32::from_le_bytes(LZ4_LEGACY_MAGIC) as usize {
            rest = &rest[4..]; // concatenated frame
            continue;
        }
        if size > rest.len() - 4 {
            break; // the trailing uncompressed-size word
        }
        let n = lz4_flex::block::decompress_into(&rest[4..4 + size], &mut block).map_err(|e| {
            KernelError::Format(format!("corrupt lz4 block in kernel payload: {e}"))
        })?;
        out.extend_from_slice(&block[..n]);
        if out.len() > MAX_VMLINUX {
            return Err(KernelError::Format(
                "kernel payload inflates beyond 1 GiB".into(),
            ));
        }
        rest = &rest[4 + size..];
    }
    if rest.len() == 4 {
        let expected = u32::from_le_bytes(rest.try_into().unwrap()) as usize;
        if expected != out.len() {
            return Err(KernelError::Format(format!(
                "kernel payload decompressed to {} bytes, its trailer says {expected}",
                out.len()
            )));
        }
    }
    Ok(out)
}

fn read_limited(r: impl Read) -> Result<Vec<u8>, KernelError> {
    let mut out = Vec::new();
    r.take(MAX_VMLINUX as u64 + 1)
        .read_to_end(&mut out)
        .map_err(bad("kernel payload"))?;
    if out.len() > MAX_VMLINUX {
        return Err(KernelError::Format(
            "kernel payload inflates beyond 1 GiB".into(),
        ));
    }
    Ok(out)
}

fn bad(what: &'static str) -> impl Fn(std::io::Error) -> KernelError {
    move |e| KernelError::Format(format!("corrupt {what}: {e}"))
}

/// Accepts only 64-bit x86 ELF executables: what both backends can boot.
fn check_elf(elf: &[u8]) -> Result<(), KernelError> {
    let ok = elf.len() > 64 && elf.starts_with(ELF_MAGIC) && elf[4] == 2 && elf[18] == 0x3e;
    if ok {
        Ok(())
    } else {
        Err(KernelError::Format(
            "not an x86_64 ELF kernel (64-bit, machine 0x3e expected)".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_elf(len: usize) -> Vec<u8> {
        let mut v: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        v[..4].copy_from_slice(ELF_MAGIC);
        v[4] = 2;
        v[18] = 0x3e;
        v
    }

    /// Builds a bzImage-shaped file around `payload`.
    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 3usize;
        let mut img = vec![0u8; (setup_sects + 1) * 512 + 100];
        img[0x1f1] = setup_sects as u8;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&100u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(payload);
        img.extend_from_slice(&[0u8; 64]);
        img
    }

    fn lz4_legacy_frame(data: &[u8]) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_vec();
        for chunk in data.chunks(LZ4_LEGACY_BLOCK) {
            let c = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            out.extend_from_slice(&c);
        }
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }

    #[test]
    fn lz4_bzimage_round_trip_across_blocks() {
        let elf = fake_elf(LZ4_LEGACY_BLOCK + 12345);
        let (got, kind) = extract_vmlinux(&fake_bzimage(&lz4_legacy_frame(&elf))).unwrap();
        assert_eq!(kind, Compression::Lz4);
        assert_eq!(got, elf);
    }

    #[test]
    fn gzip_and_zstd_payloads() {
        let elf = fake_elf(70_000);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &elf).unwrap();
        let (got, kind) = extract_vmlinux(&fake_bzimage(&gz.finish().unwrap())).unwrap();
        assert_eq!((got.as_slice(), kind), (elf.as_slice(), Compression::Gzip));
        let zs = zstd::encode_all(elf.as_slice(), 1).unwrap();
        let (got, kind) = extract_vmlinux(&fake_bzimage(&zs)).unwrap();
        assert_eq!((got.as_slice(), kind), (elf.as_slice(), Compression::Zstd));
    }

    #[test]
    fn elf_passes_through_and_garbage_is_refused() {
        let elf = fake_elf(1000);
        assert_eq!(extract_vmlinux(&elf).unwrap().0, elf);
        let err = extract_vmlinux(b"hello world").unwrap_err().to_string();
        assert!(err.contains("neither an ELF"), "{err}");
        let mut frame = lz4_legacy_frame(&fake_elf(5000));
        let n = frame.len();
        frame[n - 1] ^= 0xff; // trailer disagrees
        let err = extract_vmlinux(&fake_bzimage(&frame))
            .unwrap_err()
            .to_string();
        assert!(err.contains("trailer"), "{err}");
        let err = extract_vmlinux(&fake_bzimage(b"BZh91AY&SY"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported kernel compression"), "{err}");
    }
}

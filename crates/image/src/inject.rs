//! Puts the guest agent and its start-up files into a staged tree.
//!
//! The image boots straight into the agent as PID 1 (`init=/usr/local/bin/infra.operator --
//! guest --port 5000`). For images that keep their own init, the seeds' service files are also
//! written: the systemd unit of seed 001 and the OpenRC `S99guest` of seed 003. Everything is
//! owned by root with a fixed mtime, so the result is reproducible.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use infra_languages::Language;
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::source::ImageConfig;
use crate::unpack::{set_times, Unpacker};

/// Where the agent lives inside every image (seed 003).
pub const AGENT_IN_IMAGE: &str = "/usr/local/bin/infra.operator";
/// The agent's vsock port (seeds).
pub const AGENT_PORT: u32 = 5000;
/// Image config and language, read by the agent at start.
pub const IMAGE_CONFIG_IN_IMAGE: &str = "/etc/infra-operator/image.json";

/// What injection did, recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    /// sha256 of the agent binary.
    pub agent_sha256: String,
    /// Init systems found in the image whose service was enabled (`systemd`, `openrc`).
    pub enabled_services: Vec<String>,
}

/// Inputs for injection.
pub struct InjectOptions<'a> {
    /// The static agent binary to copy.
    pub agent: &'a Path,
    /// Language whose environment goes into the profile and service files.
    pub language: Option<&'a Language>,
    /// Every language installed (one for a language image, many for a polyglot one): each
    /// gets its `/etc/profile.d/{key}.sh`.
    pub languages: &'a [Language],
    /// Image config to hand to the agent.
    pub config: &'a ImageConfig,
    /// Timestamp for every written file.
    pub epoch: i64,
}

/// Returns `Ok(())` when `path` is a statically linked ELF (no `PT_INTERP`), so it runs on musl
/// and glibc images alike.
pub fn ensure_static(path: &Path) -> Result<()> {
    let mut f = std::fs::File::open(path).ctx("open agent binary", path)?;
    let mut head = vec![0u8; 64];
    f.read_exact(&mut head).ctx("read agent binary", path)?;
    if &head[..4] != b"\x7fELF" || head[4] != 2 {
        return Err(Error::Usage(format!(
            "{} is not a 64-bit ELF executable",
            path.display()
        )));
    }
    let phoff = u64::from_le_bytes(head[0x20..0x28].try_into().unwrap_or_default());
    let phentsize = u16::from_le_bytes([head[0x36], head[0x37]]) as u64;
    let phnum = u16::from_le_bytes([head[0x38], head[0x39]]) as u64;
    let mut table = vec![0u8; (phentsize * phnum) as usize];
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(phoff))
        .ctx("read agent binary", path)?;
    f.read_exact(&mut table).ctx("read agent binary", path)?;
    const PT_INTERP: u32 = 3;
    let dynamic = table
        .chunks(phentsize as usize)
        .any(|ph| ph.len() >= 4 && u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP);
    if dynamic {
        return Err(Error::AgentNotStatic {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Writes the agent, service files, profile script, image config and standard directories.
pub fn inject(root: &Path, opts: &InjectOptions<'_>) -> Result<Injected> {
    let mut writer = TreeWriter {
        epoch: opts.epoch,
        resolver: Unpacker::with_default_mtime(root, opts.epoch),
    };
    for (dir, mode) in [
        ("tmp", 0o1777),
        ("home", 0o755),
        ("var/log", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
        ("etc/infra-operator", 0o755),
    ] {
        writer.dir(dir, mode)?;
    }

    let agent_bytes = std::fs::read(opts.agent).ctx("read agent binary", opts.agent)?;
    let agent_sha256 = hex::encode(Sha256::digest(&agent_bytes));
    writer.file(AGENT_IN_IMAGE.trim_start_matches('/'), &agent_bytes, 0o755)?;

    let env = service_env(opts.language, opts.config);
    writer.file(
        "etc/systemd/system/infra.operator.service",
        systemd_unit(&env).as_bytes(),
        0o644,
    )?;
    writer.file("etc/init.d/S99guest", openrc_script(&env).as_bytes(), 0o755)?;
    let mut enabled = Vec::new();
    if ["lib/systemd/systemd", "usr/lib/systemd/systemd"]
        .iter()
        .any(|p| root.join(p).exists())
    {
        writer.symlink(
            "etc/systemd/system/multi-user.target.wants/infra.operator.service",
            "../infra.operator.service",
        )?;
        enabled.push("systemd".to_string());
    }
    if root.join("sbin/openrc").exists() || root.join("etc/runlevels").is_dir() {
        writer.symlink("etc/runlevels/default/S99guest", "/etc/init.d/S99guest")?;
        enabled.push("openrc".to_string());
    }
    for lang in opts.language.into_iter().chain(opts.languages) {
        writer.file(
            &format!("etc/profile.d/{}.sh", lang.key),
            lang.profile_script().as_bytes(),
            0o644,
        )?;
    }
    let image_json = serde_json::json!({
        "language": opts.language.map(|l| l.key.clone()),
        "languages": opts.languages.iter().map(|l| l.key.clone()).collect::<Vec<_>>(),
        "config": opts.config,
    });
    let text = serde_json::to_vec_pretty(&image_json).map_err(|e| Error::Usage(e.to_string()))?;
    writer.file(IMAGE_CONFIG_IN_IMAGE.trim_start_matches('/'), &text, 0o644)?;
    // Directories we wrote into get the fixed time too (reproducible images).
    writer.resolver.finish_with_default()?;
    Ok(Injected {
        agent_sha256,
        enabled_services: enabled,
    })
}

/// Environment lines for service files: the image's Env, then the language's env and PATH.
fn service_env(language: Option<&Language>, config: &ImageConfig) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: String| {
        env.retain(|(key, _)| key != k);
        env.push((k.to_string(), v));
    };
    for kv in &config.env {
        if let Some((k, v)) = kv.split_once('=') {
            set(k, v.to_string());
        }
    }
    if let Some(lang) = language {
        for (k, v) in &lang.env {
            set(k, v.clone());
        }
        let base = config
            .env
            .iter()
            .find_map(|kv| kv.strip_prefix("PATH="))
            .map(str::to_string);
        set("PATH", lang.path_var(base.as_deref()));
    }
    env
}

fn systemd_unit(env: &[(String, String)]) -> String {
    let mut s = String::from(
        "[Unit]\nDescription=LLM Firecracker Infra.Operator Guest\nAfter=network.target\n\n[Service]\nType=simple\n",
    );
    s.push_str(&format!(
        "ExecStart={AGENT_IN_IMAGE} guest --port {AGENT_PORT}\nRestart=always\nRestartSec=1\n"
    ));
    for (k, v) in env {
        s.push_str(&format!(
            "Environment=\"{k}={}\"\n",
            v.replace('\\', "\\\\").replace('"', "\\\"")
        ));
    }
    s.push_str("\n[Install]\nWantedBy=multi-user.target\n");
    s
}

fn openrc_script(env: &[(String, String)]) -> String {
    let mut s = String::from(
        "#!/sbin/openrc-run\n# infra.operator guest agent (seed 003: /etc/init.d/S99guest)\n",
    );
    s.push_str("name=\"infra.operator guest\"\n");
    s.push_str(&format!(
        "command=\"{AGENT_IN_IMAGE}\"\ncommand_args=\"guest --port {AGENT_PORT}\"\n"
    ));
    s.push_str("command_background=true\npidfile=\"/run/infra-operator-guest.pid\"\n");
    for (k, v) in env {
        let v = v.replace('\'', "'\\''");
        s.push_str(&format!("export {k}='{v}'\n"));
    }
    s.push_str("\ndepend() {\n\tneed localmount\n}\n");
    s
}

struct TreeWriter {
    epoch: i64,
    resolver: Unpacker,
}

impl TreeWriter {
    /// Resolves the parent inside the root (never writing through a symlink that leaves it).
    fn parent_of(&mut self, rel: &str) -> Result<(PathBuf, String)> {
        let rel = Path::new(rel);
        let parent = rel.parent().unwrap_or(Path::new(""));
        let dir =
            self.resolver
                .resolve_dir(parent, true)
                .map_err(|reason| Error::HostileEntry {
                    layer: "injection".into(),
                    entry: rel.display().to_string(),
                    reason,
                })?;
        self.resolver.note_dir(&dir);
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok((dir, name))
    }

    /// Makes sure a directory exists; a new one gets `mode`, an existing one keeps the image's.
    fn dir(&mut self, rel: &str, mode: u32) -> Result<()> {
        if self.resolver.resolve_dir(Path::new(rel), false).is_ok() {
            return Ok(());
        }
        let dir = self
            .resolver
            .resolve_dir(Path::new(rel), true)
            .map_err(|reason| Error::HostileEntry {
                layer: "injection".into(),
                entry: rel.into(),
                reason,
            })?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
            .ctx("set mode of", &dir)?;
        self.resolver.note_dir(&dir);
        if let Some(parent) = dir.parent() {
            self.resolver.note_dir(parent);
        }
        Ok(())
    }

    fn file(&mut self, rel: &str, bytes: &[u8], mode: u32) -> Result<()> {
        let (dir, name) = self.parent_of(rel)?;
        let path = dir.join(name);
        if std::fs::symlink_metadata(&path).is_ok() {
            if path.is_dir() && !path.is_symlink() {
                std::fs::remove_dir_all(&path).ctx("remove", &path)?;
            } else {
                std::fs::remove_file(&path).ctx("remove", &path)?;
            }
        }
        std::fs::write(&path, bytes).ctx("write", &path)?;
        std::os::unix::fs::lchown(&path, Some(0), Some(0)).ctx("set owner of", &path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .ctx("set mode of", &path)?;
        set_times(&path, self.epoch)
    }

    fn symlink(&mut self, rel: &str, target: &str) -> Result<()> {
        let (dir, name) = self.parent_of(rel)?;
        let path = dir.join(name);
        if std::fs::symlink_metadata(&path).is_ok() {
            std::fs::remove_file(&path).ctx("remove", &path)?;
        }
        std::os::unix::fs::symlink(target, &path).ctx("create symlink", &path)?;
        set_times(&path, self.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_files_carry_language_env() {
        let go = infra_languages::LanguageTable::builtin().get("go").unwrap();
        let cfg = ImageConfig {
            env: vec!["PATH=/usr/local/go/bin:/usr/bin".into()],
            ..Default::default()
        };
        let env = service_env(Some(go), &cfg);
        let unit = systemd_unit(&env);
        assert!(unit.contains("ExecStart=/usr/local/bin/infra.operator guest --port 5000"));
        assert!(unit.contains("Environment=\"GOCACHE=/tmp/go-cache\""));
        assert!(unit.contains("Environment=\"PATH=/usr/local/go/bin:/usr/bin"));
        assert!(openrc_script(&env).contains("command_args=\"guest --port 5000\""));
    }

    #[test]
    fn this_test_binary_is_static() {
        // The workspace links everything statically (see .cargo/config.toml).
        ensure_static(&std::env::current_exe().unwrap()).unwrap();
        assert!(matches!(
            ensure_static(Path::new("/bin/sh")),
            Err(Error::AgentNotStatic { .. })
        ));
    }
}

//! The language table, loaded from one data file (`languages.toml`).
//!
//! Every crate that needs to know how a language is installed, built or run asks this crate,
//! so adding a language is an edit to the data file, not to code.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// The data file compiled into the binary, so host and guest always agree on the table.
pub const LANGUAGES_TOML: &str = include_str!("../languages.toml");

/// How one language is installed, built and run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Language {
    /// Key used on the command line (`--lang python`); filled from the table key.
    #[serde(default)]
    pub key: String,
    /// Human name for listings and `rootfs verify`.
    pub name: String,
    /// Other names accepted for `--lang`.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Preset image for `rootfs from-docker --lang`; `None` where no official image carries the tool.
    #[serde(default)]
    pub image: Option<String>,
    /// Packages for `rootfs create --base debian|ubuntu`.
    #[serde(default)]
    pub debian_packages: Vec<String>,
    /// Packages for `rootfs create --base alpine`.
    #[serde(default)]
    pub alpine_packages: Vec<String>,
    /// Source file name inside the workspace.
    pub file: String,
    /// Build step (compiled languages); a failure is reported as `compile_error`.
    #[serde(default)]
    pub build: Vec<String>,
    /// Command that runs the program.
    pub run: Vec<String>,
    /// Command printing the language version.
    pub version: Vec<String>,
    /// Environment for build and run, applied over the image's own environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Directories prepended to `PATH`.
    #[serde(default)]
    pub path: Vec<String>,
    /// Typical image size in MB (seed 003's table), a hint for `--size`.
    #[serde(default)]
    pub size_mb: u64,
}

impl Language {
    /// The build command with `{file}` substituted, or `None` for interpreted languages.
    pub fn build_argv(&self) -> Option<Vec<String>> {
        (!self.build.is_empty()).then(|| self.substitute(&self.build))
    }

    /// The run command with `{file}` substituted.
    pub fn run_argv(&self) -> Vec<String> {
        self.substitute(&self.run)
    }

    fn substitute(&self, argv: &[String]) -> Vec<String> {
        argv.iter()
            .map(|a| a.replace("{file}", &self.file))
            .collect()
    }

    /// `PATH` for this language: its own directories first, then the standard ones.
    pub fn path_var(&self, base: Option<&str>) -> String {
        let base = base.unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        let mut parts: Vec<&str> = self.path.iter().map(String::as_str).collect();
        for p in base.split(':') {
            if !p.is_empty() && !parts.contains(&p) {
                parts.push(p);
            }
        }
        parts.join(":")
    }

    /// Text of `/etc/profile.d/{key}.sh`: the language's PATH and environment for login shells.
    pub fn profile_script(&self) -> String {
        let mut s = format!("# {} environment, written by infra.operator\n", self.name);
        if !self.path.is_empty() {
            s.push_str(&format!("export PATH=\"{}:$PATH\"\n", self.path.join(":")));
        }
        for (k, v) in &self.env {
            s.push_str(&format!("export {k}=\"{}\"\n", shell_escape_dq(v)));
        }
        s
    }
}

fn shell_escape_dq(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('$', "\\$")
        .replace('`', "\\`")
}

/// Why a language could not be found or the table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The name is neither a key nor an alias.
    #[error("unknown language '{name}': known languages are {known}")]
    Unknown {
        /// What the user typed.
        name: String,
        /// Comma-separated keys, for the message.
        known: String,
    },
    /// The data file is malformed (a build-time mistake, caught by tests).
    #[error("language table is invalid: {0}")]
    Invalid(String),
}

/// The whole table, keyed by language key, sorted.
#[derive(Debug, Clone)]
pub struct LanguageTable {
    languages: BTreeMap<String, Language>,
}

impl LanguageTable {
    /// Parses a table from TOML text (the embedded file, or a user's override in tests).
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut languages: BTreeMap<String, Language> =
            toml::from_str(text).map_err(|e| Error::Invalid(e.to_string()))?;
        let mut seen = BTreeMap::new();
        for (key, lang) in languages.iter_mut() {
            lang.key = key.clone();
            if lang.run.is_empty() || lang.version.is_empty() || lang.file.is_empty() {
                return Err(Error::Invalid(format!(
                    "{key}: run, version and file are required"
                )));
            }
            if lang.file.contains('/') {
                return Err(Error::Invalid(format!("{key}: file must be a plain name")));
            }
            for name in std::iter::once(key).chain(lang.aliases.iter()) {
                if let Some(other) = seen.insert(name.clone(), key.clone()) {
                    return Err(Error::Invalid(format!(
                        "name '{name}' used by {other} and {key}"
                    )));
                }
            }
        }
        Ok(Self { languages })
    }

    /// The table compiled into this binary.
    pub fn builtin() -> &'static LanguageTable {
        static TABLE: OnceLock<LanguageTable> = OnceLock::new();
        TABLE.get_or_init(|| LanguageTable::parse(LANGUAGES_TOML).expect("embedded table is valid"))
    }

    /// Finds a language by key or alias, case-insensitively.
    pub fn get(&self, name: &str) -> Result<&Language, Error> {
        let wanted = name.trim().to_ascii_lowercase();
        self.languages
            .values()
            .find(|l| l.key == wanted || l.aliases.contains(&wanted))
            .ok_or_else(|| Error::Unknown {
                name: name.to_string(),
                known: self
                    .languages
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// All languages, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = &Language> {
        self.languages.values()
    }
}

impl Error {
    /// The kind of this failure (every variant named).
    pub fn kind(&self) -> infra_config::ErrorKind {
        match self {
            Self::Unknown { .. } => infra_config::ErrorKind::Usage,
            Self::Invalid(_) => infra_config::ErrorKind::Failure,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_table_has_the_seed_languages() {
        let t = LanguageTable::builtin();
        for key in [
            "python", "nodejs", "go", "rust", "java", "ruby", "php", "dotnet", "bash", "c",
        ] {
            let l = t.get(key).unwrap();
            assert_eq!(l.key, key);
            assert!(!l.run.is_empty());
        }
        assert_eq!(
            t.get("python").unwrap().image.as_deref(),
            Some("python:3.12-alpine")
        );
        assert_eq!(t.get("node").unwrap().key, "nodejs");
        assert_eq!(t.get("C#").unwrap().key, "dotnet");
    }

    #[test]
    fn unknown_language_lists_known_ones() {
        let e = LanguageTable::builtin()
            .get("cobol2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown language 'cobol2'"), "{e}");
        assert!(e.contains("python"), "{e}");
    }

    #[test]
    fn commands_substitute_the_file_name() {
        let go = LanguageTable::builtin().get("go").unwrap();
        assert_eq!(
            go.build_argv().unwrap(),
            ["go", "build", "-o", "main", "main.go"]
        );
        assert_eq!(go.run_argv(), ["./main"]);
        assert!(LanguageTable::builtin()
            .get("python")
            .unwrap()
            .build_argv()
            .is_none());
        assert!(go.path_var(None).starts_with("/usr/local/go/bin:"));
    }

    #[test]
    fn duplicate_aliases_are_rejected() {
        let bad = "[a]\nname='A'\nfile='a'\nrun=['a']\nversion=['a']\naliases=['x']\n\
                   [b]\nname='B'\nfile='b'\nrun=['b']\nversion=['b']\naliases=['x']\n";
        assert!(LanguageTable::parse(bad).is_err());
    }

    #[test]
    fn profile_script_escapes_values() {
        let t = LanguageTable::parse(
            "[x]\nname='X'\nfile='x'\nrun=['x']\nversion=['x']\nenv={A='$HOME \"q\"'}\npath=['/opt/x']\n",
        )
        .unwrap();
        let s = t.get("x").unwrap().profile_script();
        assert!(s.contains("export PATH=\"/opt/x:$PATH\""));
        assert!(s.contains("export A=\"\\$HOME \\\"q\\\"\""));
    }
}

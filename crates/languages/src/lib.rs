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
    /// Debian release the packages come from when bookworm lacks them (`trixie`); `None`
    /// means the default release.
    #[serde(default)]
    pub suite: Option<String>,
    /// PyPI packages that ship the toolchain, installed with `pip install --target
    /// /opt/pypi/{key}` at image build time.
    #[serde(default)]
    pub pip_packages: Vec<String>,
    /// npm packages that ship the toolchain, installed with `npm install --prefix
    /// /opt/npm/{key}` (no install scripts run) at image build time.
    #[serde(default)]
    pub npm_packages: Vec<String>,
    /// Why no package source these hosts reach provides the language; the OCI `image` is
    /// still the recipe for hosts with a registry. `None` for installable languages.
    #[serde(default)]
    pub unavailable: Option<String>,
    /// Wall-clock limit for each verification program (build plus run), seconds.
    #[serde(default = "default_verify_timeout")]
    pub timeout_s: u64,
    /// Guest memory the language needs, MiB (JVMs, compilers).
    #[serde(default = "default_mem_mb")]
    pub mem_mb: u64,
    /// Hello world: prints a known line and exits 0.
    pub hello: Program,
    /// Reads integers from stdin, prints their sum and exits non-zero.
    pub stdin: Program,
}

fn default_verify_timeout() -> u64 {
    120
}

fn default_mem_mb() -> u64 {
    512
}

/// A test program with its input and the output it must give (`rootfs verify`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Program {
    /// Source code, written to the language's `file`.
    pub code: String,
    /// Bytes fed on standard input.
    #[serde(default)]
    pub input: String,
    /// Exact expected standard output.
    pub stdout: String,
    /// Expected exit code.
    #[serde(default)]
    pub exit_code: i32,
}

impl Language {
    /// The language can be built from the package sources these hosts reach.
    pub fn installable(&self) -> bool {
        self.unavailable.is_none()
    }

    /// Every check the table makes of one entry, as one-line problems (empty when sound).
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let key = &self.key;
        if self.run.is_empty() || self.version.is_empty() || self.file.is_empty() {
            p.push(format!("{key}: run, version and file are required"));
        }
        if self.file.contains('/') || self.file.starts_with('.') {
            p.push(format!("{key}: file must be a plain name"));
        }
        if !key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            p.push(format!("{key}: keys are lowercase letters and digits"));
        }
        for pkg in self
            .debian_packages
            .iter()
            .chain(&self.pip_packages)
            .chain(&self.npm_packages)
        {
            if pkg.is_empty()
                || pkg.starts_with('-')
                || !pkg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "@/._+-=<>~:".contains(c))
            {
                p.push(format!("{key}: package name {pkg:?} is not a plain name"));
            }
        }
        match &self.unavailable {
            Some(reason) => {
                if reason.trim().is_empty() {
                    p.push(format!("{key}: unavailable needs a reason"));
                }
                if self.image.is_none() {
                    p.push(format!(
                        "{key}: an unavailable language still names its OCI image"
                    ));
                }
            }
            None => {
                if self.debian_packages.is_empty()
                    && self.pip_packages.is_empty()
                    && self.npm_packages.is_empty()
                    && key != "base"
                {
                    p.push(format!("{key}: no packages, and not marked unavailable"));
                }
            }
        }
        if let Some(s) = &self.suite {
            if !["bookworm", "trixie"].contains(&s.as_str()) {
                p.push(format!("{key}: suite must be bookworm or trixie"));
            }
        }
        if self.hello.code.trim().is_empty() || self.hello.stdout.is_empty() {
            p.push(format!("{key}: hello needs code and expected stdout"));
        }
        if self.hello.exit_code != 0 {
            p.push(format!("{key}: hello must exit 0"));
        }
        if self.stdin.code.trim().is_empty()
            || self.stdin.input.is_empty()
            || self.stdin.stdout.is_empty()
        {
            p.push(format!(
                "{key}: stdin needs code, input and expected stdout"
            ));
        }
        if self.stdin.exit_code == 0 || !(1..=255).contains(&self.stdin.exit_code) {
            p.push(format!(
                "{key}: stdin must exit with a code in 1..=255 (it checks non-zero exits)"
            ));
        }
        if self.timeout_s == 0 || self.timeout_s > 900 {
            p.push(format!("{key}: timeout_s must be 1..=900"));
        }
        if !(64..=8192).contains(&self.mem_mb) {
            p.push(format!("{key}: mem_mb must be 64..=8192"));
        }
        p
    }

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
    /// An empty `--langs` list.
    #[error("no language named: give a comma-separated list such as python,c,java, or all")]
    NoneSelected,
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
            if let Some(problem) = lang.problems().into_iter().next() {
                return Err(Error::Invalid(problem));
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

    /// Resolves a comma-separated list (`python,js,c`) or `all` (every installable language)
    /// to keys, in table order, without duplicates.
    pub fn select(&self, list: &str) -> Result<Vec<&Language>, Error> {
        if list.trim().eq_ignore_ascii_case("all") {
            return Ok(self.iter().filter(|l| l.installable()).collect());
        }
        let mut keys = std::collections::BTreeSet::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            keys.insert(self.get(name)?.key.clone());
        }
        if keys.is_empty() {
            return Err(Error::NoneSelected);
        }
        Ok(keys.iter().map(|k| &self.languages[k]).collect())
    }
}

impl Error {
    /// The kind of this failure (every variant named).
    pub fn kind(&self) -> infra_config::ErrorKind {
        match self {
            Self::Unknown { .. } | Self::NoneSelected => infra_config::ErrorKind::Usage,
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

    /// The original system's 45 languages, by the keys it used.
    const ORIGINAL_45: [&str; 45] = [
        "awk",
        "base",
        "bash",
        "bun",
        "c",
        "clojure",
        "cobol",
        "cpp",
        "crystal",
        "d",
        "dart",
        "deno",
        "dotnet",
        "elixir",
        "erlang",
        "fortran",
        "go",
        "groovy",
        "haskell",
        "java",
        "jq",
        "julia",
        "kotlin",
        "lisp",
        "lua",
        "nasm",
        "nim",
        "nodejs",
        "ocaml",
        "octave",
        "pascal",
        "perl",
        "php",
        "prolog",
        "python",
        "r",
        "ruby",
        "rust",
        "scala",
        "scheme",
        "sqlite",
        "swift",
        "tcl",
        "typescript",
        "zig",
    ];

    #[test]
    fn builtin_table_has_the_original_45_and_nothing_else() {
        let t = LanguageTable::builtin();
        let keys: Vec<&str> = t.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(keys, ORIGINAL_45, "keys, in table order");
        for l in t.iter() {
            assert!(
                l.image.is_some(),
                "{}: every entry names an OCI image",
                l.key
            );
            assert!(
                l.env.get("HOME").map(String::as_str) == Some("/tmp"),
                "{}: the guest sets no HOME, so the table does",
                l.key
            );
            assert_eq!(l.hello.stdout, "Hello, World!\n", "{}", l.key);
            assert!(l.hello.input.is_empty(), "{}", l.key);
            assert_eq!(l.stdin.input, "1\n2\n3\n4\n", "{}", l.key);
            assert_eq!(l.stdin.stdout, "10\n", "{}", l.key);
            assert_eq!(l.stdin.exit_code, 3, "{}", l.key);
            if l.installable() {
                assert!(
                    l.timeout_s >= 120,
                    "{}: emulated guests need at least 120 s",
                    l.key
                );
            }
            // Every argv names the file through {file} or a fixed name derived from it.
            assert!(
                l.run.iter().chain(&l.build).any(|a| a.contains("{file}")),
                "{}: build or run uses {{file}}",
                l.key
            );
        }
    }

    #[test]
    fn aliases_users_type_resolve() {
        let t = LanguageTable::builtin();
        for (alias, key) in [
            ("js", "nodejs"),
            ("node", "nodejs"),
            ("javascript", "nodejs"),
            ("ts", "typescript"),
            ("py", "python"),
            ("python3", "python"),
            ("golang", "go"),
            ("c++", "cpp"),
            ("cs", "dotnet"),
            ("csharp", "dotnet"),
            ("C#", "dotnet"),
            ("sh", "base"),
            ("rb", "ruby"),
            ("pl", "perl"),
            ("rs", "rust"),
            ("hs", "haskell"),
            ("ex", "elixir"),
            ("exs", "elixir"),
            ("erl", "erlang"),
            ("kt", "kotlin"),
            ("clj", "clojure"),
            ("ml", "ocaml"),
            ("f90", "fortran"),
            ("gfortran", "fortran"),
            ("pas", "pascal"),
            ("fpc", "pascal"),
            ("cob", "cobol"),
            ("sbcl", "lisp"),
            ("cl", "lisp"),
            ("scm", "scheme"),
            ("guile", "scheme"),
            ("sqlite3", "sqlite"),
            ("tclsh", "tcl"),
            ("m", "octave"),
            ("matlab", "octave"),
            ("rlang", "r"),
            ("swipl", "prolog"),
            ("gawk", "awk"),
            ("asm", "nasm"),
            ("jl", "julia"),
            ("cr", "crystal"),
            ("dlang", "d"),
        ] {
            assert_eq!(t.get(alias).unwrap().key, key, "alias {alias}");
        }
        // bun is a language of its own, not TypeScript's alias.
        assert_eq!(t.get("bun").unwrap().key, "bun");
    }

    #[test]
    fn unavailable_languages_say_why_and_are_left_out_of_all() {
        let t = LanguageTable::builtin();
        let all: Vec<&str> = t
            .select("all")
            .unwrap()
            .iter()
            .map(|l| l.key.as_str())
            .collect();
        for l in t.iter().filter(|l| !l.installable()) {
            assert!(!all.contains(&l.key.as_str()), "{}", l.key);
            assert!(
                l.debian_packages.is_empty()
                    && l.pip_packages.is_empty()
                    && l.npm_packages.is_empty(),
                "{}",
                l.key
            );
        }
        for key in [
            "python", "c", "java", "go", "rust", "bash", "nodejs", "zig", "bun", "deno",
        ] {
            assert!(all.contains(&key), "{key} is installable");
        }
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

    /// One minimal valid entry (packages and both programs), with `extra` lines added.
    fn entry(key: &str, extra: &str) -> String {
        format!(
            "[{key}]\nname='{key}'\nfile='{key}'\nrun=['{key}']\nversion=['{key}']\n\
             debian_packages=['{key}']\n{extra}\n\
             [{key}.hello]\ncode='hi'\nstdout='hi'\n\
             [{key}.stdin]\ncode='sum'\ninput='1'\nstdout='1'\nexit_code=3\n"
        )
    }

    #[test]
    fn duplicate_aliases_are_rejected() {
        let good = entry("a", "aliases=['x']") + &entry("b", "aliases=['y']");
        assert!(LanguageTable::parse(&good).is_ok());
        let bad = entry("a", "aliases=['x']") + &entry("b", "aliases=['x']");
        let e = LanguageTable::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("name 'x' used by a and b"), "{e}");
    }

    #[test]
    fn entries_without_programs_or_packages_are_rejected() {
        let no_programs =
            "[x]\nname='X'\nfile='x'\nrun=['x']\nversion=['x']\ndebian_packages=['x']\n";
        assert!(LanguageTable::parse(no_programs).is_err());
        let no_packages = entry("x", "").replace("debian_packages=['x']", "");
        let e = LanguageTable::parse(&no_packages).unwrap_err().to_string();
        assert!(e.contains("no packages"), "{e}");
        let unavailable = no_packages.replace(
            "version=['x']",
            "version=['x']\nunavailable='not packaged'\nimage='x:1'",
        );
        assert!(LanguageTable::parse(&unavailable).is_ok());
        let zero_exit = entry("x", "").replace("exit_code=3", "exit_code=0");
        assert!(LanguageTable::parse(&zero_exit).is_err());
    }

    #[test]
    fn profile_script_escapes_values() {
        let t =
            LanguageTable::parse(&entry("x", "env={A='$HOME \"q\"'}\npath=['/opt/x']")).unwrap();
        let s = t.get("x").unwrap().profile_script();
        assert!(s.contains("export PATH=\"/opt/x:$PATH\""));
        assert!(s.contains("export A=\"\\$HOME \\\"q\\\"\""));
    }
}

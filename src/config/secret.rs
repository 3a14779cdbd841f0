//! [`Secret`]: passwords and tokens (the etcd password, the Consul token,
//! the admin token, health-check header values) that must stay out of logs,
//! errors, the admin API and `Debug` output; and [`read_secret_file`], which
//! reads one from a file that only its owner can read.
//!
//! A `Secret` has no `Display` and no `Serialize`: the only way to its text
//! is [`Secret::expose`], at the one place that sends it. Deserializing one
//! never echoes the value, not even in a type error (`password = 12345`
//! says "expected a string, found an integer").

use std::fmt;
use std::fs::Metadata;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use serde::de::{Deserialize, Deserializer, Error as _};

/// A value that must never reach a log line: `Debug` prints `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` is this secret, in time that depends on the
    /// lengths only, never on how much of it matches (a remote guesser
    /// learns nothing from timing).
    pub fn matches(&self, candidate: &[u8]) -> bool {
        subtle::ConstantTimeEq::ct_eq(self.0.as_bytes(), candidate).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Through a `toml::Value`, so a wrong type is reported by its name
        // only: serde's own message would quote the value.
        match toml::Value::deserialize(deserializer)? {
            toml::Value::String(text) => Ok(Secret(text)),
            other => Err(D::Error::custom(format!(
                "expected a string, found {} (the value is not shown: it may be a secret)",
                article(other.type_str())
            ))),
        }
    }
}

fn article(kind: &str) -> String {
    match kind.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => format!("an {kind}"),
        _ => format!("a {kind}"),
    }
}

/// The largest secret file read: a token or password, not a document.
pub const MAX_SECRET_FILE_BYTES: u64 = 4096;

/// Reads a secret (a token, a password) from `path`, refusing a file that
/// others could read or change, as ssh refuses such a private key: it must
/// be a regular file owned by squire's user and private to it (0600 or
/// 0400), or owned by root and readable by squire's group at most (0640 or
/// 0440, what a Kubernetes Secret volume with `fsGroup` gives). Symbolic
/// links are followed (Secret volumes are made of them). Surrounding
/// whitespace is trimmed; an empty file is refused. Errors name the path
/// and the fix, never the content.
pub fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let shown = path.display();
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        // A FIFO planted in place of the file must not hang the read.
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open {shown}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    check_private(path, &meta)?;
    if meta.len() > MAX_SECRET_FILE_BYTES {
        return Err(format!(
            "{shown} has {} bytes, more than the {MAX_SECRET_FILE_BYTES} a secret file may have",
            meta.len()
        ));
    }
    let mut bytes = Vec::new();
    (&mut file)
        .take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(format!(
            "{shown} has more than the {MAX_SECRET_FILE_BYTES} bytes a secret file may have"
        ));
    }
    let text = String::from_utf8(bytes).map_err(|_| format!("{shown} is not UTF-8 text"))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("{shown} is empty"));
    }
    Ok(Secret::new(text))
}

/// Whether a file holding a secret (a token, a private key) is private
/// enough: owned by squire's user with no group or other permission bits,
/// or owned by root with at most group read. The error names the path,
/// its mode and the fix.
pub fn check_private(path: &Path, meta: &Metadata) -> Result<(), String> {
    let shown = path.display();
    let mode = meta.mode() & 0o7777;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() == me {
        if mode & 0o077 != 0 {
            return Err(format!(
                "{shown} is accessible by group or others (mode {mode:04o}): anyone who can \
                 read it holds the secret; chmod 600 {shown}"
            ));
        }
    } else if meta.uid() == 0 {
        if mode & 0o037 != 0 {
            return Err(format!(
                "{shown} is owned by root and accessible by others or writable by its group \
                 (mode {mode:04o}); chmod 640 {shown} at most (group read only, for squire's group)"
            ));
        }
    } else {
        return Err(format!(
            "{shown} is owned by uid {}, neither squire's user (uid {me}) nor root: that user \
             could change the secret; chown it to squire's user and chmod 600 it",
            meta.uid()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn a_private_file_is_read_trimmed() {
        let dir = tempfile::tempdir().expect("dir");
        for mode in [0o600, 0o400] {
            let path = write(dir.path(), "token", "  s3cret-token\n", mode);
            let secret = read_secret_file(&path).expect("private file");
            assert_eq!(secret.expose(), "s3cret-token");
        }
    }

    #[test]
    fn a_file_others_can_read_is_refused_without_showing_it() {
        let dir = tempfile::tempdir().expect("dir");
        for mode in [0o644, 0o640, 0o604, 0o660, 0o620] {
            let path = write(dir.path(), "token", "s3cret-token", mode);
            let error = read_secret_file(&path).expect_err("too open");
            assert!(
                error.contains(&format!("mode {mode:04o}")) && error.contains("chmod 600"),
                "{error}"
            );
            assert!(error.contains(&path.display().to_string()), "{error}");
            assert!(!error.contains("s3cret"), "{error}");
        }
    }

    #[test]
    fn empty_oversized_and_special_files_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let empty = write(dir.path(), "empty", " \n\t\n", 0o600);
        assert!(read_secret_file(&empty)
            .expect_err("empty")
            .ends_with("is empty"));
        let big = write(dir.path(), "big", &"x".repeat(5000), 0o600);
        assert!(read_secret_file(&big)
            .expect_err("big")
            .contains("more than the 4096"));
        let error = read_secret_file(dir.path()).expect_err("a directory");
        assert!(error.contains("not a regular file"), "{error}");
        let missing = read_secret_file(&dir.path().join("missing")).expect_err("missing");
        assert!(missing.contains("No such file"), "{missing}");
        let fifo = dir.path().join("fifo");
        let c_path = std::ffi::CString::new(fifo.display().to_string()).expect("path");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let error = read_secret_file(&fifo).expect_err("a FIFO");
        assert!(error.contains("not a regular file"), "{error}");
    }

    #[test]
    fn a_symlink_to_a_private_file_is_followed() {
        let dir = tempfile::tempdir().expect("dir");
        let target = write(dir.path(), "..data-token", "linked-token", 0o400);
        let link = dir.path().join("token");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        assert_eq!(
            read_secret_file(&link).expect("followed").expose(),
            "linked-token"
        );
    }

    #[test]
    fn debug_and_type_errors_never_show_the_value() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "***");
        assert_eq!(format!("{:?}", Some(&secret)), "Some(***)");
        let error = toml::from_str::<toml::Table>("password = 1234567")
            .expect("toml")
            .remove("password")
            .expect("key")
            .try_into::<Secret>()
            .expect_err("not a string");
        let text = error.to_string();
        assert!(
            text.contains("expected a string, found an integer"),
            "{text}"
        );
        assert!(!text.contains("1234567"), "{text}");
    }

    #[test]
    fn matching_is_exact() {
        let secret = Secret::new("abc123");
        assert!(secret.matches(b"abc123"));
        for wrong in [&b"abc124"[..], b"abc12", b"abc1234", b"", b"ABC123"] {
            assert!(!secret.matches(wrong), "{wrong:?}");
        }
    }
}

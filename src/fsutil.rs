//! Small file helpers: atomic writes (temp file, fsync, rename, fsync dir) with a mode.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Temp files of `write_atomic` are named `<TEMP_PREFIX><random letters and digits><TEMP_SUFFIX>`.
pub const TEMP_PREFIX: &str = ".edgesync-";
/// See `TEMP_PREFIX`.
pub const TEMP_SUFFIX: &str = ".tmp";

/// Writes `data` to `path` atomically with permissions `mode`: a temp file in the same
/// directory, fsync, rename over `path`, fsync of the directory. Readers see the old or
/// the new content, never a mix; a crash leaves at most a stray temp file.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .suffix(TEMP_SUFFIX)
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
        .map_err(without_path)?;
    // Through the File: the temp file's own errors carry its random path, which means nothing
    // to a reader.
    tmp.as_file_mut().write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// An error of tempfile's without the temp file's random path it appends (" at path …"),
/// which means nothing to a reader; its kind stays.
fn without_path(e: std::io::Error) -> std::io::Error {
    let text = e.to_string();
    match text.split_once(" at path ") {
        Some((said, _)) if e.get_ref().is_some() => std::io::Error::new(e.kind(), said),
        _ => e,
    }
}

/// Writes a secret (mode 0600) atomically.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_atomic(path, data, 0o600)
}

/// Creates `dir` (and parents) if missing, with `mode` on the directories it creates.
pub fn ensure_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_content_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        write_atomic(&path, b"one", 0o644).unwrap();
        write_private(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "no temp files left behind");
    }
}

//! Writing files so that a killed process never leaves a half-written one.

use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// A safetensors file of `tensors` (name, tensor), every one stored as f32, with `metadata`.
pub fn safetensors_f32<'a>(
    tensors: impl IntoIterator<Item = (String, &'a candle_core::Tensor)>,
    metadata: std::collections::HashMap<String, String>,
) -> Result<Vec<u8>> {
    use safetensors::{tensor::TensorView, Dtype};
    let data = tensors
        .into_iter()
        .map(|(name, t)| {
            let v = t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Ok((name, t.dims().to_vec(), bytes))
        })
        .collect::<Result<Vec<_>>>()?;
    let views = data
        .iter()
        .map(|(name, shape, bytes)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map_err(|e| Error::Safetensors(e.to_string()))?;
            Ok((name.as_str(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Safetensors(e.to_string()))
}

/// Writes `bytes` to `path` through a temporary file in the same folder, then renames it over
/// `path`: readers see the old file or the whole new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".atomtune-").suffix(".tmp");
    // Temporary files are private (0600); the result should be an ordinary file: keep the mode
    // of the file being replaced, or use 0644.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o777);
        builder.permissions(std::fs::Permissions::from_mode(mode));
    }
    let mut tmp = builder.tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(path, e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// The bytes of the file at `path`, memory-mapped: a safetensors header is read without
/// reading the tensors behind it (a 2 GB adapter file that is not a delta is told apart by
/// its first page), and tensors are copied out of the mapping once, not from a copy of it.
pub fn map(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: mapped read-only; like every tool that maps checkpoints we assume nobody
    // rewrites the file while it is open.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bin");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&p), 0o644);
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
            write_atomic(&p, b"three").unwrap();
            assert_eq!(mode(&p), 0o640);
        }
        let e = write_atomic(&dir.path().join("missing/x.bin"), b"x").unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}

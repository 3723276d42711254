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

/// [`safetensors_f32`] written to `path` atomically ([`write_atomic`]), streamed from the
/// tensors' own memory: a file of gigabytes (an exported diff) takes no second copy of its
/// tensors and no buffer of the whole file. Returns the file's size.
pub fn write_safetensors_f32(
    path: &Path,
    tensors: &[(String, candle_core::Tensor)],
    metadata: std::collections::HashMap<String, String>,
) -> Result<u64> {
    use candle_core::{CpuStorage, DType, Device, Storage};
    use safetensors::{tensor::TensorView, Dtype};
    // each as contiguous f32 on the CPU: a copy only where a tensor is not one already
    let owned = tensors
        .iter()
        .map(|(n, t)| {
            Ok((
                n,
                t.to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?
                    .contiguous()?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = owned.iter().map(|(_, t)| t.storage_and_layout()).collect();
    let views = owned
        .iter()
        .zip(&guards)
        .map(|((name, t), (storage, layout))| {
            let Storage::Cpu(CpuStorage::F32(v)) = &**storage else {
                unreachable!("made f32 on the CPU above")
            };
            let data = &v[layout.start_offset()..layout.start_offset() + t.elem_count()];
            let bytes: std::borrow::Cow<'_, [u8]> = if cfg!(target_endian = "little") {
                // SAFETY: f32 has no padding and u8 no alignment; the bytes are the slice's.
                std::borrow::Cow::Borrowed(unsafe {
                    std::slice::from_raw_parts(
                        data.as_ptr().cast::<u8>(),
                        std::mem::size_of_val(data),
                    )
                })
            } else {
                std::borrow::Cow::Owned(data.iter().flat_map(|x| x.to_le_bytes()).collect())
            };
            Ok((name.as_str(), Dtype::F32, t.dims().to_vec(), bytes))
        })
        .collect::<Result<Vec<_>>>()?;
    let views = views
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let view = TensorView::new(*dtype, shape.clone(), bytes)
                .map_err(|e| Error::Safetensors(e.to_string()))?;
            Ok((*name, view))
        })
        .collect::<Result<Vec<_>>>()?;
    write_atomic_with(path, |tmp| {
        safetensors::serialize_to_file(views, Some(metadata), tmp)
            .map_err(|e| Error::Safetensors(format!("{}: {e}", path.display())))
    })?;
    Ok(std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len())
}

/// Writes `bytes` to `path` through a temporary file in the same folder, then renames it over
/// `path`: readers see the old file or the whole new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(tmp)
            .map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(path, e))
    })
}

/// [`write_atomic`] of what `write` writes to the temporary file at the path it is given.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
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
    let tmp = builder.tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    write(tmp.path())?;
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

    /// The streamed file is the file `safetensors_f32` makes, byte for byte, also for tensors
    /// that are not contiguous f32 (a transposed view, an f16 tensor), and it reads back.
    #[test]
    fn a_streamed_file_equals_the_one_made_in_memory() {
        use candle_core::{DType, Device, Tensor};
        let a = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let tensors = vec![
            ("b.diff".to_string(), a.t().unwrap()),
            ("a.diff".to_string(), a.to_dtype(DType::F16).unwrap()),
            ("c".to_string(), (a.narrow(1, 1, 2).unwrap() * 0.5).unwrap()),
        ];
        let meta: std::collections::HashMap<String, String> =
            [("k".to_string(), "v".to_string())].into();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        let size = write_safetensors_f32(&p, &tensors, meta.clone()).unwrap();
        let want = safetensors_f32(tensors.iter().map(|(k, t)| (k.clone(), t)), meta).unwrap();
        let got = std::fs::read(&p).unwrap();
        assert_eq!(size as usize, got.len());
        assert!(got == want);
        let back = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
        let b = back["b.diff"].to_vec2::<f32>().unwrap();
        assert_eq!(b, a.t().unwrap().to_vec2::<f32>().unwrap());
    }
}

//! Where a model's tensors come from: memory-mapped safetensors files, or seeded random values
//! for benchmarks at real size without a download.
//!
//! A [`Weights`] is a cursor into the source with a key prefix, like candle's `VarBuilder`
//! (`w.pp("down_blocks").pp(0)` reads `down_blocks.0.*`), plus what a user needs when a checkpoint
//! does not fit: errors naming the key, the file and both shapes, and a check that every tensor
//! of the file was used.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use rand::{Rng, SeedableRng};

use crate::{Error, Result};

enum Source {
    Files {
        st: MmapedSafetensors,
        label: String,
        paths: Vec<PathBuf>,
    },
    /// A single-file (original LDM layout) checkpoint read under diffusers names.
    Mapped {
        st: Arc<MmapedSafetensors>,
        label: String,
        path: PathBuf,
        map: KeyMap,
        /// The file-key prefixes of this component (what [`Weights::check_all_used`] checks).
        scope: Vec<String>,
    },
    Random {
        seed: u64,
    },
    /// The files of `Files` (`map: None`) or `Mapped`, mapped again for each read and unmapped
    /// after it ([`Weights::reopening`]).
    Reopen {
        paths: Vec<PathBuf>,
        label: String,
        map: Option<KeyMap>,
    },
}

/// How a tensor of a single-file checkpoint becomes the one a diffusers name asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// As it is.
    Whole,
    /// A 1x1 conv kernel `[o, i, 1, 1]` read as a linear weight `[o, i]`.
    Squeeze,
    /// `len` rows from `start` (one of q, k, v of a fused `in_proj`).
    Rows(usize, usize),
    /// A matrix transposed (OpenCLIP's `text_projection`).
    Transpose,
}

/// The file key holding a diffusers key's tensor, and how to take it; `None` when the
/// checkpoint layout has no counterpart.
pub type KeyMap = Arc<dyn Fn(&str) -> Option<(String, Take)> + Send + Sync>;

struct Inner {
    /// Shared by the copies [`Weights::with_dtype`] makes, as is `used`.
    source: Arc<Source>,
    dtype: DType,
    /// Conv and linear weights kept in bf16 ([`Weights::with_bf16_weights`]).
    bf16_weights: bool,
    device: Device,
    used: Arc<Mutex<BTreeSet<String>>>,
    /// Where every tensor read is also put, by key ([`Weights::recording_into`]).
    record: Option<Record>,
}

/// Tensors as read, by key (diffusers names for a single file).
pub type Record = Arc<Mutex<std::collections::HashMap<String, Tensor>>>;

/// A source of named tensors, at a key prefix.
#[derive(Clone)]
pub struct Weights {
    inner: Arc<Inner>,
    prefix: String,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("source", &self.label())
            .field("prefix", &self.prefix)
            .field("dtype", &self.inner.dtype)
            .finish()
    }
}

/// The safetensors file `path`, mapped read-only.
pub(crate) fn map_safetensors(path: &Path) -> Result<MmapedSafetensors> {
    // SAFETY: mapped read-only; like every tool that maps checkpoints we assume nobody
    // rewrites the file while it is open.
    unsafe { MmapedSafetensors::new(path) }.map_err(|e| invalid_safetensors(path, e))
}

/// The error for a file that candle cannot read as safetensors.
pub(crate) fn invalid_safetensors(path: &Path, e: candle_core::Error) -> Error {
    Error::Config {
        path: path.into(),
        reason: format!("not a valid safetensors file: {e}"),
    }
}

impl Weights {
    /// Maps `.safetensors` files (one model may be split in several), loading tensors as `dtype`
    /// on `device`. Pickle files are refused.
    pub fn from_files(paths: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        for p in paths {
            if p.extension()
                .is_some_and(|e| e == "bin" || e == "ckpt" || e == "pt" || e == "pth")
            {
                return Err(Error::Pickle { path: p.clone() });
            }
            if !p.is_file() {
                return Err(Error::io(
                    p,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                ));
            }
        }
        let label = paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        // SAFETY: mapped read-only; like every tool that maps checkpoints we assume nobody
        // rewrites the file while it is open.
        let st = unsafe { MmapedSafetensors::multi(paths) }
            .map_err(|e| invalid_safetensors(&paths.first().cloned().unwrap_or_default(), e))?;
        let paths = paths.to_vec();
        Ok(Self::new(Source::Files { st, label, paths }, dtype, device))
    }

    /// Seeded random values: a key's tensor depends only on `seed` and the key. Matrices and
    /// kernels are uniform in `±1/sqrt(fan_in)` (PyTorch's default scale), norm weights are 1,
    /// other vectors small. For benchmarks at real size; not a trained model.
    pub fn random(seed: u64, dtype: DType, device: &Device) -> Self {
        Self::new(Source::Random { seed }, dtype, device)
    }

    fn new(source: Source, dtype: DType, device: &Device) -> Self {
        Weights {
            inner: Arc::new(Inner {
                source: Arc::new(source),
                dtype,
                bf16_weights: false,
                device: device.clone(),
                used: Arc::default(),
                record: None,
            }),
            prefix: String::new(),
        }
    }

    /// One component of the single-file checkpoint `path`, mapped as `st` (named `label` in
    /// messages), read under diffusers names through `map`; `scope` are the file-key prefixes
    /// the component owns.
    pub fn mapped(
        st: Arc<MmapedSafetensors>,
        path: PathBuf,
        label: impl Into<String>,
        map: KeyMap,
        scope: &[&str],
        dtype: DType,
        device: &Device,
    ) -> Self {
        let source = Source::Mapped {
            st,
            path,
            label: label.into(),
            map,
            scope: scope.iter().map(|s| s.to_string()).collect(),
        };
        Self::new(source, dtype, device)
    }

    /// The same, also putting every tensor it reads into `record` under its key: the tensors of
    /// a single file under diffusers names, as loading it reads them (to write it as a folder).
    pub fn recording_into(&self, record: Record) -> Self {
        let mut w = self.with(self.inner.dtype, self.inner.bf16_weights);
        Arc::get_mut(&mut w.inner).expect("just made").record = Some(record);
        w
    }

    /// The same tensors at the same prefix, read from files mapped for each read and unmapped
    /// after it: what a layer keeps to read its original weight again (a weight kept in bf16),
    /// without holding the mapping, and the pages it read, for the life of the model.
    pub fn reopening(&self) -> Self {
        let source = match &*self.inner.source {
            Source::Files { paths, label, .. } => Source::Reopen {
                paths: paths.clone(),
                label: label.clone(),
                map: None,
            },
            Source::Mapped {
                path, label, map, ..
            } => Source::Reopen {
                paths: vec![path.clone()],
                label: label.clone(),
                map: Some(map.clone()),
            },
            Source::Random { .. } | Source::Reopen { .. } => return self.clone(),
        };
        let mut w = Self::new(source, self.inner.dtype, &self.inner.device);
        w.prefix = self.prefix.clone();
        w
    }

    /// A `Reopen` source's files mapped again, at this prefix.
    fn reopened(&self, paths: &[PathBuf], map: &Option<KeyMap>) -> Result<Self> {
        let mut w = match map {
            None => Self::from_files(paths, self.inner.dtype, &self.inner.device)?,
            Some(map) => {
                let path = paths.first().cloned().unwrap_or_default();
                let st = map_safetensors(&path)?;
                let label = self.label();
                Self::mapped(
                    Arc::new(st),
                    path,
                    label,
                    map.clone(),
                    &[],
                    self.inner.dtype,
                    &self.inner.device,
                )
            }
        };
        w.prefix = self.prefix.clone();
        Ok(w)
    }

    /// The same source and prefix, loading tensors as `dtype` (a VAE kept in f32 inside a
    /// half-precision model). Keys used through either count as used for both.
    pub fn with_dtype(&self, dtype: DType) -> Self {
        self.with(dtype, self.inner.bf16_weights)
    }

    /// The same, keeping the weights of convs and linears in bf16 when `on` and they load as
    /// f32: the CPU's mixed precision, whose kernels read them as f32 a layer at a time (half
    /// the memory of the weights; their products round them to bf16 anyway). Norms, biases and
    /// embeddings stay as loaded.
    pub fn with_bf16_weights(&self, on: bool) -> Self {
        self.with(self.inner.dtype, on)
    }

    /// The same source, prefix and record of used keys, loading as `dtype` and `bf16_weights`.
    fn with(&self, dtype: DType, bf16_weights: bool) -> Self {
        Weights {
            inner: Arc::new(Inner {
                source: self.inner.source.clone(),
                dtype,
                bf16_weights,
                device: self.inner.device.clone(),
                used: self.inner.used.clone(),
                record: self.inner.record.clone(),
            }),
            prefix: self.prefix.clone(),
        }
    }

    /// Whether conv and linear weights are kept in bf16 ([`Weights::with_bf16_weights`]).
    pub fn bf16_weights(&self) -> bool {
        self.inner.bf16_weights && self.inner.dtype == DType::F32
    }

    /// The same source at `prefix.name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        Weights {
            inner: self.inner.clone(),
            prefix: self.key(&name.to_string()),
        }
    }

    /// The current prefix: the diffusers name of the module being built.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The dtype tensors are loaded as.
    pub fn dtype(&self) -> DType {
        self.inner.dtype
    }

    /// The device tensors are loaded on.
    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    fn label(&self) -> String {
        match &*self.inner.source {
            Source::Files { label, .. }
            | Source::Mapped { label, .. }
            | Source::Reopen { label, .. } => label.clone(),
            Source::Random { seed } => format!("random weights (seed {seed})"),
        }
    }

    /// Whether the source has `name` (random sources have everything).
    pub fn contains(&self, name: &str) -> bool {
        match &*self.inner.source {
            Source::Files { st, .. } => st.get(&self.key(name)).is_ok(),
            Source::Mapped { st, map, .. } => {
                map(&self.key(name)).is_some_and(|(k, _)| st.get(&k).is_ok())
            }
            Source::Random { .. } => true,
            Source::Reopen { paths, map, .. } => {
                self.reopened(paths, map).is_ok_and(|w| w.contains(name))
            }
        }
    }

    /// Marks `prefix.name` as used without loading it: a buffer some checkpoints carry that the
    /// model recomputes (such as CLIP's `position_ids`).
    pub fn skip(&self, name: &str) {
        let key = match &*self.inner.source {
            Source::Mapped { map, .. } => match map(&self.key(name)) {
                Some((file_key, _)) => file_key,
                None => return,
            },
            _ => self.key(name),
        };
        self.inner.used.lock().expect("lock").insert(key);
    }

    /// A conv or linear weight `prefix.name` as the layer keeps it: [`Weights::get`], in bf16
    /// where [`Weights::bf16_weights`] says so. An f32 tensor of a `.safetensors` file is rounded
    /// straight from the mapped file, without an f32 copy first.
    pub fn get_kept(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        let shape: Shape = shape.into();
        if !self.bf16_weights() {
            return self.get(shape, name);
        }
        if let Source::Files { st, .. } = &*self.inner.source {
            let key = self.key(name);
            if let Ok(view) = st.get(&key) {
                if view.dtype() == safetensors::Dtype::F32 && view.shape() == shape.dims() {
                    let v: Vec<half::bf16> = view
                        .data()
                        .chunks_exact(4)
                        .map(|b| half::bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                        .collect();
                    release_pages(view.data());
                    self.inner.used.lock().expect("lock").insert(key.clone());
                    return Ok(self.recorded(key, Tensor::from_vec(v, shape, &self.inner.device)?));
                }
            }
        }
        let t = self.get(shape, name)?;
        Ok(if t.dtype() == DType::F32 {
            t.to_dtype(DType::BF16)?
        } else {
            t
        })
    }

    /// The tensor `prefix.name`, which must have `shape`.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        let t = self.read(shape, name)?;
        Ok(self.recorded(self.key(name), t))
    }

    /// `t`, also put into the record under `key` when recording ([`Weights::recording_into`]).
    fn recorded(&self, key: String, t: Tensor) -> Tensor {
        if let Some(r) = &self.inner.record {
            r.lock().expect("lock").insert(key, t.clone());
        }
        t
    }

    fn read(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let key = self.key(name);
        let t = match &*self.inner.source {
            Source::Files { st, .. } => {
                let view = st.get(&key).map_err(|_| Error::MissingKey {
                    file: self.label(),
                    key: key.clone(),
                    shape: shape.dims().to_vec(),
                })?;
                if view.shape() != shape.dims() {
                    return Err(Error::KeyShape {
                        file: self.label(),
                        key,
                        found: view.shape().to_vec(),
                        expected: shape.dims().to_vec(),
                    });
                }
                let t = st.load(&key, &self.inner.device)?;
                release_pages(view.data());
                t
            }
            Source::Mapped { st, map, .. } => {
                let t = self.mapped_tensor(st, map, &key, &shape)?;
                return Ok(t.to_dtype(self.inner.dtype)?);
            }
            Source::Random { seed } => random_tensor(*seed, &key, &shape, &self.inner.device)?,
            Source::Reopen { paths, map, .. } => {
                return self.reopened(paths, map)?.get(shape, name);
            }
        };
        self.inner.used.lock().expect("lock").insert(key);
        Ok(t.to_dtype(self.inner.dtype)?)
    }

    /// `key`'s tensor from a single-file checkpoint, taken as `map` says; errors name both keys.
    fn mapped_tensor(
        &self,
        st: &MmapedSafetensors,
        map: &KeyMap,
        key: &str,
        shape: &Shape,
    ) -> Result<Tensor> {
        let missing = |file_key: String| Error::MissingKey {
            file: self.label(),
            key: file_key,
            shape: shape.dims().to_vec(),
        };
        let (file_key, take) =
            map(key).ok_or_else(|| missing(format!("{key} (no single-file counterpart)")))?;
        let view = st
            .get(&file_key)
            .map_err(|_| missing(format!("{file_key} (for {key})")))?;
        let found = view.shape().to_vec();
        let t = st.load(&file_key, &self.inner.device)?;
        release_pages(view.data());
        let t = match take {
            Take::Whole => t,
            Take::Squeeze if found.len() == 4 && found[2..] == [1, 1] => {
                t.reshape((found[0], found[1]))?
            }
            Take::Squeeze => t,
            Take::Rows(start, len) if found.first().is_some_and(|&n| n >= start + len) => {
                t.narrow(0, start, len)?
            }
            Take::Rows(..) => t,
            Take::Transpose if found.len() == 2 => t.t()?.contiguous()?,
            Take::Transpose => t,
        };
        if t.dims() != shape.dims() {
            return Err(Error::KeyShape {
                file: self.label(),
                key: format!("{file_key} (for {key})"),
                found,
                expected: shape.dims().to_vec(),
            });
        }
        self.inner.used.lock().expect("lock").insert(file_key);
        Ok(t)
    }

    /// Errors if the files hold tensors that nothing asked for: a checkpoint of another
    /// architecture or config that happens to have every key we need.
    pub fn check_all_used(&self) -> Result<()> {
        let (st, scope): (&MmapedSafetensors, &[String]) = match &*self.inner.source {
            Source::Files { st, .. } => (st, &[]),
            Source::Mapped { st, scope, .. } => (st, scope),
            Source::Random { .. } | Source::Reopen { .. } => return Ok(()),
        };
        let used = self.inner.used.lock().expect("lock");
        let mut extra: Vec<String> = st
            .tensors()
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| scope.is_empty() || scope.iter().any(|s| k.starts_with(s.as_str())))
            .filter(|k| !used.contains(k))
            .collect();
        extra.sort();
        match extra.first() {
            None => Ok(()),
            Some(first) => Err(Error::ExtraKeys {
                file: self.label(),
                count: extra.len(),
                first: first.clone(),
            }),
        }
    }
}

/// Takes the pages of `bytes`, a tensor's bytes in a read-only file mapping that have just been
/// copied out, out of the process's resident set (`madvise(MADV_DONTNEED)`): otherwise a load
/// keeps every page of the files it read resident until the mapping goes, and a model's peak
/// RSS counts its files on top of its tensors. The data stays valid: a later read faults the
/// pages back in from the file (the page cache).
pub(crate) fn release_pages(bytes: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysconf has no preconditions; madvise is given whole pages of a live mapping
        // (`bytes` borrows it), read-only and file-backed, so dropping its pages loses nothing:
        // a later read faults them in again. Pages only partly inside `bytes` are left alone.
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE).max(4096) as usize;
            let start = bytes.as_ptr() as usize;
            let first = start.div_ceil(page) * page;
            let end = (start + bytes.len()) / page * page;
            if end > first {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = bytes;
}

fn random_tensor(seed: u64, key: &str, shape: &Shape, device: &Device) -> Result<Tensor> {
    let dims = shape.dims();
    let n = shape.elem_count();
    let name = key.rsplit('.').next().unwrap_or(key);
    let is_norm = key.contains("norm");
    if dims.len() == 1 && is_norm {
        let v = if name == "weight" { 1f32 } else { 0f32 };
        return Ok(Tensor::full(v, dims, device)?);
    }
    let bound = if dims.len() >= 2 {
        let fan_in: usize = dims[1..].iter().product();
        1.0 / (fan_in as f32).sqrt()
    } else {
        0.02
    };
    let mut rng =
        rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ xxhash_rust::xxh3::xxh3_64(key.as_bytes()));
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
    Ok(Tensor::from_vec(v, dims, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_weights_are_seeded_per_key() {
        let a = Weights::random(1, DType::F32, &Device::Cpu);
        let t1 = a.pp("x").get((4, 3), "weight").unwrap();
        let t2 = a.pp("x").get((4, 3), "weight").unwrap();
        let t3 = a.pp("y").get((4, 3), "weight").unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&t1), v(&t2));
        assert_ne!(v(&t1), v(&t3));
        assert!(v(&t1).iter().all(|x| x.abs() <= 1.0 / 3f32.sqrt()));
        let n = a.pp("norm1").get(4, "weight").unwrap();
        assert_eq!(v(&n), vec![1.0; 4]);
    }

    #[test]
    fn files_report_missing_wrong_and_unused_keys_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("w.safetensors");
        let mut m = std::collections::HashMap::new();
        m.insert(
            "a.weight".to_string(),
            Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        m.insert(
            "b.weight".to_string(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&m, &path).unwrap();
        let w = Weights::from_files(std::slice::from_ref(&path), DType::F16, &Device::Cpu).unwrap();
        assert_eq!(w.pp("a").get((2, 3), "weight").unwrap().dtype(), DType::F16);
        let e = w.pp("a").get((3, 2), "weight").unwrap_err().to_string();
        assert!(
            e.contains("`a.weight` has shape [2, 3], the config expects [3, 2]"),
            "{e}"
        );
        let e = w.pp("c").get(2, "weight").unwrap_err().to_string();
        assert!(
            e.contains("missing tensor `c.weight`") && e.contains("w.safetensors"),
            "{e}"
        );
        let e = w.check_all_used().unwrap_err().to_string();
        assert!(
            e.contains("1 tensor(s) not used") && e.contains("b.weight"),
            "{e}"
        );
        let e = Weights::from_files(&[dir.join("model.bin")], DType::F32, &Device::Cpu);
        assert!(matches!(e, Err(Error::Pickle { .. })));
    }
}

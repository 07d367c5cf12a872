//! Host tensors and safetensors files: typed reads with checks, and atomic writes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::Metadata;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// Float data as stored: 16-bit weights stay 16-bit until a backend widens them.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

/// A float tensor in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

/// The float storage types a checkpoint may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatType {
    F32,
    F16,
    Bf16,
}

impl FloatType {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(FloatType::F32),
            "f16" => Ok(FloatType::F16),
            "bf16" => Ok(FloatType::Bf16),
            _ => Err(Error::invalid(format!(
                "dtype must be f32, f16 or bf16, got {s:?}"
            ))),
        }
    }
}

impl HostTensor {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        HostTensor {
            shape,
            data: Data::F32(data),
        }
    }

    pub fn len(&self) -> usize {
        match &self.data {
            Data::F32(v) => v.len(),
            Data::F16(v) => v.len(),
            Data::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn float_type(&self) -> FloatType {
        match &self.data {
            Data::F32(_) => FloatType::F32,
            Data::F16(_) => FloatType::F16,
            Data::Bf16(_) => FloatType::Bf16,
        }
    }

    /// The values widened to f32 (exact for every stored type).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            Data::F32(v) => v.clone(),
            Data::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Data::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// The same values stored as `ty` (rounded to nearest when narrowing).
    pub fn cast(&self, ty: FloatType) -> HostTensor {
        let wide = self.to_f32();
        let data = match ty {
            FloatType::F32 => Data::F32(wide),
            FloatType::F16 => Data::F16(wide.iter().map(|&x| f16::from_f32(x)).collect()),
            FloatType::Bf16 => Data::Bf16(wide.iter().map(|&x| bf16::from_f32(x)).collect()),
        };
        HostTensor {
            shape: self.shape.clone(),
            data,
        }
    }

    fn dtype(&self) -> Dtype {
        match self.float_type() {
            FloatType::F32 => Dtype::F32,
            FloatType::F16 => Dtype::F16,
            FloatType::Bf16 => Dtype::BF16,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match &self.data {
            Data::F32(v) => bytemuck::cast_slice(v).to_vec(),
            Data::F16(v) => bytemuck::cast_slice(v).to_vec(),
            Data::Bf16(v) => bytemuck::cast_slice(v).to_vec(),
        }
    }
}

/// A safetensors file read into memory, its header parsed and checked once.
pub struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
    /// Where the data section starts (after the length and the JSON header).
    data_start: usize,
    meta: Metadata,
}

/// One tensor of a file: its dtype, shape and raw little-endian bytes.
struct View<'a> {
    dtype: Dtype,
    shape: &'a [usize],
    data: &'a [u8],
}

impl TensorFile {
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes(path, bytes)
    }

    /// `path` only labels errors.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let format = |e: safetensors::SafeTensorError| Error::Format {
            path: path.to_owned(),
            msg: e.to_string(),
        };
        // `deserialize` checks every tensor's extent against the buffer; the owned header is kept.
        SafeTensors::deserialize(&bytes).map_err(format)?;
        let (header_len, meta) = SafeTensors::read_metadata(&bytes).map_err(format)?;
        Ok(TensorFile {
            path: path.to_owned(),
            data_start: 8 + header_len,
            bytes,
            meta,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> Vec<String> {
        self.meta.tensors().into_keys().collect()
    }

    /// The file's `__metadata__` entry `key`, if any.
    pub fn metadata(&self, key: &str) -> Option<String> {
        self.meta.metadata().as_ref()?.get(key).cloned()
    }

    fn view(&self, name: &str) -> Option<View<'_>> {
        let info = self.meta.info(name)?;
        let (begin, end) = info.data_offsets;
        Some(View {
            dtype: info.dtype,
            shape: &info.shape,
            data: &self.bytes[self.data_start + begin..self.data_start + end],
        })
    }

    /// A float tensor (f32, f16 or bf16), or None when absent.
    pub fn float(&self, name: &str) -> Result<Option<HostTensor>> {
        let Some(view) = self.view(name) else {
            return Ok(None);
        };
        let raw = view.data;
        let data = match view.dtype {
            Dtype::F32 => Data::F32(bytemuck::pod_collect_to_vec(raw)),
            Dtype::F16 => Data::F16(bytemuck::pod_collect_to_vec(raw)),
            Dtype::BF16 => Data::Bf16(bytemuck::pod_collect_to_vec(raw)),
            other => {
                return Err(Error::tensor(
                    name,
                    format!(
                        "in {}: dtype {other:?} is not supported (expected F32, F16 or BF16)",
                        self.path.display()
                    ),
                ))
            }
        };
        Ok(Some(HostTensor {
            shape: view.shape.to_vec(),
            data,
        }))
    }

    /// An f32 tensor of exactly `shape`, or None when absent.
    pub fn f32_exact(&self, name: &str, shape: &[usize]) -> Result<Option<Vec<f32>>> {
        let Some(view) = self.view(name) else {
            return Ok(None);
        };
        if view.dtype != Dtype::F32 {
            return Err(Error::tensor(
                name,
                format!(
                    "in {}: expected dtype F32, got {:?}",
                    self.path.display(),
                    view.dtype
                ),
            ));
        }
        if view.shape != shape {
            return Err(Error::tensor(
                name,
                format!(
                    "in {}: expected shape {shape:?}, got {:?}",
                    self.path.display(),
                    view.shape
                ),
            ));
        }
        Ok(Some(bytemuck::pod_collect_to_vec(view.data)))
    }

    /// The shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.view(name).map(|v| v.shape.to_vec())
    }

    /// A 1-D int32 tensor, or None when absent.
    pub fn i32_vector(&self, name: &str) -> Result<Option<Vec<i32>>> {
        let Some(view) = self.view(name) else {
            return Ok(None);
        };
        if view.dtype != Dtype::I32 || view.shape.len() != 1 {
            return Err(Error::tensor(
                name,
                format!(
                    "in {}: expected a 1-D I32 tensor, got {:?} of shape {:?}",
                    self.path.display(),
                    view.dtype,
                    view.shape
                ),
            ));
        }
        Ok(Some(bytemuck::pod_collect_to_vec(view.data)))
    }
}

/// A tensor ready to be written: its dtype, shape and little-endian bytes.
pub struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl From<&HostTensor> for Raw {
    fn from(t: &HostTensor) -> Self {
        Raw {
            dtype: t.dtype(),
            shape: t.shape.clone(),
            bytes: t.bytes(),
        }
    }
}

impl Raw {
    pub fn f32(shape: &[usize], data: &[f32]) -> Self {
        Raw {
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            bytes: bytemuck::cast_slice(data).to_vec(),
        }
    }

    pub fn i32(data: &[i32]) -> Self {
        Raw {
            dtype: Dtype::I32,
            shape: vec![data.len()],
            bytes: bytemuck::cast_slice(data).to_vec(),
        }
    }
}

/// Writes tensors to `path` through a temporary file in the same folder and a rename, so a
/// failure never leaves a partial file behind.
pub fn write_atomic(
    path: &Path,
    tensors: &[(String, Raw)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(n, t)| {
            TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::tensor(n.clone(), e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let serialized = safetensors::serialize(views, metadata).map_err(|e| Error::Format {
        path: path.to_owned(),
        msg: e.to_string(),
    })?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a file path", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = std::fs::write(&tmp, serialized).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

//! safetensors reading and writing shared by the weight loader, the input loader and the
//! output writer, plus the write-then-rename that keeps a failed run from leaving a file.

use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{MoeError, Result};
use crate::formats::decode::decode_row;
use crate::formats::WeightFormat;

/// A tensor read from a file: f32 values, row-major, and its shape.
#[derive(Clone, Debug, PartialEq)]
pub struct F32Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Parses the safetensors header; `origin` names the file in errors.
pub fn parse_safetensors<'a>(bytes: &'a [u8], origin: &str) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| MoeError::file(origin, format!("not a valid safetensors file: {e}")))
}

/// Reads one F32, F16 or BF16 tensor as f32, checking that every value is finite.
pub fn read_f32(view: &TensorView<'_>, name: &str) -> Result<F32Tensor> {
    let tensor = read_f32_values(view, name)?;
    if let Some(index) = tensor.data.iter().position(|v| !v.is_finite()) {
        return Err(MoeError::tensor(
            name,
            format!(
                "non-finite value {} at flat index {index}",
                tensor.data[index]
            ),
        ));
    }
    Ok(tensor)
}

/// The stored format of a safetensors dtype the layer reads (F32, F16, BF16), or an error
/// naming the tensor.
pub fn stored_format(view: &TensorView<'_>, name: &str) -> Result<WeightFormat> {
    match view.dtype() {
        Dtype::F32 => Ok(WeightFormat::F32),
        Dtype::F16 => Ok(WeightFormat::F16),
        Dtype::BF16 => Ok(WeightFormat::Bf16),
        other => Err(MoeError::tensor(
            name,
            format!("dtype {other:?}, expected F32, F16 or BF16"),
        )),
    }
}

/// Reads one F32, F16 or BF16 tensor as f32, checking only its dtype (the layer reports
/// non-finite inputs itself, naming the token).
pub fn read_f32_values(view: &TensorView<'_>, name: &str) -> Result<F32Tensor> {
    let format = stored_format(view, name)?;
    let mut data = vec![0.0; view.data().len() / format.block_bytes()];
    decode_row(format, view.data(), &mut data);
    Ok(F32Tensor {
        shape: view.shape().to_vec(),
        data,
    })
}

/// A tensor to write: its dtype, shape and little-endian bytes.
#[derive(Clone, Debug)]
pub struct OwnedTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl OwnedTensor {
    pub fn f32(shape: Vec<usize>, values: &[f32]) -> Self {
        OwnedTensor {
            dtype: Dtype::F32,
            shape,
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// A tensor of `format`'s stored bytes (F32, F16 or BF16; quantized formats have no
    /// safetensors dtype: an error naming `name`).
    pub fn stored(
        name: &str,
        shape: Vec<usize>,
        format: WeightFormat,
        bytes: Vec<u8>,
    ) -> Result<Self> {
        let dtype = match format {
            WeightFormat::F32 => Dtype::F32,
            WeightFormat::F16 => Dtype::F16,
            WeightFormat::Bf16 => Dtype::BF16,
            _ => {
                return Err(MoeError::tensor(
                    name,
                    format!("stored as {format}, which safetensors cannot hold (GGUF can)"),
                ))
            }
        };
        Ok(OwnedTensor {
            dtype,
            shape,
            bytes,
        })
    }

    pub fn i64(shape: Vec<usize>, values: impl IntoIterator<Item = i64>) -> Self {
        OwnedTensor {
            dtype: Dtype::I64,
            shape,
            bytes: values.into_iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// Serializes named tensors into safetensors bytes.
pub fn serialize_tensors(tensors: &BTreeMap<String, OwnedTensor>) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(name, t)| {
            TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                .map(|view| (name.as_str(), view))
                .map_err(|e| MoeError::tensor(name, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize(views, None)
        .map_err(|e| MoeError::tensor("<all>", format!("cannot serialize: {e}")))
}

/// Maps a weight file into memory: its pages are read as the loader touches them and are
/// not a copy on the heap, so loading a layer out of a large model file holds that layer's
/// tensors once (the loaders copy what they keep).
#[cfg(not(target_arch = "wasm32"))]
pub fn map_file(path: &std::path::Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| MoeError::file(path, e))?;
    // SAFETY: the map is read-only and lives only while a loader parses it; another
    // process truncating the file meanwhile is outside what a loader can guard against
    // (as for every mapped reader, safetensors' own included).
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| MoeError::file(path, e))
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename,
/// so that a failure never leaves a partial or stale-looking output behind.
#[cfg(not(target_arch = "wasm32"))]
pub fn write_file_atomically(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| MoeError::file(path, "the output path names no file"))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(file_name);
    temp_name.push(format!(".{}.tmp", std::process::id()));
    let temp_path = path.with_file_name(temp_name);
    let result = std::fs::write(&temp_path, bytes).and_then(|()| std::fs::rename(&temp_path, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&temp_path);
        return Err(MoeError::file(path, e));
    }
    Ok(())
}

//! Reading one layer's tensors out of a safetensors file: each by its name under the
//! layer's prefix, its shape checked against the dimensions read so far (both tensors named
//! when they disagree), its values checked finite, kept in the stored format; per-expert
//! tensors stacked in expert order.

use safetensors::tensor::SafeTensors;
use std::collections::BTreeSet;

use crate::error::{MoeError, Result};
use crate::formats::decode::check_finite;
use crate::formats::{ExpertMatrices, WeightFormat};
use crate::tensor_io::stored_format;

/// A tensor as a file stores it: shape, format and bytes.
pub(super) struct StoredTensor {
    pub(super) shape: Vec<usize>,
    pub(super) format: WeightFormat,
    pub(super) bytes: Vec<u8>,
}

/// Stacks per-expert tensors that must all share one stored format.
pub(super) struct ExpertStack {
    pub(super) format: Option<WeightFormat>,
    pub(super) bytes: Vec<u8>,
}

impl ExpertStack {
    pub(super) fn push(&mut self, name: &str, tensor: StoredTensor) -> Result<()> {
        match self.format {
            Some(format) if format != tensor.format => {
                return Err(MoeError::tensor(
                    name,
                    format!(
                        "stored as {}, but the experts before it as {format}",
                        tensor.format
                    ),
                ))
            }
            _ => self.format = Some(tensor.format),
        }
        self.bytes.extend(tensor.bytes);
        Ok(())
    }
}

/// Reads the tensors of one layer from a safetensors file, remembering which it used.
pub(super) struct TensorSource<'a> {
    pub(super) file: &'a SafeTensors<'a>,
    pub(super) prefix: &'a str,
    pub(super) used: BTreeSet<String>,
    /// Where the expected dimensions come from, for shape errors: both tensors are named
    /// when two disagree.
    pub(super) dims_from: String,
}

impl TensorSource<'_> {
    pub(super) fn full_name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The tensor `key` (prefix added) as stored, if present, with its shape checked.
    pub(super) fn stored(
        &mut self,
        key: &str,
        expected: &[usize],
        meaning: &str,
    ) -> Result<Option<StoredTensor>> {
        let name = self.full_name(key);
        let Ok(view) = self.file.tensor(&name) else {
            return Ok(None);
        };
        let format = stored_format(&view, &name)?;
        self.check_shape(&name, view.shape(), expected, meaning)?;
        // Non-finite values are named here, by the file's name for the tensor.
        match format {
            WeightFormat::F32 => {
                let values = view.data().chunks_exact(4);
                let bad = values
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .enumerate()
                    .find(|(_, v)| !v.is_finite());
                if let Some((index, value)) = bad {
                    return Err(MoeError::tensor(
                        &name,
                        format!("non-finite value {value} at flat index {index}"),
                    ));
                }
            }
            _ => check_finite(format, view.data(), &name)?,
        }
        self.used.insert(name);
        Ok(Some(StoredTensor {
            shape: view.shape().to_vec(),
            format,
            bytes: view.data().to_vec(),
        }))
    }

    /// The tensor `key` as f32 values, if present, checked for shape and finite values.
    pub(super) fn optional(
        &mut self,
        key: &str,
        expected: &[usize],
        meaning: &str,
    ) -> Result<Option<Vec<f32>>> {
        let Some(tensor) = self.stored(key, expected, meaning)? else {
            return Ok(None);
        };
        let name = self.full_name(key);
        let values = ExpertMatrices::from_stored(
            tensor.format,
            [1, 1, tensor.shape.iter().product()],
            tensor.bytes,
            &name,
        )?
        .to_f32();
        Ok(Some(values))
    }

    pub(super) fn required(
        &mut self,
        key: &str,
        expected: &[usize],
        meaning: &str,
    ) -> Result<Vec<f32>> {
        self.optional(key, expected, meaning)?
            .ok_or_else(|| MoeError::tensor(&self.full_name(key), "missing"))
    }

    /// A stacked expert tensor `key` of shape `[count, rows, cols]`, kept as stored.
    pub(super) fn experts(
        &mut self,
        key: &str,
        [count, rows, cols]: [usize; 3],
        meaning: &str,
    ) -> Result<Option<ExpertMatrices>> {
        let Some(tensor) = self.stored(key, &[count, rows, cols], meaning)? else {
            return Ok(None);
        };
        let name = self.full_name(key);
        ExpertMatrices::from_stored(tensor.format, [count, rows, cols], tensor.bytes, &name)
            .map(Some)
    }

    /// The bytes of the u8 tensor `key` (packed values such as MXFP4's), if present, with
    /// its shape checked.
    pub(super) fn packed_bytes(
        &mut self,
        key: &str,
        expected: &[usize],
        meaning: &str,
    ) -> Result<Option<Vec<u8>>> {
        let name = self.full_name(key);
        let Ok(view) = self.file.tensor(&name) else {
            return Ok(None);
        };
        if view.dtype() != safetensors::Dtype::U8 {
            return Err(MoeError::tensor(
                &name,
                format!("dtype {:?}, expected U8 (packed bytes)", view.dtype()),
            ));
        }
        self.check_shape(&name, view.shape(), expected, meaning)?;
        self.used.insert(name);
        Ok(Some(view.data().to_vec()))
    }

    /// An error naming tensor `name` (and where the expected dimensions come from) unless
    /// its `shape` is `expected`.
    fn check_shape(
        &self,
        name: &str,
        shape: &[usize],
        expected: &[usize],
        meaning: &str,
    ) -> Result<()> {
        if shape == expected {
            return Ok(());
        }
        Err(MoeError::tensor(
            name,
            format!(
                "shape {shape:?}, expected {meaning} = {expected:?} ({})",
                self.dims_from
            ),
        ))
    }

    /// The shape of `key` without reading it, or a "missing" error.
    pub(super) fn shape_of(&self, key: &str) -> Result<Vec<usize>> {
        let name = self.full_name(key);
        self.file
            .tensor(&name)
            .map(|view| view.shape().to_vec())
            .map_err(|_| MoeError::tensor(&name, "missing"))
    }

    /// One f32 vector of `len` values per expert (a bias), stacked in expert order: all
    /// present or all absent, like `per_expert`.
    pub(super) fn per_expert_vector(
        &mut self,
        num_experts: usize,
        key: impl Fn(usize) -> String,
        len: usize,
    ) -> Result<Option<Vec<f32>>> {
        let mut stacked = Vec::new();
        let mut missing = None;
        for expert in 0..num_experts {
            match self.optional(&key(expert), &[len], "[len]")? {
                Some(values) => stacked.extend(values),
                None => {
                    missing.get_or_insert(expert);
                }
            }
        }
        match missing {
            None => Ok(Some(stacked)),
            Some(_) if stacked.is_empty() => Ok(None),
            Some(expert) => Err(MoeError::tensor(
                &self.full_name(&key(expert)),
                "missing (other experts have it)",
            )),
        }
    }

    /// One `[rows, cols]` tensor per expert, `key(i)` for i in 0..N, stacked in expert
    /// order and kept as stored: all present, or all absent (`None`); a partial set is an
    /// error naming the first missing one.
    pub(super) fn per_expert(
        &mut self,
        num_experts: usize,
        key: impl Fn(usize) -> String,
        [rows, cols]: [usize; 2],
        meaning: &str,
    ) -> Result<Option<ExpertMatrices>> {
        let mut stack = ExpertStack {
            format: None,
            bytes: Vec::new(),
        };
        let mut missing = None;
        for expert in 0..num_experts {
            match self.stored(&key(expert), &[rows, cols], meaning)? {
                Some(tensor) => stack.push(&self.full_name(&key(expert)), tensor)?,
                None => {
                    missing.get_or_insert(expert);
                }
            }
        }
        match (missing, stack.format) {
            (None, Some(format)) => {
                let name = self.full_name(&key(0));
                let shape = [num_experts, rows, cols];
                ExpertMatrices::from_stored(format, shape, stack.bytes, &name).map(Some)
            }
            (_, None) => Ok(None),
            (Some(expert), Some(_)) => Err(MoeError::tensor(
                &self.full_name(&key(expert)),
                "missing (other experts have it)",
            )),
        }
    }
}

/// The shape `[a, b]` of a rank-2 tensor, or an error naming it.
pub(super) fn rank2(name: &str, shape: &[usize], meaning: &str) -> Result<(usize, usize)> {
    match shape {
        [a, b] => Ok((*a, *b)),
        _ => Err(MoeError::tensor(
            name,
            format!("shape {shape:?}, expected rank 2 ({meaning})"),
        )),
    }
}

/// The shape `[a, b, c]` of a rank-3 tensor, or an error naming it.
pub(super) fn rank3(name: &str, shape: &[usize], meaning: &str) -> Result<(usize, usize, usize)> {
    match shape {
        [a, b, c] => Ok((*a, *b, *c)),
        _ => Err(MoeError::tensor(
            name,
            format!("shape {shape:?}, expected rank 3 ({meaning})"),
        )),
    }
}

//! Stored weight formats: the element types checkpoints keep expert weights in (f32, f16,
//! bf16), llama.cpp's block quantizations (Q8_0, Q4_0, Q4_K, Q6_K) and MXFP4 (gpt-oss), and
//! [`ExpertMatrices`], a stack of expert matrices kept in its stored format.
//!
//! Quantized rows are sequences of ggml blocks, byte for byte as in a GGUF file; a block
//! covers `block_values` consecutive values of one row, so a row's length must be a whole
//! number of blocks. [`decode`] turns blocks into f32 exactly as ggml's
//! `dequantize_row_*` does (the CPU twin of `shaders/expert_matmul.wgsl`), [`quantize`]
//! makes them as ggml's reference quantizers do.

pub mod decode;
pub mod quantize;

use std::fmt;
use std::str::FromStr;

use crate::error::{MoeError, Result};

/// How a weight tensor's values are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WeightFormat {
    F32,
    F16,
    Bf16,
    /// 32 values: an f16 scale `d`, 32 × i8; value = `q·d`.
    Q8_0,
    /// 32 values: an f16 scale `d`, 16 bytes of nibbles; value = `(q − 8)·d`.
    Q4_0,
    /// 256 values: f16 `d` and `dmin`, 8 sub-blocks of 32 with 6-bit scale and min,
    /// nibbles; value = `d·sc·q − dmin·m`.
    Q4K,
    /// 256 values: 4 low and 2 high bits per value, 16 i8 scales (one per 16 values),
    /// an f16 `d`; value = `d·sc·(q − 32)`.
    Q6K,
    /// 32 values (OCP microscaling, gpt-oss's experts): an E8M0 exponent byte `e`, 16 bytes
    /// of E2M1 nibbles; value = `kv[q]·2^(e − 128)` with ggml's doubled E2M1 table
    /// `kv = 0, 1, 2, 3, 4, 6, 8, 12` (and their negatives for q ≥ 8).
    Mxfp4,
}

impl WeightFormat {
    /// Every format, in the order of `ALL_NAMES`.
    pub const ALL: [WeightFormat; 8] = [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::Bf16,
        WeightFormat::Q8_0,
        WeightFormat::Q4_0,
        WeightFormat::Q4K,
        WeightFormat::Q6K,
        WeightFormat::Mxfp4,
    ];

    /// The lower-case name used on command lines (`q4_k`).
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q4_0 => "q4_0",
            WeightFormat::Q4K => "q4_k",
            WeightFormat::Q6K => "q6_k",
            WeightFormat::Mxfp4 => "mxfp4",
        }
    }

    /// The code `shaders/expert_matmul.wgsl` knows the format by (its place in `ALL`).
    pub fn shader_code(self) -> u32 {
        Self::ALL.iter().position(|&f| f == self).unwrap_or(0) as u32
    }

    /// ggml's type id (GGUF's tensor type).
    pub fn ggml_type(self) -> u32 {
        match self {
            WeightFormat::F32 => 0,
            WeightFormat::F16 => 1,
            WeightFormat::Q4_0 => 2,
            WeightFormat::Q8_0 => 8,
            WeightFormat::Q4K => 12,
            WeightFormat::Q6K => 14,
            WeightFormat::Bf16 => 30,
            WeightFormat::Mxfp4 => 39,
        }
    }

    /// The format of a ggml type id, if it is one of ours.
    pub fn from_ggml_type(type_id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.ggml_type() == type_id)
    }

    /// Values per block (1 for the element types).
    pub fn block_values(self) -> usize {
        match self {
            WeightFormat::F32 | WeightFormat::F16 | WeightFormat::Bf16 => 1,
            WeightFormat::Q8_0 | WeightFormat::Q4_0 | WeightFormat::Mxfp4 => 32,
            WeightFormat::Q4K | WeightFormat::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            WeightFormat::F32 => 4,
            WeightFormat::F16 | WeightFormat::Bf16 => 2,
            WeightFormat::Q8_0 => 34,
            WeightFormat::Q4_0 => 18,
            WeightFormat::Q4K => 144,
            WeightFormat::Q6K => 210,
            WeightFormat::Mxfp4 => 17,
        }
    }

    /// True for the block quantizations.
    pub fn is_quantized(self) -> bool {
        self.block_values() > 1
    }

    /// Bytes of a row of `values` values, or an error naming `tensor` when the row is not
    /// a whole number of blocks.
    pub fn row_bytes(self, values: usize, tensor: &str) -> Result<usize> {
        let block = self.block_values();
        if !values.is_multiple_of(block) {
            return Err(MoeError::tensor(
                tensor,
                format!(
                    "rows of {values} values are not a whole number of {} blocks of {block}",
                    self.name().to_uppercase()
                ),
            ));
        }
        Ok(values / block * self.block_bytes())
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WeightFormat {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let lower = text.to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|f| f.name() == lower)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|f| f.name()).collect();
                format!(
                    "unknown weight format `{text}` (one of {})",
                    names.join(", ")
                )
            })
    }
}

/// Threads for host-side conversions: the machine's cores (one in a browser).
fn worker_threads() -> usize {
    if cfg!(target_arch = "wasm32") {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// How the values are held: f32 as numbers, every other format as its stored bytes.
#[derive(Clone, Debug, PartialEq)]
enum Values {
    F32(Vec<f32>),
    Stored(Vec<u8>),
}

/// A stack of `count` matrices of `rows × cols` values (experts first, `nn.Linear`'s
/// `[out, in]` each), every row stored in `format`.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertMatrices {
    pub format: WeightFormat,
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    values: Values,
}

impl ExpertMatrices {
    /// f32 matrices `[count, rows, cols]`; `values.len()` must be their product (checked by
    /// `MoeWeights::check`).
    pub fn from_f32(count: usize, rows: usize, cols: usize, values: Vec<f32>) -> Self {
        ExpertMatrices {
            format: WeightFormat::F32,
            count,
            rows,
            cols,
            values: Values::F32(values),
        }
    }

    /// Matrices stored as `bytes` in `format`, checked for length and whole blocks and,
    /// for every format but f32 (whose values `MoeWeights::check` scans), for finite
    /// values. `tensor` names them in errors.
    pub fn from_stored(
        format: WeightFormat,
        [count, rows, cols]: [usize; 3],
        bytes: Vec<u8>,
        tensor: &str,
    ) -> Result<Self> {
        let row_bytes = format.row_bytes(cols, tensor)?;
        let expected = count
            .checked_mul(rows)
            .and_then(|r| r.checked_mul(row_bytes))
            .ok_or_else(|| MoeError::tensor(tensor, "shape too large"))?;
        if bytes.len() != expected {
            return Err(MoeError::tensor(
                tensor,
                format!(
                    "{} bytes, expected {expected} for [{count}, {rows}, {cols}] in {format}",
                    bytes.len()
                ),
            ));
        }
        if format == WeightFormat::F32 {
            let values = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            return Ok(Self::from_f32(count, rows, cols, values));
        }
        decode::check_finite(format, &bytes, tensor)?;
        Ok(ExpertMatrices {
            format,
            count,
            rows,
            cols,
            values: Values::Stored(bytes),
        })
    }

    /// The f32 values when the format is f32.
    pub fn f32_values(&self) -> Option<&[f32]> {
        match &self.values {
            Values::F32(values) => Some(values),
            Values::Stored(_) => None,
        }
    }

    /// Values held (`count · rows · cols` when consistent).
    pub fn len(&self) -> usize {
        match &self.values {
            Values::F32(values) => values.len(),
            Values::Stored(bytes) => {
                bytes.len() / self.format.block_bytes() * self.format.block_values()
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the values as stored.
    pub fn stored_bytes(&self) -> usize {
        match &self.values {
            Values::F32(values) => 4 * values.len(),
            Values::Stored(bytes) => bytes.len(),
        }
    }

    /// The stored bytes of row `row` of matrix `matrix` (f32 as little-endian bytes).
    pub fn row_stored(&self, matrix: usize, row: usize) -> std::borrow::Cow<'_, [u8]> {
        let index = matrix * self.rows + row;
        match &self.values {
            Values::F32(values) => std::borrow::Cow::Owned(
                values[index * self.cols..(index + 1) * self.cols]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            Values::Stored(bytes) => {
                let row_bytes = self.cols / self.format.block_values() * self.format.block_bytes();
                std::borrow::Cow::Borrowed(&bytes[index * row_bytes..(index + 1) * row_bytes])
            }
        }
    }

    /// The stored bytes of every matrix (f32 as little-endian bytes).
    pub fn stored_vec(&self) -> Vec<u8> {
        match &self.values {
            Values::F32(values) => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Values::Stored(bytes) => bytes.clone(),
        }
    }

    /// Splits every matrix after its first `rows` rows: `[count, rows, cols]` and
    /// `[count, self.rows − rows, cols]` (Mixtral's stacked gate and up projections).
    pub fn split_rows(&self, rows: usize, tensor: &str) -> Result<(Self, Self)> {
        let row_bytes = self.format.row_bytes(self.cols, tensor)?;
        if row_bytes == 0 || self.rows == 0 || rows > self.rows {
            return Err(MoeError::tensor(tensor, "no rows to split"));
        }
        let (mut first, mut rest) = (Vec::new(), Vec::new());
        let (front, back) = (rows * row_bytes, (self.rows - rows) * row_bytes);
        let bytes = self.stored_vec();
        for matrix in bytes.chunks_exact(front + back) {
            first.extend_from_slice(&matrix[..front]);
            rest.extend_from_slice(&matrix[front..]);
        }
        Ok((
            Self::from_stored(self.format, [self.count, rows, self.cols], first, tensor)?,
            Self::from_stored(
                self.format,
                [self.count, self.rows - rows, self.cols],
                rest,
                tensor,
            )?,
        ))
    }

    /// Matrix `matrix` decoded to f32, `[rows, cols]`.
    pub fn matrix_f32(&self, matrix: usize) -> std::borrow::Cow<'_, [f32]> {
        let size = self.rows * self.cols;
        match &self.values {
            Values::F32(values) => {
                std::borrow::Cow::Borrowed(&values[matrix * size..(matrix + 1) * size])
            }
            Values::Stored(_) => {
                let mut out = vec![0.0; size];
                for (row, values) in out.chunks_exact_mut(self.cols).enumerate() {
                    decode::decode_row(self.format, &self.row_stored(matrix, row), values);
                }
                std::borrow::Cow::Owned(out)
            }
        }
    }

    /// Every matrix decoded to f32, `[count, rows, cols]`.
    pub fn to_f32(&self) -> Vec<f32> {
        (0..self.count)
            .flat_map(|m| self.matrix_f32(m).into_owned())
            .collect()
    }

    /// The same matrices in `format`: f32, f16 and bf16 convert to any format (rounding to
    /// nearest, quantizing as ggml's reference quantizers do); quantized matrices convert
    /// only to themselves, since requantizing would round twice. `tensor` names them.
    pub fn convert(&self, format: WeightFormat, tensor: &str) -> Result<Self> {
        if format == self.format {
            return Ok(self.clone());
        }
        if self.format.is_quantized() {
            return Err(MoeError::tensor(
                tensor,
                format!(
                    "stored as {}, which cannot be converted to {format} (only f32, f16 and \
                     bf16 weights are quantized on load)",
                    self.format
                ),
            ));
        }
        let row_bytes = format.row_bytes(self.cols, tensor)?;
        if format == WeightFormat::F32 {
            return Ok(Self::from_f32(
                self.count,
                self.rows,
                self.cols,
                self.to_f32(),
            ));
        }
        let rows = self.count * self.rows;
        let mut bytes = vec![0u8; rows * row_bytes];
        if bytes.is_empty() {
            return Self::from_stored(format, [self.count, self.rows, self.cols], bytes, tensor);
        }
        // Rows encode independently, so threads take contiguous runs of them: the bytes
        // are the same for any number of threads (a Mixtral layer's 940M values quantize
        // in about a minute per core to Q4_K).
        let threads = worker_threads().min(rows).max(1);
        let rows_per_thread = rows.div_ceil(threads).max(1);
        let encode = |first_row: usize, out: &mut [u8]| {
            let mut values = vec![0.0; self.cols];
            let mut encoded = Vec::with_capacity(row_bytes);
            for (i, out_row) in out.chunks_exact_mut(row_bytes).enumerate() {
                let index = first_row + i;
                let stored = self.row_stored(index / self.rows, index % self.rows);
                decode::decode_row(self.format, &stored, &mut values);
                encoded.clear();
                quantize::encode_row(format, &values, &mut encoded);
                out_row.copy_from_slice(&encoded);
            }
        };
        if threads == 1 {
            encode(0, &mut bytes);
        } else {
            std::thread::scope(|scope| {
                for (chunk, out) in bytes.chunks_mut(rows_per_thread * row_bytes).enumerate() {
                    let encode = &encode;
                    scope.spawn(move || encode(chunk * rows_per_thread, out));
                }
            });
        }
        Self::from_stored(format, [self.count, self.rows, self.cols], bytes, tensor)
    }
}

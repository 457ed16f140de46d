//! A bounded, panic-free reader of llama.cpp's GGUF container (versions 2 and 3).
//!
//! It reads the header, the metadata key/value pairs and the tensor infos, and hands back
//! each tensor's bytes as a slice of the input, with its ggml type id and dimensions. It
//! does not dequantize: [`ggml_block_size`] says how many values and bytes a block of each
//! type holds, and that is all it knows about the types.
//!
//! GGUF files are downloaded from strangers, so the reader is bounded: every count and
//! length the file claims is checked against the bytes actually there before anything is
//! allocated or looped over, all arithmetic is checked, arrays nest at most
//! [`MAX_ARRAY_DEPTH`] deep, and work is linear in the file's size. Any malformed input is a
//! one-line [`MoeError`] naming the file (and the tensor where one is at fault), never a
//! panic, a hang or an allocation the file merely asks for.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{MoeError, Result};

/// The alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// How deep metadata arrays of arrays may nest.
pub const MAX_ARRAY_DEPTH: u32 = 8;
/// The fewest bytes one metadata entry takes: key length, value type, a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// The fewest bytes one tensor info takes: name length, n_dims, one dim, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// (type id, name, values per block, bytes per block), from ggml's `type_traits` in ggml.c.
const GGML_TYPES: [(u32, &str, u64, u64); 32] = [
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

/// ggml's name of a type id ("Q4_K"), or None for an id not in the table.
pub fn ggml_type_name(type_id: u32) -> Option<&'static str> {
    GGML_TYPES.iter().find(|t| t.0 == type_id).map(|t| t.1)
}

/// (values per block, bytes per block) of a type id, None if unknown.
pub fn ggml_block_size(type_id: u32) -> Option<(u64, u64)> {
    GGML_TYPES
        .iter()
        .find(|t| t.0 == type_id)
        .map(|t| (t.2, t.3))
}

/// A parsed GGUF file: its metadata, and its tensors as slices of the input bytes.
#[derive(Debug, Clone)]
pub struct GgufFile<'a> {
    /// The container version, 2 or 3.
    pub version: u32,
    /// The alignment of tensor data: `general.alignment`, or [`DEFAULT_ALIGNMENT`].
    pub alignment: u64,
    /// The metadata key/value pairs, by key.
    pub metadata: BTreeMap<String, GgufValue>,
    /// The tensors, in the order of their infos in the file.
    pub tensors: Vec<GgufTensor<'a>>,
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Value type 0.
    U8(u8),
    /// Value type 1.
    I8(i8),
    /// Value type 2.
    U16(u16),
    /// Value type 3.
    I16(i16),
    /// Value type 4.
    U32(u32),
    /// Value type 5.
    I32(i32),
    /// Value type 6.
    F32(f32),
    /// Value type 7: one byte, 0 or 1.
    Bool(bool),
    /// Value type 8: a u64 length and UTF-8 bytes.
    Str(String),
    /// Value type 10.
    U64(u64),
    /// Value type 11.
    I64(i64),
    /// Value type 12.
    F64(f64),
    /// Value type 9. Arrays are validated and skipped, only their element type id and
    /// length kept (tokenizer vocabularies are large and unused here).
    Array {
        /// The value type of the elements.
        element_type: u32,
        /// The number of elements.
        len: u64,
    },
}

impl GgufValue {
    /// The value of any non-negative integer kind, None otherwise.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value of any numeric kind as f64, None otherwise.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value of a bool, None otherwise.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The string of a string value, None otherwise.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor<'a> {
    /// The tensor's name.
    pub name: String,
    /// ggml's ne: dimensions innermost first (a [N, F, D] tensor is stored with dims = [D, F, N]).
    pub dims: Vec<u64>,
    /// The ggml type id (see [`ggml_type_name`]).
    pub type_id: u32,
    /// The tensor's bytes inside the file.
    pub data: &'a [u8],
}

/// A cursor over the input whose reads fail, with a message, rather than run past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        self.bytes.len().saturating_sub(self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], String> {
        let rest = self.bytes.get(self.pos..).unwrap_or_default();
        match usize::try_from(n).ok().and_then(|n| rest.get(..n)) {
            Some(slice) => {
                self.pos += slice.len();
                Ok(slice)
            }
            None => Err(format!(
                "truncated: {what} at byte {} needs {n} bytes, only {} remain",
                self.pos,
                rest.len()
            )),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let slice = self.take(N as u64, what)?;
        <[u8; N]>::try_from(slice).map_err(|_| format!("{what}: short read"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u64(&format!("length of {what}"))?;
        let start = self.pos;
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(format!("{what} at byte {start} is not valid UTF-8 ({e})")),
        }
    }
}

/// Reads one value of value type `ty`; `depth` counts the arrays it sits in.
fn read_value(r: &mut Reader<'_>, ty: u32, depth: u32) -> Result<GgufValue, String> {
    Ok(match ty {
        0 => GgufValue::U8(u8::from_le_bytes(r.array("u8 value")?)),
        1 => GgufValue::I8(i8::from_le_bytes(r.array("i8 value")?)),
        2 => GgufValue::U16(u16::from_le_bytes(r.array("u16 value")?)),
        3 => GgufValue::I16(i16::from_le_bytes(r.array("i16 value")?)),
        4 => GgufValue::U32(r.u32("u32 value")?),
        5 => GgufValue::I32(i32::from_le_bytes(r.array("i32 value")?)),
        6 => GgufValue::F32(f32::from_le_bytes(r.array("f32 value")?)),
        7 => match r.array::<1>("bool value")? {
            [0] => GgufValue::Bool(false),
            [1] => GgufValue::Bool(true),
            [b] => {
                return Err(format!(
                    "bool value {b} before byte {} is not 0 or 1",
                    r.pos
                ))
            }
        },
        8 => GgufValue::Str(r.string("string value")?),
        9 if depth >= MAX_ARRAY_DEPTH => {
            return Err(format!("arrays nest deeper than {MAX_ARRAY_DEPTH} levels"))
        }
        9 => {
            let element_type = r.u32("array element type")?;
            let len = r.u64("array length")?;
            skip_array(r, element_type, len, depth + 1)?;
            GgufValue::Array { element_type, len }
        }
        10 => GgufValue::U64(r.u64("u64 value")?),
        11 => GgufValue::I64(i64::from_le_bytes(r.array("i64 value")?)),
        12 => GgufValue::F64(f64::from_le_bytes(r.array("f64 value")?)),
        other => return Err(format!("unknown value type {other}")),
    })
}

/// Validates and steps over the `len` elements of an array of `element_type`.
fn skip_array(r: &mut Reader<'_>, element_type: u32, len: u64, depth: u32) -> Result<(), String> {
    let fixed = match element_type {
        0 | 1 => Some(1u64),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    };
    if let Some(size) = fixed {
        let n = len
            .checked_mul(size)
            .ok_or_else(|| format!("array of {len} elements of {size} bytes overflows"))?;
        r.take(n, "array elements").map(|_| ())
    } else if element_type == 7 {
        let start = r.pos;
        match r.take(len, "bool array")?.iter().position(|&b| b > 1) {
            Some(i) => Err(format!(
                "bool array element at byte {} is not 0 or 1",
                start + i
            )),
            None => Ok(()),
        }
    } else if element_type == 8 || element_type == 9 {
        // Strings and arrays take at least 8 bytes each: fail now, not after a long loop.
        if len > r.remaining() / 8 {
            return Err(format!(
                "truncated: array of {len} elements at byte {} has only {} bytes left",
                r.pos,
                r.remaining()
            ));
        }
        (0..len).try_for_each(|_| read_value(r, element_type, depth).map(|_| ()))
    } else {
        Err(format!("unknown array element type {element_type}"))
    }
}

/// A tensor info, read and checked, before its data is located.
struct TensorInfo {
    dims: Vec<u64>,
    type_id: u32,
    offset: u64,
    nbytes: u64,
}

/// Reads the rest of one tensor info (after its name) and checks its shape, type and offset.
fn read_tensor_info(r: &mut Reader<'_>, alignment: u64) -> Result<TensorInfo, String> {
    let n_dims = r.u32("dimension count")?;
    if !(1..=4).contains(&n_dims) {
        return Err(format!("{n_dims} dimensions; a GGUF tensor has 1 to 4"));
    }
    let mut dims = Vec::new();
    for d in 0..n_dims {
        match r.u64("dimension")? {
            0 => return Err(format!("dimension {d} is 0")),
            n => dims.push(n),
        }
    }
    let type_id = r.u32("type id")?;
    let offset = r.u64("data offset")?;
    let (Some(type_name), Some((block_values, block_bytes))) =
        (ggml_type_name(type_id), ggml_block_size(type_id))
    else {
        return Err(format!(
            "type id {type_id} is not a ggml type this reader knows"
        ));
    };
    let elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("dimensions {dims:?} overflow 64 bits"))?;
    let row = dims.first().copied().unwrap_or(1);
    if !row.is_multiple_of(block_values) {
        return Err(format!(
            "row of {row} values is not a whole number of {type_name} blocks of {block_values}"
        ));
    }
    let nbytes = (elements / block_values)
        .checked_mul(block_bytes)
        .ok_or_else(|| format!("dimensions {dims:?} of {type_name} overflow 64 bits of bytes"))?;
    if !offset.is_multiple_of(alignment) {
        return Err(format!(
            "data offset {offset} is not a multiple of the alignment {alignment} (misaligned data)"
        ));
    }
    Ok(TensorInfo {
        dims,
        type_id,
        offset,
        nbytes,
    })
}

impl<'a> GgufFile<'a> {
    /// Parses a GGUF file held in `bytes`. `origin` names the bytes in errors (a path).
    ///
    /// # Errors
    ///
    /// [`MoeError::File`] for a problem with the container (magic, version, counts, metadata,
    /// truncation), [`MoeError::Tensor`] for a problem with one tensor's info or data, its
    /// message naming `origin`.
    pub fn parse(bytes: &'a [u8], origin: &str) -> Result<Self> {
        let file_err = |m: String| MoeError::file(origin, m);
        let tensor_err =
            |name: &str, m: String| MoeError::tensor(name, format!("in `{origin}`: {m}"));
        let mut r = Reader { bytes, pos: 0 };

        let magic = r.take(4, "magic").map_err(file_err)?;
        if magic != b"GGUF" {
            let shown = magic.escape_ascii();
            return Err(file_err(format!(
                "not a GGUF file: it starts with `{shown}`, not `GGUF`"
            )));
        }
        let version = r.u32("version").map_err(file_err)?;
        if version != 2 && version != 3 {
            // A big-endian file's version reads as 0x0N000000 here.
            let hint = if version != 0 && version & 0xFFFF == 0 {
                "; is it big-endian?"
            } else {
                ""
            };
            return Err(file_err(format!(
                "GGUF version {version} is not supported (only 2 and 3){hint}"
            )));
        }
        let tensor_count = r.u64("tensor count").map_err(file_err)?;
        let kv_count = r.u64("metadata count").map_err(file_err)?;

        if kv_count > r.remaining() / MIN_KV_BYTES {
            let left = r.remaining();
            return Err(file_err(format!(
                "header claims {kv_count} metadata entries but only {left} bytes follow"
            )));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = r.string(&format!("metadata key {i}")).map_err(file_err)?;
            let kv_err = |m: String| file_err(format!("metadata key `{key}`: {m}"));
            if metadata.contains_key(&key) {
                return Err(kv_err("duplicate key".into()));
            }
            let ty = r.u32("value type").map_err(kv_err)?;
            let value = read_value(&mut r, ty, 0).map_err(kv_err)?;
            metadata.insert(key, value);
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(GgufValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
            Some(other) => {
                return Err(file_err(format!(
                    "`general.alignment` is {other:?}; it must be a u32 power of two"
                )))
            }
        };

        if tensor_count > r.remaining() / MIN_TENSOR_INFO_BYTES {
            let left = r.remaining();
            return Err(file_err(format!(
                "header claims {tensor_count} tensors but only {left} bytes follow"
            )));
        }
        let mut infos = Vec::new();
        let mut names = BTreeSet::new();
        for i in 0..tensor_count {
            let name = r.string(&format!("name of tensor {i}")).map_err(file_err)?;
            if !names.insert(name.clone()) {
                return Err(tensor_err(&name, "duplicate tensor name".into()));
            }
            let info = read_tensor_info(&mut r, alignment).map_err(|m| tensor_err(&name, m))?;
            infos.push((name, info));
        }

        // The data section starts at the first multiple of the alignment after the infos.
        let pos = r.pos as u64;
        let data_start = pos
            .checked_add((alignment - pos % alignment) % alignment)
            .ok_or_else(|| file_err(format!("data section after byte {pos} overflows")))?;
        let file_len = bytes.len() as u64;
        let mut spans = Vec::new();
        let mut tensors = Vec::new();
        for (name, info) in infos {
            let start = data_start.checked_add(info.offset);
            let end = start.and_then(|s| s.checked_add(info.nbytes));
            let range = start.zip(end).filter(|&(_, e)| e <= file_len);
            let data = range
                .and_then(|(s, e)| bytes.get(usize::try_from(s).ok()?..usize::try_from(e).ok()?));
            let (Some((s, e)), Some(data)) = (range, data) else {
                return Err(tensor_err(&name, format!(
                    "offset {} + {} bytes (data section at byte {data_start}) runs past the end of the file ({file_len} bytes)",
                    info.offset, info.nbytes
                )));
            };
            spans.push((s, e, tensors.len()));
            tensors.push(GgufTensor {
                name,
                dims: info.dims,
                type_id: info.type_id,
                data,
            });
        }

        spans.sort_unstable();
        for pair in spans.windows(2) {
            if let [(s0, e0, i0), (s1, e1, i1)] = *pair {
                if e0 > s1 {
                    let (Some(a), Some(b)) = (tensors.get(i0), tensors.get(i1)) else {
                        continue;
                    };
                    return Err(tensor_err(
                        &b.name,
                        format!(
                            "its data (bytes {s1}..{e1}) overlaps tensor `{}`'s (bytes {s0}..{e0})",
                            a.name
                        ),
                    ));
                }
            }
        }

        Ok(GgufFile {
            version,
            alignment,
            metadata,
            tensors,
        })
    }

    /// The tensor named `name`, if the file has one.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor<'a>> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

#[cfg(test)]
mod tests;

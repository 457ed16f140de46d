//! Third-party fixtures from llama.cpp's own Python package `gguf` (gguf-py; made by
//! tests/fixtures/make_gguf_fixtures.sh into tests/fixtures/gguf/):
//!
//! - the CPU decoders (`decode_row`) give gguf-py's `dequantize` values bit for bit for
//!   f16, bf16, Q8_0, Q4_0, Q4_K and Q6_K, on ordinary, all-zero, all-negative, huge,
//!   subnormal and rounding-tie inputs, and on K-quant blocks of random bytes with finite
//!   (subnormal, negative, zero, largest) f16 scales;
//! - the quantizers (`encode_row`) give gguf-py's `quantize` bytes byte for byte for the
//!   types gguf-py can quantize (f16, bf16, Q8_0, Q4_0; it has no Q4_K/Q6_K quantizer);
//! - `GgufFile::parse` reads a two-layer MoE file written by gguf-py's `GGUFWriter`: its
//!   metadata, every tensor's ggml type and dims (innermost first), and rows of experts 0
//!   and 3 that decode to gguf-py's values bit for bit.

use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use switch_moe::formats::decode::decode_row;
use switch_moe::formats::quantize::encode_row;
use switch_moe::gguf::GgufFile;
use switch_moe::WeightFormat;

/// The decoder fixture's types: its tensor-name prefix and the crate's format.
const TYPES: [(&str, WeightFormat); 6] = [
    ("f16", WeightFormat::F16),
    ("bf16", WeightFormat::Bf16),
    ("q8_0", WeightFormat::Q8_0),
    ("q4_0", WeightFormat::Q4_0),
    ("q4_k", WeightFormat::Q4K),
    ("q6_k", WeightFormat::Q6K),
];

fn read_fixture(file: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A 2-D U8 tensor: its bytes and [rows, cols].
fn u8_matrix<'a>(file: &'a SafeTensors<'_>, name: &str) -> (&'a [u8], [usize; 2]) {
    let view = file.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(view.dtype(), Dtype::U8, "{name}");
    let &[rows, cols] = view.shape() else {
        panic!("{name}: shape {:?}, expected 2-D", view.shape())
    };
    (view.data(), [rows, cols])
}

/// An F32 tensor, flattened, and its shape.
fn f32_tensor(file: &SafeTensors<'_>, name: &str) -> (Vec<f32>, Vec<usize>) {
    let view = file.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(view.dtype(), Dtype::F32, "{name}");
    let values = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (values, view.shape().to_vec())
}

/// The first index where `got` and `want` differ in their bits, with both values, as a
/// message; None when they are bit-identical.
fn bit_mismatch(got: &[f32], want: &[f32]) -> Option<String> {
    assert_eq!(got.len(), want.len());
    let c = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits())?;
    let count = (0..got.len())
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .count();
    Some(format!(
        "column {c}: got {} ({:#010x}), gguf-py {} ({:#010x}); {count} columns differ",
        got[c],
        got[c].to_bits(),
        want[c],
        want[c].to_bits()
    ))
}

#[test]
fn decoders_match_gguf_py_bit_for_bit() {
    let bytes = read_fixture("decoders.safetensors");
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut failures = Vec::new();
    for (name, format) in TYPES {
        let (blocks, [rows, row_bytes]) = u8_matrix(&file, &format!("{name}.blocks"));
        let (values, shape) = f32_tensor(&file, &format!("{name}.values"));
        assert_eq!(shape.len(), 2, "{name}.values");
        assert_eq!(shape[0], rows, "{name}: rows of blocks and values");
        let cols = shape[1];
        assert_eq!(format.row_bytes(cols, name).unwrap(), row_bytes, "{name}");
        let mut out = vec![f32::NAN; cols];
        for row in 0..rows {
            decode_row(
                format,
                &blocks[row * row_bytes..(row + 1) * row_bytes],
                &mut out,
            );
            if let Some(m) = bit_mismatch(&out, &values[row * cols..(row + 1) * cols]) {
                failures.push(format!("{name} row {row} {m}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn quantizers_match_gguf_py_byte_for_byte() {
    let bytes = read_fixture("decoders.safetensors");
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut checked = Vec::new();
    let mut failures = Vec::new();
    for (name, format) in TYPES {
        if file.tensor(&format!("{name}.source")).is_err() {
            continue;
        }
        checked.push(name);
        let (source, shape) = f32_tensor(&file, &format!("{name}.source"));
        let (blocks, [rows, row_bytes]) = u8_matrix(&file, &format!("{name}.blocks"));
        assert_eq!(shape, [rows, shape[1]], "{name}.source");
        let cols = shape[1];
        for row in 0..rows {
            let mut out = Vec::new();
            encode_row(format, &source[row * cols..(row + 1) * cols], &mut out);
            let want = &blocks[row * row_bytes..(row + 1) * row_bytes];
            assert_eq!(out.len(), row_bytes, "{name} row {row}");
            let Some(at) = (0..row_bytes).find(|&i| out[i] != want[i]) else {
                continue;
            };
            let count = (0..row_bytes).filter(|&i| out[i] != want[i]).count();
            let block_bytes = format.block_bytes();
            let block = at / block_bytes;
            let first = block * format.block_values();
            let inputs =
                &source[row * cols..(row + 1) * cols][first..first + format.block_values()];
            failures.push(format!(
                "{name} row {row}: byte {at} (block {block}, byte {} of it) is {:#04x}, gguf-py \
                 {:#04x}; {count} bytes differ; the block's input: {inputs:?}",
                at % block_bytes,
                out[at],
                want[at],
            ));
        }
    }
    // gguf-py 0.19 quantizes these four; a regenerated fixture with fewer would test less.
    assert_eq!(checked, ["f16", "bf16", "q8_0", "q4_0"]);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn gguf_file_from_gguf_py() {
    const N: usize = 4;
    const D: usize = 256;
    let bytes = read_fixture("moe_layer.gguf");
    let gguf = GgufFile::parse(&bytes, "moe_layer.gguf").unwrap();
    let expected_bytes = read_fixture("moe_layer_expected.safetensors");
    let expected = SafeTensors::deserialize(&expected_bytes).unwrap();

    assert_eq!(gguf.version, 3);
    let meta = |key: &str| {
        gguf.metadata
            .get(key)
            .and_then(|v| v.as_u64())
            .unwrap_or_else(|| panic!("{key}: {:?}", gguf.metadata.get(key)))
    };
    assert_eq!(meta("llama.expert_count"), N as u64);
    assert_eq!(meta("llama.expert_used_count"), 2);
    assert_eq!(meta("llama.block_count"), 2);
    assert_eq!(meta("llama.embedding_length"), D as u64);
    assert_eq!(
        gguf.metadata
            .get("general.architecture")
            .and_then(|v| v.as_str()),
        Some("llama")
    );

    // (layer, F, gate, up, down)
    let layers = [
        (
            0,
            256,
            WeightFormat::Q4K,
            WeightFormat::Q8_0,
            WeightFormat::Q6K,
        ),
        (
            1,
            32,
            WeightFormat::F16,
            WeightFormat::Bf16,
            WeightFormat::Q4_0,
        ),
    ];
    assert_eq!(gguf.tensors.len(), 8);
    let mut failures = Vec::new();
    for (layer, f, gate, up, down) in layers {
        // The router: f32 [N, D], compared whole.
        let name = format!("blk.{layer}.ffn_gate_inp.weight");
        let router = gguf.tensor(&name).unwrap_or_else(|| panic!("no {name}"));
        assert_eq!(router.type_id, WeightFormat::F32.ggml_type(), "{name}");
        assert_eq!(router.dims, [D as u64, N as u64], "{name}");
        let mut values = vec![0.0; N * D];
        decode_row(WeightFormat::F32, router.data, &mut values);
        let (want, shape) = f32_tensor(&expected, &name);
        assert_eq!(shape, [N, D], "{name}");
        if let Some(m) = bit_mismatch(&values, &want) {
            failures.push(format!("{name}: {m}"));
        }

        for (part, format, rows, cols) in
            [("gate", gate, f, D), ("up", up, f, D), ("down", down, D, f)]
        {
            let name = format!("blk.{layer}.ffn_{part}_exps.weight");
            let tensor = gguf.tensor(&name).unwrap_or_else(|| panic!("no {name}"));
            assert_eq!(tensor.type_id, format.ggml_type(), "{name}");
            assert_eq!(
                WeightFormat::from_ggml_type(tensor.type_id),
                Some(format),
                "{name}"
            );
            assert_eq!(
                tensor.dims,
                [cols as u64, rows as u64, N as u64],
                "{name}: dims innermost first"
            );
            let row_bytes = cols / format.block_values() * format.block_bytes();
            assert_eq!(tensor.data.len(), N * rows * row_bytes, "{name}");
            for e in [0, N - 1] {
                for r in [0, rows - 1] {
                    let start = (e * rows + r) * row_bytes;
                    let mut out = vec![f32::NAN; cols];
                    decode_row(format, &tensor.data[start..start + row_bytes], &mut out);
                    let key = format!("{name}.e{e}.r{r}");
                    let (want, shape) = f32_tensor(&expected, &key);
                    assert_eq!(shape, [cols], "{key}");
                    if let Some(m) = bit_mismatch(&out, &want) {
                        failures.push(format!("{key} ({format}): {m}"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// MXFP4 (gpt-oss's format, GGUF type 39) against gguf-py 0.19's `dequantize` bit for bit
/// (quantized rows, and random blocks with every exponent byte: subnormal scales for e < 2,
/// infinities where 12·2^(e − 128) overflows) and its `quantize` byte for byte (ordinary,
/// zero, tie and huge rows).
#[test]
fn mxfp4_matches_gguf_py() {
    let bytes = read_fixture("mxfp4.safetensors");
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let format = WeightFormat::Mxfp4;
    let mut failures = Vec::new();
    for prefix in ["", "random."] {
        let (blocks, [rows, row_bytes]) = u8_matrix(&file, &format!("{prefix}blocks"));
        let (values, shape) = f32_tensor(&file, &format!("{prefix}values"));
        let cols = shape[1];
        let mut out = vec![f32::NAN; cols];
        for row in 0..rows {
            decode_row(
                format,
                &blocks[row * row_bytes..(row + 1) * row_bytes],
                &mut out,
            );
            if let Some(m) = bit_mismatch(&out, &values[row * cols..(row + 1) * cols]) {
                failures.push(format!("{prefix}row {row} {m}"));
            }
        }
    }
    let (source, shape) = f32_tensor(&file, "source");
    let (blocks, [rows, row_bytes]) = u8_matrix(&file, "blocks");
    let cols = shape[1];
    for row in 0..rows {
        let mut out = Vec::new();
        encode_row(format, &source[row * cols..(row + 1) * cols], &mut out);
        if out != blocks[row * row_bytes..(row + 1) * row_bytes] {
            failures.push(format!("quantized row {row} differs from gguf-py's"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The random blocks whose values overflow are refused at load, naming the block.
    let (random, [_, row_bytes]) = u8_matrix(&file, "random.blocks");
    match switch_moe::formats::decode::check_finite(format, &random[..row_bytes * 32], "w") {
        Err(switch_moe::MoeError::Tensor { name, message }) => {
            assert_eq!(name, "w");
            assert!(message.contains("mxfp4 block"), "{message}");
        }
        other => panic!("expected an overflow error, got {other:?}"),
    }
}

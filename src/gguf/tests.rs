//! The GGUF reader on files made in the test: every value type, alignments, versions, and
//! every kind of malformed input giving an error that names the file (and tensor).

use super::*;

const FILE: &str = "model.gguf";
/// (key, value type, value bytes)
type Kv = (&'static str, u32, Vec<u8>);
/// (name, dims, type id, offset)
type Info = (&'static str, Vec<u64>, u32, u64);
/// (name, dims, type id, byte count)
type Spec = (&'static str, Vec<u64>, u32, usize);

fn le32(v: u32) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn le64(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// A GGUF string: u64 length, then the bytes.
fn gstr(text: &[u8]) -> Vec<u8> {
    [le64(text.len() as u64), text.to_vec()].concat()
}

/// The header, `kvs`, `infos`, zero padding to a multiple of `align`, then `data`.
fn build(version: u32, kvs: &[Kv], infos: &[Info], align: usize, data: &[u8]) -> Vec<u8> {
    let mut out = [b"GGUF".to_vec(), le32(version)].concat();
    out.extend([le64(infos.len() as u64), le64(kvs.len() as u64)].concat());
    for (key, ty, value) in kvs {
        out.extend([gstr(key.as_bytes()), le32(*ty), value.clone()].concat());
    }
    for (name, dims, ty, offset) in infos {
        out.extend([gstr(name.as_bytes()), le32(dims.len() as u32)].concat());
        dims.iter().for_each(|d| out.extend(le64(*d)));
        out.extend([le32(*ty), le64(*offset)].concat());
    }
    out.resize(out.len().next_multiple_of(align), 0);
    out.extend(data);
    out
}

/// Lays out tensors each at the next multiple of `align`, tensor i's byte j being `i * 31 + j`.
fn layout(tensors: &[Spec], align: usize) -> (Vec<Info>, Vec<u8>) {
    let (mut infos, mut data) = (Vec::new(), Vec::new());
    for (i, (name, dims, ty, n)) in tensors.iter().enumerate() {
        data.resize(data.len().next_multiple_of(align), 0);
        infos.push((*name, dims.clone(), *ty, data.len() as u64));
        data.extend((0..*n).map(|j| (i * 31 + j) as u8));
    }
    (infos, data)
}

/// F32, F16, Q8_0 and a 3-D Q4_K tensor.
fn sample_tensors() -> Vec<Spec> {
    vec![
        ("up", vec![4, 3], 0, 48),
        ("gate", vec![8], 1, 16),
        ("q8", vec![32, 2], 8, 68),
        ("exps", vec![256, 2, 2], 12, 4 * 144),
    ]
}

/// A key of every scalar type, an array of strings, and an array of arrays of u16.
fn sample_kvs() -> Vec<Kv> {
    let strings = [
        le32(8),
        le64(3),
        gstr(b"a"),
        gstr(b""),
        gstr("\u{fc}".as_bytes()),
    ];
    let nested = [
        le32(9),
        le64(2),
        le32(2),
        le64(2),
        vec![1, 0, 2, 0],
        le32(2),
        le64(0),
    ];
    vec![
        ("general.architecture", 8, gstr(b"mixtral")),
        ("k.u8", 0, vec![200]),
        ("k.i8", 1, vec![0xff]),
        ("k.u16", 2, 500u16.to_le_bytes().to_vec()),
        ("k.i16", 3, (-5i16).to_le_bytes().to_vec()),
        ("k.u32", 4, le32(70000)),
        ("k.i32", 5, (-7i32).to_le_bytes().to_vec()),
        ("k.f32", 6, 1.5f32.to_le_bytes().to_vec()),
        ("k.bool", 7, vec![1]),
        ("k.u64", 10, le64(1 << 40)),
        ("k.i64", 11, 9i64.to_le_bytes().to_vec()),
        ("k.f64", 12, 0.25f64.to_le_bytes().to_vec()),
        ("tokenizer.ggml.tokens", 9, strings.concat()),
        ("k.nested", 9, nested.concat()),
    ]
}

fn sample() -> Vec<u8> {
    let (infos, data) = layout(&sample_tensors(), 32);
    build(3, &sample_kvs(), &infos, 32, &data)
}

fn offset_in(file: &[u8], t: &GgufTensor<'_>) -> usize {
    t.data.as_ptr() as usize - file.as_ptr() as usize
}

/// Parsing `bytes` fails with a message naming the file and holding each of `parts`.
fn assert_err(bytes: &[u8], parts: &[&str]) {
    let message = match GgufFile::parse(bytes, FILE) {
        Ok(_) => panic!("parsed, expected an error with {parts:?}"),
        Err(e) => e.to_string(),
    };
    for part in [FILE].iter().chain(parts) {
        assert!(message.contains(part), "`{message}` lacks `{part}`");
    }
}

/// No metadata and one tensor `w`, followed by `data_len` zero bytes of data.
fn one(dims: Vec<u64>, ty: u32, offset: u64, data_len: usize) -> Vec<u8> {
    build(3, &[], &[("w", dims, ty, offset)], 32, &vec![0; data_len])
}

#[test]
fn parses_a_valid_file() {
    let bytes = sample();
    let f = GgufFile::parse(&bytes, FILE).unwrap();
    assert_eq!((f.version, f.alignment), (3, 32));
    let m = &f.metadata;
    assert_eq!(m["general.architecture"].as_str(), Some("mixtral"));
    let expected = [
        ("k.u8", GgufValue::U8(200), Some(200)),
        ("k.i8", GgufValue::I8(-1), None),
        ("k.u16", GgufValue::U16(500), Some(500)),
        ("k.i16", GgufValue::I16(-5), None),
        ("k.u32", GgufValue::U32(70000), Some(70000)),
        ("k.i32", GgufValue::I32(-7), None),
        ("k.f32", GgufValue::F32(1.5), None),
        ("k.bool", GgufValue::Bool(true), None),
        ("k.u64", GgufValue::U64(1 << 40), Some(1 << 40)),
        ("k.i64", GgufValue::I64(9), Some(9)),
        ("k.f64", GgufValue::F64(0.25), None),
    ];
    for (key, value, as_u64) in expected {
        assert_eq!(
            (&m[key], m[key].as_u64(), m[key].as_str()),
            (&value, as_u64, None)
        );
    }
    let array = |element_type, len| GgufValue::Array { element_type, len };
    assert_eq!(m["tokenizer.ggml.tokens"], array(8, 3));
    assert_eq!(m["k.nested"], array(9, 2));
    let (_, data) = layout(&sample_tensors(), 32);
    let data_start = bytes.len() - data.len();
    assert_eq!(f.tensors.len(), 4);
    for ((name, dims, ty, n), t) in sample_tensors().into_iter().zip(&f.tensors) {
        assert_eq!((t.name.as_str(), &t.dims, t.type_id), (name, &dims, ty));
        let offset = offset_in(&bytes, t);
        assert_eq!(offset % 32, 0, "{name}");
        assert_eq!(t.data, &data[offset - data_start..][..n]);
    }
    assert_eq!(f.tensor("exps").map(|t| t.dims.len()), Some(3));
    assert!(f.tensor("missing").is_none());
    assert_eq!(ggml_type_name(12), Some("Q4_K"));
    assert_eq!(ggml_block_size(12), Some((256, 144)));
    assert_eq!((ggml_type_name(4), ggml_block_size(77)), (None, None));
}

#[test]
fn honours_a_custom_alignment_and_version_2() {
    let kvs = [("general.alignment", 4, le32(64))];
    let (infos, data) = layout(&sample_tensors(), 64);
    let bytes = build(2, &kvs, &infos, 64, &data);
    let f = GgufFile::parse(&bytes, FILE).unwrap();
    assert_eq!((f.version, f.alignment, f.tensors.len()), (2, 64, 4));
    let data_start = bytes.len() - data.len();
    for (t, (_, _, _, offset)) in f.tensors.iter().zip(&infos) {
        assert_eq!(offset_in(&bytes, t), data_start + *offset as usize);
        assert_eq!(offset_in(&bytes, t) % 64, 0);
    }
    let empty = build(3, &[], &[], 32, &[]);
    assert!(GgufFile::parse(&empty, FILE).unwrap().tensors.is_empty());
    // Misaligned for 64 though aligned for the default 32.
    let bytes = build(3, &kvs, &[("w", vec![8], 0, 32)], 64, &[0; 64]);
    assert_err(&bytes, &["`w`", "misaligned"]);
}

#[test]
fn rejects_malformed_containers() {
    let good = sample();
    let patched = |at: usize, with: &[u8]| {
        let mut b = good.clone();
        b[at..at + with.len()].copy_from_slice(with);
        b
    };
    assert_err(&patched(0, b"GGML"), &["not a GGUF file", "GGML"]);
    assert_err(&patched(4, &le32(1)), &["version 1 is not supported"]);
    assert_err(&patched(4, &le32(4)), &["version 4 is not supported"]);
    assert_err(&patched(4, &le32(3 << 24)), &["is it big-endian?"]);
    assert_err(&patched(8, &le64(u64::MAX)), &["tensors but only"]);
    assert_err(&patched(16, &le64(u64::MAX)), &["metadata entries but"]);
    assert_err(
        &patched(24, &le64(u64::MAX)),
        &["truncated", "metadata key 0"],
    );
    assert_err(
        &patched(32, &[0xff]),
        &["metadata key 0", "not valid UTF-8"],
    );
    let kv = |ty: u32, value: Vec<u8>| build(3, &[("k", ty, value)], &[], 32, &[]);
    assert_err(
        &kv(8, [le64(1000), b"abc".to_vec()].concat()),
        &["`k`", "truncated"],
    );
    assert_err(
        &kv(8, [le64(2), vec![0xc3, 0x28]].concat()),
        &["`k`", "UTF-8"],
    );
    assert_err(&kv(7, vec![2]), &["`k`", "not 0 or 1"]);
    assert_err(&kv(13, vec![0; 8]), &["`k`", "unknown value type 13"]);
    let array =
        |et: u32, len: u64, rest: &[u8]| kv(9, [le32(et), le64(len), rest.to_vec()].concat());
    assert_err(&array(10, u64::MAX, &[]), &["`k`", "overflows"]);
    assert_err(&array(8, 1 << 60, &[0; 64]), &["`k`", "truncated"]);
    assert_err(&array(7, 3, &[0, 1, 5]), &["`k`", "not 0 or 1"]);
    assert_err(
        &array(77, 0, &[]),
        &["`k`", "unknown array element type 77"],
    );
    let nest = |levels: usize| {
        let inner = [le32(4), le64(0)].concat();
        kv(
            9,
            [[le32(9), le64(1)].concat().repeat(levels - 1), inner].concat(),
        )
    };
    assert!(GgufFile::parse(&nest(MAX_ARRAY_DEPTH as usize), FILE).is_ok());
    assert_err(&nest(MAX_ARRAY_DEPTH as usize + 1), &["`k`", "nest deeper"]);
    let dup = build(3, &[("k", 0, vec![1]), ("k", 0, vec![2])], &[], 32, &[]);
    assert_err(&dup, &["`k`", "duplicate key"]);
    for (ty, value) in [(4, le32(0)), (4, le32(48)), (10, le64(64))] {
        let bytes = build(3, &[("general.alignment", ty, value)], &[], 32, &[]);
        assert_err(&bytes, &["general.alignment", "power of two"]);
    }
}

#[test]
fn rejects_malformed_tensor_infos() {
    assert_err(&one(vec![], 0, 0, 32), &["`w`", "0 dimensions"]);
    assert_err(&one(vec![1; 5], 0, 0, 32), &["`w`", "5 dimensions"]);
    assert_err(&one(vec![4, 0], 0, 0, 32), &["`w`", "dimension 1 is 0"]);
    assert_err(&one(vec![1 << 32, 1 << 32], 0, 0, 32), &["`w`", "overflow"]);
    assert_err(&one(vec![1 << 62, 2], 0, 0, 32), &["`w`", "overflow"]);
    assert_err(&one(vec![4], 77, 0, 32), &["`w`", "type id 77"]);
    let q4k = "row of 100 values is not a whole number of Q4_K blocks of 256";
    assert_err(&one(vec![100], 12, 0, 1024), &["`w`", q4k]);
    assert_err(
        &one(vec![4], 0, 4, 32),
        &["`w`", "alignment 32", "misaligned"],
    );
    let past = "runs past the end of the file";
    assert_err(
        &one(vec![4], 0, 0, 8),
        &["`w`", "offset 0 + 16 bytes", past],
    );
    assert_err(
        &one(vec![4], 0, 64, 64),
        &["`w`", "offset 64 + 16 bytes", past],
    );
    assert_err(&one(vec![4], 0, u64::MAX - 31, 64), &["`w`", past]);
    assert!(GgufFile::parse(&one(vec![4], 0, 32, 48), FILE).is_ok());
    let two = |second: Info| build(3, &[], &[("a", vec![8], 0, 0), second], 32, &[0; 64]);
    assert_err(
        &two(("a", vec![8], 0, 32)),
        &["`a`", "duplicate tensor name"],
    );
    assert_err(&two(("b", vec![8], 0, 0)), &["`b`", "overlaps tensor `a`"]);
    assert!(GgufFile::parse(&two(("b", vec![8], 0, 32)), FILE).is_ok());
    let mut bad_name = one(vec![4], 0, 0, 16);
    bad_name[32] = 0xff; // the name "w"
    assert_err(&bad_name, &["name of tensor 0", "not valid UTF-8"]);
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample();
    for len in 0..bytes.len() {
        match GgufFile::parse(&bytes[..len], FILE) {
            Ok(_) => panic!("a {len}-byte prefix parsed"),
            Err(e) => assert!(e.to_string().contains(FILE), "{e}"),
        }
    }
}

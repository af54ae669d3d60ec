use proptest::prelude::*;

use super::*;

fn q8_0_block(scale: f32, codes: [i8; 32]) -> Vec<u8> {
    let mut b = half::f16::from_f32(scale).to_le_bytes().to_vec();
    b.extend(codes.iter().map(|&c| c as u8));
    b
}

/// A small file with every value type and three tensors of different types.
fn sample() -> GgufWriter {
    let f32_data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let q8: Vec<u8> = (0..2)
        .flat_map(|b| q8_0_block(0.5 * (b + 1) as f32, [b as i8; 32]))
        .collect();
    GgufWriter::new()
        .meta("general.architecture", Value::String("llama".into()))
        .meta("llama.block_count", Value::U32(2))
        .meta("llama.rope.freq_base", Value::F32(100000.0))
        .meta("small", Value::U8(7))
        .meta("neg", Value::I8(-3))
        .meta("u16", Value::U16(65535))
        .meta("i16", Value::I16(-2))
        .meta("i32", Value::I32(-70000))
        .meta("u64", Value::U64(1 << 40))
        .meta("i64", Value::I64(-(1 << 40)))
        .meta("f64", Value::F64(0.25))
        .meta("flag", Value::Bool(true))
        .meta(
            "tokenizer.ggml.tokens",
            Value::Array(vec![
                Value::String("a".into()),
                Value::String("Ġb".into()),
                Value::String("".into()),
            ]),
        )
        .meta(
            "nested",
            Value::Array(vec![Value::Array(vec![Value::I32(1), Value::I32(2)])]),
        )
        .tensor("norm.weight", &[6], GgmlType::F32, f32_data)
        .tensor("q8", &[32, 2], GgmlType::Q8_0, q8)
        .tensor("q41", &[32, 1], GgmlType::Q4_1, vec![9u8; 20])
}

#[test]
fn a_written_file_reads_back() {
    let bytes = sample().to_bytes();
    let g = GgufFile::from_bytes("sample.gguf", bytes.clone()).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.data_start() % 32, 0);
    assert_eq!(g.architecture(), Some("llama"));
    assert_eq!(g.require_u64("llama.block_count").unwrap(), 2);
    assert_eq!(g.require_f64("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(g.get("neg"), Some(&Value::I8(-3)));
    assert_eq!(g.get("i64").and_then(Value::as_u64), None);
    assert_eq!(g.get("u64").and_then(Value::as_u64), Some(1 << 40));
    assert_eq!(g.get("flag"), Some(&Value::Bool(true)));
    let toks = g
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .unwrap();
    assert_eq!(toks[1].as_str(), Some("Ġb"));
    assert_eq!(g.metadata().len(), 14);
    assert_eq!(g.metadata()[0].0, "general.architecture");

    assert_eq!(g.tensors().len(), 3);
    let norm = g.tensor("norm.weight").unwrap();
    assert_eq!(norm.shape(), vec![6]);
    let vals: Vec<f32> = g
        .data(norm)
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(vals, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    let q8 = g.tensor("q8").unwrap();
    assert_eq!(q8.shape(), vec![2, 32]);
    assert_eq!(q8.elements(), 64);
    assert_eq!(q8.range.len(), 68);
    assert_eq!(q8.range.start % 32, 0);
    assert_eq!(&g.data(q8)[34..36], &half::f16::from_f32(1.0).to_le_bytes());
    assert_eq!(g.data(g.tensor("q41").unwrap()), &[9u8; 20][..]);
    let err = g.require_u64("missing.key").unwrap_err().to_string();
    assert!(
        err.contains("missing.key") && err.contains("missing"),
        "{err}"
    );
    let err = g
        .require_u64("general.architecture")
        .unwrap_err()
        .to_string();
    assert!(err.contains("is a string"), "{err}");
}

#[test]
fn the_alignment_key_moves_the_data() {
    let bytes = sample()
        .meta("general.alignment", Value::U32(64))
        .to_bytes();
    let g = GgufFile::from_bytes("a.gguf", bytes).unwrap();
    assert_eq!(g.alignment(), 64);
    for t in g.tensors() {
        assert_eq!((t.range.start - g.data_start()) % 64, 0, "{}", t.name);
    }
    for bad in [Value::U32(48), Value::U32(0), Value::U64(64)] {
        let bytes = sample().meta("general.alignment", bad).to_bytes();
        let e = GgufFile::from_bytes("a.gguf", bytes)
            .unwrap_err()
            .to_string();
        assert!(e.contains("general.alignment"), "{e}");
    }
}

#[test]
fn a_real_file_on_disk_is_mapped() {
    let dir = std::env::temp_dir().join(format!("apparate-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("m.gguf");
    std::fs::write(&p, sample().to_bytes()).unwrap();
    let g = GgufFile::open(&p).unwrap();
    assert_eq!(g.tensors().len(), 3);
    let e = GgufFile::open(&dir).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let e = GgufFile::open(dir.join("absent.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent.gguf"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn err_of(bytes: Vec<u8>) -> String {
    GgufFile::from_bytes("bad.gguf", bytes)
        .unwrap_err()
        .to_string()
}

fn put_u64_at(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn bad_headers_say_what_is_wrong() {
    let good = sample().to_bytes();
    let mut b = good.clone();
    b[..4].copy_from_slice(b"GGML");
    assert!(err_of(b).contains("not a GGUF file"));
    let mut b = good.clone();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(err_of(b).contains("version 1"));
    let mut b = good.clone();
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(err_of(b).contains("big-endian"));
    let mut b = good.clone();
    b[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert!(err_of(b).contains("version 9"));
    // Absurd counts are refused before anything is allocated for them.
    let mut b = good.clone();
    put_u64_at(&mut b, 8, u64::MAX);
    assert!(err_of(b).contains("tensors"));
    let mut b = good.clone();
    put_u64_at(&mut b, 16, u64::MAX);
    let e = err_of(b);
    assert!(e.contains("metadata count") && e.contains("at most"), "{e}");
    // The first key's length.
    let mut b = good.clone();
    put_u64_at(&mut b, 24, 1 << 62);
    let e = err_of(b);
    assert!(e.contains("key of metadata entry 0"), "{e}");
}

/// The byte offset of `needle` in `hay` (the writer's layout is known, so tests patch fields).
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap()
}

#[test]
fn bad_values_and_tensor_entries_are_named() {
    let good = sample().to_bytes();
    // The value type of `small` (u32 just after its key).
    let at = find(&good, b"small") + 5;
    let mut b = good.clone();
    b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    let e = err_of(b);
    assert!(
        e.contains("`small`") && e.contains("unknown value type 99"),
        "{e}"
    );
    // The bool's byte.
    let at = find(&good, b"flag") + 4 + 4;
    let mut b = good.clone();
    b[at] = 2;
    assert!(err_of(b).contains("bool of value 2"));
    // The tokens array's count.
    let at = find(&good, b"tokenizer.ggml.tokens") + 21 + 4 + 4;
    let mut b = good.clone();
    put_u64_at(&mut b, at, 1 << 50);
    let e = err_of(b);
    assert!(
        e.contains("tokenizer.ggml.tokens") && e.contains("declares"),
        "{e}"
    );
    // A token that is not UTF-8.
    let at = find(&good, "Ġb".as_bytes());
    let mut b = good.clone();
    b[at] = 0xff;
    let e = err_of(b);
    assert!(
        e.contains("element 1 of metadata `tokenizer.ggml.tokens`") && e.contains("UTF-8"),
        "{e}"
    );

    // Tensor entries: name, n_dims u32, dims, type u32, offset u64.
    let name_end = find(&good, b"q41") + 3;
    let dims_at = name_end + 4;
    let type_at = dims_at + 16;
    let off_at = type_at + 4;
    let mut b = good.clone();
    b[name_end..name_end + 4].copy_from_slice(&5u32.to_le_bytes());
    assert!(err_of(b).contains("5 dimensions"));
    let mut b = good.clone();
    put_u64_at(&mut b, dims_at, 0);
    assert!(err_of(b).contains("dimension 0 of size 0"));
    let mut b = good.clone();
    put_u64_at(&mut b, dims_at, 33);
    let e = err_of(b);
    assert!(
        e.contains("`q41`") && e.contains("whole number of Q4_1 blocks"),
        "{e}"
    );
    let mut b = good.clone();
    put_u64_at(&mut b, dims_at + 8, u64::MAX / 2);
    let e = err_of(b);
    assert!(e.contains("`q41`") && e.contains("do not fit"), "{e}");
    let mut b = good.clone();
    b[type_at..type_at + 4].copy_from_slice(&16u32.to_le_bytes());
    let e = err_of(b);
    assert!(e.contains("`q41`") && e.contains("GGML type 16"), "{e}");
    let mut b = good.clone();
    put_u64_at(&mut b, off_at, 33);
    assert!(err_of(b).contains("not a multiple of the alignment"));
    let mut b = good.clone();
    put_u64_at(&mut b, off_at, 0);
    assert!(err_of(b).contains("overlap"));
    let mut b = good.clone();
    put_u64_at(&mut b, off_at, 1 << 40);
    assert!(err_of(b).contains("run past the end"));
    let dup = GgufWriter::new()
        .tensor("w", &[4], GgmlType::F32, vec![0; 16])
        .tensor("w", &[4], GgmlType::F32, vec![0; 16])
        .to_bytes();
    assert!(err_of(dup).contains("`w` appears twice"));
    let dup = GgufWriter::new()
        .meta("k", Value::U8(1))
        .meta("k", Value::U8(2))
        .to_bytes();
    assert!(err_of(dup).contains("`k` appears twice"));
}

/// An array longer than any real vocabulary is refused before its elements are read (each would
/// take 32 bytes as a `Value` for 1 byte in the file).
#[test]
fn huge_arrays_are_refused() {
    let n = MAX_ARRAY_LEN + 1;
    let bytes = GgufWriter::new()
        .meta("big", Value::Array(vec![Value::U8(0); 1]))
        .to_bytes();
    // Patch the count to n and give the file the n bytes it then declares.
    let at = find(&bytes, b"big") + 3 + 4 + 4;
    let mut b = bytes[..at].to_vec();
    b.extend_from_slice(&(n as u64).to_le_bytes());
    b.resize(b.len() + n, 0);
    let e = err_of(b);
    assert!(e.contains("`big`") && e.contains("more than the"), "{e}");
}

#[test]
fn every_truncation_is_an_error() {
    let good = sample().to_bytes();
    GgufFile::from_bytes("ok.gguf", good.clone()).unwrap();
    for n in 0..good.len() {
        let r = GgufFile::from_bytes("cut.gguf", good[..n].to_vec());
        assert!(
            r.is_err(),
            "a file cut to {n} of {} bytes was accepted",
            good.len()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Corrupt bytes anywhere: never a panic, and what is accepted is self-consistent.
    #[test]
    fn corrupt_files_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let mut b = sample().to_bytes();
        let n = b.len();
        for (at, v) in flips {
            b[at % n] = v;
        }
        if let Ok(g) = GgufFile::from_bytes("fuzz.gguf", b) {
            for t in g.tensors() {
                prop_assert!(t.range.end <= n);
                prop_assert_eq!(g.data(t).len(), t.range.len());
            }
        }
    }
}

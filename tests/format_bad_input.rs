//! Bad model and ramps files: every malformation gives an error that names what is wrong, and
//! nothing panics or allocates by a declared size.

mod common;

use std::collections::HashMap;

use apparate::Error;
use apparate::format::{ModelFile, OwnedTensor, RampHead, RampMeta, RampsFile, write_ramps};
use apparate::models::bert::Bert;
use apparate::models::bert::synthetic::{tiny_config, write_random_bert};
use apparate::tensor::DType;
use common::*;
use proptest::prelude::*;
use safetensors::Dtype;

/// A valid tiny model file's bytes (with a 3-class head).
fn valid_bytes(dir: &TempDir) -> Vec<u8> {
    let p = dir.path("valid.apparate");
    write_random_bert(&p, &tiny_config(), Some(3), DType::F32, 7).unwrap();
    std::fs::read(p).unwrap()
}

/// Raw tensors + metadata of a file, to rebuild variants of it.
struct Parts {
    meta: HashMap<String, String>,
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
}

fn parts(bytes: &[u8]) -> Parts {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let (_, m) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
    let mut tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Parts {
        meta: m.metadata().clone().unwrap(),
        tensors,
    }
}

fn build(p: &Parts) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = p
        .tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, Some(p.meta.clone())).unwrap()
}

fn open_bytes(dir: &TempDir, name: &str, bytes: &[u8]) -> apparate::Result<ModelFile> {
    let p = dir.path(name);
    std::fs::write(&p, bytes).unwrap();
    ModelFile::open(&p)
}

fn err_text(r: apparate::Result<ModelFile>) -> String {
    match r {
        Ok(_) => panic!("malformed file was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn valid_file_opens_and_loads() {
    let dir = TempDir::new("valid");
    let bytes = valid_bytes(&dir);
    let f = open_bytes(&dir, "m.apparate", &bytes).unwrap();
    Bert::load(cpu(), &f).unwrap();
    // Our writer aligns every tensor, so f32 weights are read straight from the mapping.
    for (name, _) in f.tensors() {
        let v = f.tensor(name).unwrap();
        assert!(
            matches!(v.to_f32(), std::borrow::Cow::Borrowed(_)),
            "{name} was copied"
        );
    }
}

#[test]
fn empty_and_tiny_files() {
    let dir = TempDir::new("tiny");
    let e = err_text(open_bytes(&dir, "empty.apparate", b""));
    assert!(
        e.contains("empty.apparate") && e.contains("too short"),
        "{e}"
    );
    let e = err_text(open_bytes(&dir, "seven.apparate", b"1234567"));
    assert!(e.contains("too short"), "{e}");
    let e = err_text(ModelFile::open(dir.path("does-not-exist.apparate")));
    assert!(e.contains("does-not-exist.apparate"), "{e}");
}

#[test]
fn absurd_declared_header_sizes() {
    let dir = TempDir::new("absurd");
    for n in [u64::MAX, 1 << 40, 100_000_001, 1_000_000] {
        let mut b = n.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        let e = err_text(open_bytes(&dir, "big.apparate", &b));
        assert!(e.contains("header size"), "{n}: {e}");
    }
}

#[test]
fn absurd_declared_tensor_shape() {
    let dir = TempDir::new("shape");
    let header = r#"{"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(&[0; 4]);
    let e = err_text(open_bytes(&dir, "shape.apparate", &b));
    assert!(
        e.contains("shape.apparate") && e.contains("overflows"),
        "{e}"
    );
}

#[test]
fn absurd_config_is_refused_before_any_allocation() {
    let dir = TempDir::new("cfg");
    let mut p = parts(&valid_bytes(&dir));
    let meta = p.meta.get_mut("apparate").unwrap();
    *meta = meta.replace("\"vocab_size\": 16", "\"vocab_size\": 1000000000000");
    assert!(meta.contains("1000000000000"));
    let e = err_text(open_bytes(&dir, "cfg.apparate", &build(&p)));
    assert!(e.contains("vocab_size"), "{e}");
}

#[test]
fn truncated_file_at_every_region() {
    let dir = TempDir::new("trunc");
    let bytes = valid_bytes(&dir);
    let mut cut = vec![8, 9, 100, bytes.len() / 2, bytes.len() - 1];
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    cut.push(8 + header_len);
    cut.push(8 + header_len - 1);
    for c in cut {
        let e = err_text(open_bytes(&dir, "t.apparate", &bytes[..c]));
        assert!(e.contains("t.apparate"), "cut at {c}: {e}");
    }
}

#[test]
fn wrong_dtype_is_named() {
    let dir = TempDir::new("dtype");
    let mut p = parts(&valid_bytes(&dir));
    let t = p.tensors.iter_mut().find(|t| t.0 == "head.bias").unwrap();
    t.1 = Dtype::I32;
    let e = err_text(open_bytes(&dir, "d.apparate", &build(&p)));
    assert!(e.contains("head.bias") && e.contains("I32"), "{e}");
}

#[test]
fn wrong_shape_is_named() {
    let dir = TempDir::new("wshape");
    let mut p = parts(&valid_bytes(&dir));
    let t = p
        .tensors
        .iter_mut()
        .find(|t| t.0 == "layers.1.ffn.up.weight")
        .unwrap();
    t.2 = vec![t.2[1], t.2[0]];
    let e = err_text(open_bytes(&dir, "s.apparate", &build(&p)));
    assert!(
        e.contains("layers.1.ffn.up.weight") && e.contains("expected [24, 16]"),
        "{e}"
    );
}

#[test]
fn missing_and_extra_tensors_are_named() {
    let dir = TempDir::new("set");
    let valid = parts(&valid_bytes(&dir));
    let mut p = parts(&valid_bytes(&dir));
    p.tensors.retain(|t| t.0 != "embeddings.position");
    let e = err_text(open_bytes(&dir, "m.apparate", &build(&p)));
    assert!(
        e.contains("embeddings.position") && e.contains("missing"),
        "{e}"
    );

    let mut p = valid;
    p.tensors
        .push(("layers.9.stray".into(), Dtype::F32, vec![2], vec![0; 8]));
    let e = err_text(open_bytes(&dir, "x.apparate", &build(&p)));
    assert!(
        e.contains("layers.9.stray") && e.contains("unexpected"),
        "{e}"
    );
}

#[test]
fn metadata_problems_are_named() {
    let dir = TempDir::new("meta");
    let valid = parts(&valid_bytes(&dir));

    let mut p = Parts {
        meta: HashMap::new(),
        tensors: valid.tensors.clone(),
    };
    p.meta.insert("format".into(), "pt".into());
    let e = err_text(open_bytes(&dir, "plain.apparate", &build(&p)));
    assert!(e.contains("not an Apparate model file"), "{e}");

    let mut p = Parts {
        meta: valid.meta.clone(),
        tensors: valid.tensors.clone(),
    };
    let m = p.meta.get_mut("apparate").unwrap();
    *m = m.replace("\"format_version\": 1", "\"format_version\": 99");
    let e = err_text(open_bytes(&dir, "v.apparate", &build(&p)));
    assert!(e.contains("format version 99"), "{e}");

    let mut p = Parts {
        meta: valid.meta.clone(),
        tensors: valid.tensors.clone(),
    };
    p.meta.insert("apparate".into(), "{not json".into());
    let e = err_text(open_bytes(&dir, "j.apparate", &build(&p)));
    assert!(e.contains("metadata is invalid"), "{e}");

    let mut p = Parts {
        meta: valid.meta.clone(),
        tensors: valid.tensors.clone(),
    };
    p.meta.remove("tokenizer.json");
    let e = err_text(open_bytes(&dir, "tok.apparate", &build(&p)));
    assert!(e.contains("tokenizer"), "{e}");
}

#[test]
fn non_finite_weights_are_refused_at_load() {
    let dir = TempDir::new("nan");
    let mut p = parts(&valid_bytes(&dir));
    let t = p
        .tensors
        .iter_mut()
        .find(|t| t.0 == "layers.0.attention.out.bias")
        .unwrap();
    t.3[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    let f = open_bytes(&dir, "nan.apparate", &build(&p)).unwrap();
    let e = Bert::load(cpu(), &f)
        .err()
        .expect("NaN weight accepted")
        .to_string();
    assert!(
        e.contains("layers.0.attention.out.bias") && e.contains("element 1"),
        "{e}"
    );
}

#[test]
fn ramps_bind_to_their_backbone() {
    let dir = TempDir::new("ramps");
    let a = dir.path("a.apparate");
    let b = dir.path("b.apparate");
    write_random_bert(&a, &tiny_config(), Some(3), DType::F32, 1).unwrap();
    write_random_bert(&b, &tiny_config(), Some(3), DType::F32, 2).unwrap();
    let (ma, mb) = (ModelFile::open(&a).unwrap(), ModelFile::open(&b).unwrap());
    let head = RampHead::Linear {
        width: 16,
        classes: 3,
    };
    let tensors = vec![
        (
            "ramps.layer.0.weight".to_string(),
            OwnedTensor::from_f32(&[0.1; 48], vec![3, 16], DType::F32),
        ),
        (
            "ramps.layer.0.bias".to_string(),
            OwnedTensor::from_f32(&[0.0; 3], vec![3], DType::F32),
        ),
    ];
    let rp = dir.path("a.ramps");
    let ramps = vec![RampMeta {
        point: "layer.0".into(),
        head: head.clone(),
        grid: 1,
    }];
    write_ramps(&rp, &ma, ramps, tensors.clone()).unwrap();
    let r = RampsFile::open(&rp, &ma).unwrap();
    assert_eq!(r.meta().ramps.len(), 1);
    assert_eq!(r.tensor("layer.0", "bias").unwrap().shape, &[3]);
    match RampsFile::open(&rp, &mb) {
        Err(Error::BackboneMismatch {
            expected, actual, ..
        }) => {
            assert_eq!(expected, ma.sha256());
            assert_eq!(actual, mb.sha256());
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("ramps for another backbone accepted"),
    }
    // A grid on a transformer's ramp is refused (grids are for CNN images).
    let grid = vec![RampMeta {
        point: "layer.0".into(),
        head: head.clone(),
        grid: 2,
    }];
    let e = write_ramps(dir.path("grid.ramps"), &ma, grid, tensors.clone())
        .unwrap_err()
        .to_string();
    assert!(e.contains("grid 2") && e.contains("CNN"), "{e}");
    // A ramp at a point that is not ramp-eligible (the final stage) is refused.
    let bad = vec![RampMeta {
        point: "head".into(),
        head: head.clone(),
        grid: 1,
    }];
    let e = write_ramps(dir.path("bad.ramps"), &ma, bad, tensors)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a ramp-eligible point"), "{e}");
    // A ramps file is not a model.
    let e = err_text(ModelFile::open(&rp));
    assert!(e.contains("ramps file, not a model"), "{e}");
}

/// Cases per parser property: `APPARATE_PROPTEST_CASES`, else 20,000 (1-3 s each in release on
/// one core). docs/testing.md records a long run of a million cases per property.
fn cases() -> u32 {
    std::env::var("APPARATE_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// Where the properties write their inputs: one file per property, rewritten every case (a
/// fresh directory per case made the file system the bottleneck of a long run).
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("format_bad_input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn open_at(path: &std::path::Path, bytes: &[u8]) -> apparate::Result<ModelFile> {
    // A new file each case: truncating and rewriting one makes ext4 flush it (auto_da_alloc),
    // which made a case ~2 ms of waiting on the disk.
    let _ = std::fs::remove_file(path);
    std::fs::write(path, bytes).unwrap();
    ModelFile::open(path)
}

/// A 2x2 RGB PNG whose header says it is `w` x `h` (the header's checksum fixed to match).
fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::RgbImage::from_pixel(2, 2, image::Rgb([10, 200, 30]))
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    // Signature (8), IHDR length (4), "IHDR" (4), width, height, 5 more bytes, then the CRC
    // of "IHDR" + its 13 data bytes.
    bytes[16..20].copy_from_slice(&w.to_be_bytes());
    bytes[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

/// PNG's CRC-32 (ISO 3309, reflected, polynomial 0xEDB88320), bit by bit: 17 bytes per case.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A backbone (kept open) and a valid ramps file's bytes for it, made once per test binary.
fn ramps_cached() -> &'static (ModelFile, Vec<u8>) {
    static RAMPS: std::sync::OnceLock<(ModelFile, Vec<u8>)> = std::sync::OnceLock::new();
    RAMPS.get_or_init(|| {
        let a = scratch("ramps-backbone.apparate");
        write_random_bert(&a, &tiny_config(), Some(3), DType::F32, 1).unwrap();
        let model = ModelFile::open(&a).unwrap();
        let tensors = vec![
            (
                "ramps.layer.0.weight".to_string(),
                OwnedTensor::from_f32(&[0.1; 48], vec![3, 16], DType::F32),
            ),
            (
                "ramps.layer.0.bias".to_string(),
                OwnedTensor::from_f32(&[0.0; 3], vec![3], DType::F32),
            ),
        ];
        let ramps = vec![RampMeta {
            point: "layer.0".into(),
            head: RampHead::Linear {
                width: 16,
                classes: 3,
            },
            grid: 1,
        }];
        let rp = scratch("valid.ramps");
        write_ramps(&rp, &model, ramps, tensors).unwrap();
        let bytes = std::fs::read(&rp).unwrap();
        (model, bytes)
    })
}

/// The valid tiny model's bytes, made once per test binary.
fn valid_cached() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| valid_bytes(&TempDir::new("valid")))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert!(open_at(&scratch("rand.apparate"), &bytes).is_err());
    }

    #[test]
    fn random_json_header_never_panics(
        header in "\\{(\"[a-z._]{1,12}\":\\{\"dtype\":\"(F32|F16|BF16|I64|U8)\",\"shape\":\\[[0-9]{1,6}(,[0-9]{1,6}){0,2}\\],\"data_offsets\":\\[[0-9]{1,5},[0-9]{1,5}\\]\\},?){0,3}\\}",
        tail in 0usize..256,
    ) {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend(std::iter::repeat_n(0u8, tail));
        // No metadata entry: always an error, never a panic.
        prop_assert!(open_at(&scratch("json.apparate"), &b).is_err());
    }

    #[test]
    fn mutated_valid_file_never_panics(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = valid_cached().to_vec();
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        // Aim most flips at the header, where the structure is.
        for (i, v) in flips {
            let at = i.index(header_end.min(bytes.len()));
            bytes[at] = v;
        }
        if let Ok(f) = open_at(&scratch("mut.apparate"), &bytes) {
            // Whatever survives validation must load and run (or fail) cleanly.
            if let Ok(m) = apparate::pipeline::TextModel::from_file(cpu(), &f) {
                let _ = m.run(&["the cat sat on the mat", "a dog"]);
            }
        }
    }

    #[test]
    fn truncation_anywhere_is_an_error(frac in 0.0f64..1.0) {
        let bytes = valid_cached();
        let cut = ((bytes.len() as f64) * frac) as usize;
        prop_assert!(open_at(&scratch("cut.apparate"), &bytes[..cut]).is_err());
    }

    /// The ramps file parser: a valid ramps file with header bytes flipped is refused or opens,
    /// never panics (and whatever opens still names its tensors consistently).
    #[test]
    fn mutated_ramps_file_never_panics(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let (model, valid) = ramps_cached();
        let mut bytes = valid.clone();
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for (i, v) in flips {
            let at = i.index(header_end.min(bytes.len()));
            bytes[at] = v;
        }
        let path = scratch("mut.ramps");
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(r) = RampsFile::open(&path, model) {
            for ramp in &r.meta().ramps {
                let _ = r.tensor(&ramp.point, "weight");
                let _ = r.tensor(&ramp.point, "bias");
            }
        }
    }

    /// Image files are parsed too: a PNG whose header declares any size (up to 2^31 - 1 a
    /// side) over a 2x2 image's data is refused or decoded, quickly, without panicking and
    /// without allocating for the declared size (defect 7 of issue 12 was a 200000x1 header).
    #[test]
    fn png_of_any_declared_size_is_refused_or_decoded(w in 1u32..(1 << 31), h in 1u32..(1 << 31), wide in any::<bool>()) {
        // Half the cases near the shapes that matter: thin strips and just over the limits.
        let (w, h) = if wide { (w, 1 + h % 4) } else { (w, h) };
        let input = apparate::models::cnn::ImageInput {
            height: 224,
            width: 224,
            channels: 3,
            resize_shorter: Some(256),
            mean: vec![0.5; 3],
            std: vec![0.5; 3],
        };
        let path = scratch("declared.png");
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, png_declaring(w, h)).unwrap();
        let t = std::time::Instant::now();
        let r = apparate::vision::load_image(&path, &input);
        prop_assert!(t.elapsed() < std::time::Duration::from_secs(2), "{w}x{h}: {:?}", t.elapsed());
        if (w, h) != (2, 2) {
            prop_assert!(r.is_err(), "{w}x{h} accepted");
        }
    }
}

#[test]
fn a_model_is_not_a_ramps_file() {
    let dir = TempDir::new("kind");
    let a = dir.path("a.apparate");
    write_random_bert(&a, &tiny_config(), None, DType::F32, 1).unwrap();
    let m = ModelFile::open(&a).unwrap();
    let e = RampsFile::open(&a, &m)
        .err()
        .expect("model accepted as ramps")
        .to_string();
    assert!(e.contains("model file, not a ramps file"), "{e}");
}

#[test]
fn a_directory_is_named_as_such() {
    let dir = TempDir::new("folder");
    let e = err_text(ModelFile::open(&dir.0));
    assert!(e.contains("is a directory, expected a model file"), "{e}");
    assert!(!e.contains("No such device"), "{e}");
    let a = dir.path("a.apparate");
    write_random_bert(&a, &tiny_config(), None, DType::F32, 1).unwrap();
    let m = ModelFile::open(&a).unwrap();
    let e = RampsFile::open(&dir.0, &m)
        .err()
        .expect("a folder accepted as ramps")
        .to_string();
    assert!(e.contains("is a directory, expected a ramps file"), "{e}");
}

#[test]
fn the_declared_png_helper_makes_real_pngs() {
    let input = apparate::models::cnn::ImageInput {
        height: 2,
        width: 2,
        channels: 3,
        resize_shorter: None,
        mean: vec![0.0; 3],
        std: vec![1.0; 3],
    };
    let path = scratch("helper.png");
    std::fs::write(&path, png_declaring(2, 2)).unwrap();
    let px = apparate::vision::load_image(&path, &input).unwrap();
    assert!((px[1] - 200.0 / 255.0).abs() < 1e-6, "{px:?}");
    std::fs::write(&path, png_declaring(200_000, 1)).unwrap();
    let e = apparate::vision::load_image(&path, &input)
        .unwrap_err()
        .to_string();
    assert!(e.contains("200000x1") && e.contains("aspect ratio"), "{e}");
}

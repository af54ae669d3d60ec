//! `apparate train-head` end to end on tiny inputs: a random tiny BERT (texts) and the committed
//! MNIST ResNet (image folders and lists). It trains, the written model loads, the accuracy the
//! report gives is what the written model scores on the held-out inputs the report names, and
//! bad input is refused with a message naming what is wrong (exit 1, no panic).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use apparate::backbone::Backbone;
use apparate::format::ModelFile;
use apparate::models::bert::synthetic::{tiny_config, write_random_bert};
use apparate::pipeline::TextModel;
use apparate::rng::SplitMix;
use apparate::tensor::DType;
use common::{TempDir, cpu};

const MNIST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/weights/mnist-resnet.apparate");

/// Runs the CLI; returns (exit code, stdout, stderr).
fn apparate(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_apparate"))
        .args(args)
        .env("APPARATE_THREADS", "2")
        .output()
        .expect("the apparate binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn refused(args: &[&str], needles: &[&str]) {
    let (code, _, err) = apparate(args);
    assert_eq!(code, Some(1), "{args:?}: exit {code:?}, stderr: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: `{n}` not in: {err}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Two classes of sentences over the tiny vocabulary: `cats` use cat/sat/mat, `dogs` use
/// dog/ran/far, both with the same filler words.
fn sentences(n: usize, seed: u64) -> (Vec<String>, Vec<String>) {
    let mut rng = SplitMix::new(seed);
    let fill = ["the", "a", "on", "."];
    let (mut texts, mut labels) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (label, words) = if i % 2 == 0 {
            ("cats", ["cat", "sat", "mat"])
        } else {
            ("dogs", ["dog", "ran", "far"])
        };
        let len = 3 + rng.below(6);
        let t: Vec<&str> = (0..len)
            .map(|_| {
                if rng.below(2) == 0 {
                    words[rng.below(3)]
                } else {
                    fill[rng.below(4)]
                }
            })
            .collect();
        texts.push(t.join(" "));
        labels.push(label.to_string());
    }
    (texts, labels)
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").expect("write");
}

fn report(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("report written"))
        .expect("report is JSON")
}

fn held_out(r: &serde_json::Value) -> Vec<usize> {
    r["held_out_indices"]
        .as_array()
        .expect("held_out_indices")
        .iter()
        .map(|v| v.as_u64().expect("index") as usize)
        .collect()
}

#[test]
fn text_head_trains_and_the_written_model_scores_what_the_report_says() {
    let dir = TempDir::new("train-head-text");
    let backbone = dir.path("tiny.apparate");
    write_random_bert(&backbone, &tiny_config(), None, DType::F32, 7).unwrap();
    let (texts, labels) = sentences(120, 1);
    let (data, lab) = (dir.path("t.txt"), dir.path("t.labels"));
    write_lines(&data, &texts);
    write_lines(&lab, &labels);
    let out = dir.path("tiny-head.apparate");
    let (code, stdout, err) = apparate(&[
        "train-head",
        "-m",
        s(&backbone),
        "--data",
        s(&data),
        "--labels",
        s(&lab),
        "-o",
        s(&out),
        "--epochs",
        "200",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(stdout.contains("held-out accuracy"), "{stdout}");
    // The report sits next to the model by default.
    let r = report(&dir.path("tiny-head.json"));
    assert_eq!(r["labels"], serde_json::json!(["cats", "dogs"]));
    assert_eq!(r["train_inputs"], 96);
    assert_eq!(r["held_out_inputs"], 24);
    let acc = r["held_out_accuracy"].as_f64().unwrap();
    // Separable classes (disjoint content words): a working head gets most of them.
    assert!(acc >= 0.8, "held-out accuracy {acc}");
    assert!((r["majority_accuracy"].as_f64().unwrap() - 0.5).abs() < 1e-9);

    let model = TextModel::load(cpu(), &out).expect("the written model loads");
    assert_eq!(model.encoder.labels(), ["cats", "dogs"]);
    let held = held_out(&r);
    let refs: Vec<&str> = held.iter().map(|&i| texts[i].as_str()).collect();
    let (preds, _) = model.classify(&refs, 1).unwrap();
    let right = preds
        .iter()
        .zip(&held)
        .filter(|(p, i)| p[0].label == labels[**i])
        .count();
    assert_eq!(right as f64 / held.len() as f64, acc);
    let meta = ModelFile::open(&out).unwrap().meta().clone();
    let prov = meta.provenance.last().expect("the head's provenance");
    assert!(prov.source.contains("train-head"), "{}", prov.source);
}

/// `n` 28x28 grey images of a bright bar: horizontal (`h`) or vertical (`v`), at a random
/// place, over noise.
fn bar_image(path: &Path, horizontal: bool, rng: &mut SplitMix) {
    let at = 4 + rng.below(20);
    let img = image::GrayImage::from_fn(28, 28, |x, y| {
        let on = if horizontal { y as usize } else { x as usize };
        let v = if on.abs_diff(at) <= 1 {
            230
        } else {
            rng.below(40) as u8
        };
        image::Luma([v])
    });
    img.save(path).expect("png written");
}

fn image_folders(dir: &Path, per_class: usize) -> Vec<(PathBuf, &'static str)> {
    let mut rng = SplitMix::new(3);
    let mut all = Vec::new();
    for (label, horizontal) in [("horizontal", true), ("vertical", false)] {
        let sub = dir.join(label);
        std::fs::create_dir_all(&sub).unwrap();
        for i in 0..per_class {
            let p = sub.join(format!("{i:03}.png"));
            bar_image(&p, horizontal, &mut rng);
            all.push((p, label));
        }
    }
    all
}

/// Predicted label of each image by the written CNN.
fn cnn_answers(model: &Path, files: &[PathBuf]) -> Vec<String> {
    let file = ModelFile::open(model).expect("the written model loads");
    let bb = Backbone::load(cpu(), &file).unwrap();
    let input = bb.image_input().unwrap().clone();
    let mut pixels = Vec::new();
    for f in files {
        pixels.extend(apparate::vision::load_image(f, &input).unwrap());
    }
    let batch = bb.prepare_images(pixels, files.len()).unwrap();
    let last = bb.forward(&batch).unwrap();
    bb.predictions(&last)
        .unwrap()
        .into_iter()
        .map(|c| bb.labels()[c as usize].clone())
        .collect()
}

#[test]
fn image_head_from_class_folders_and_from_a_list() {
    let dir = TempDir::new("train-head-img");
    let data = dir.path("bars");
    let all = image_folders(&data, 20);
    // Class sub-folders: file order = class folders in name order, files in name order.
    let out = dir.path("bars.apparate");
    let rep = dir.path("bars-report.json");
    let (code, _, err) = apparate(&[
        "train-head",
        "-m",
        MNIST,
        "--data",
        s(&data),
        "-o",
        s(&out),
        "--report",
        s(&rep),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let r = report(&rep);
    assert_eq!(r["labels"], serde_json::json!(["horizontal", "vertical"]));
    assert_eq!(r["train_inputs"].as_u64().unwrap(), 32);
    let acc = r["held_out_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.75, "held-out accuracy {acc}");
    let held = held_out(&r);
    let files: Vec<PathBuf> = held.iter().map(|&i| all[i].0.clone()).collect();
    let answers = cnn_answers(&out, &files);
    let right = answers
        .iter()
        .zip(&held)
        .filter(|(a, i)| a.as_str() == all[**i].1)
        .count();
    assert_eq!(right as f64 / held.len() as f64, acc);

    // The same images through a list (tab-separated, relative to --data), in another order.
    let list = dir.path("list.tsv");
    let lines: Vec<String> = all
        .iter()
        .rev()
        .map(|(p, l)| format!("{}\t{l}", p.strip_prefix(&data).unwrap().display()))
        .collect();
    write_lines(&list, &lines);
    let out2 = dir.path("bars2.apparate");
    let (code, _, err) = apparate(&[
        "train-head",
        "-m",
        MNIST,
        "--data",
        s(&data),
        "--labels",
        s(&list),
        "-o",
        s(&out2),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let r2 = report(&dir.path("bars2.json"));
    assert_eq!(r2["labels"], r["labels"]);
    assert_eq!(r2["held_out_inputs"], r["held_out_inputs"]);
}

#[test]
fn bad_input_is_refused_with_a_message_naming_it() {
    let dir = TempDir::new("train-head-bad");
    let backbone = dir.path("tiny.apparate");
    write_random_bert(&backbone, &tiny_config(), None, DType::F32, 7).unwrap();
    let b = s(&backbone);
    let (texts, labels) = sentences(20, 2);
    let t = dir.path("t.txt");
    write_lines(&t, &texts);
    let out = dir.path("o.apparate");
    let o = s(&out);
    let case = |name: &str, lines: &[String]| {
        let p = dir.path(name);
        write_lines(&p, lines);
        p
    };

    let short = case("short.labels", &labels[..19]);
    refused(
        &[
            "train-head",
            "-m",
            b,
            "--data",
            s(&t),
            "--labels",
            s(&short),
            "-o",
            o,
        ],
        &["20 texts", "19 labels"],
    );
    let one = case("one.labels", &vec!["cats".to_string(); 20]);
    refused(
        &[
            "train-head",
            "-m",
            b,
            "--data",
            s(&t),
            "--labels",
            s(&one),
            "-o",
            o,
        ],
        &["`cats`", "two classes"],
    );
    let mut gap = texts.clone();
    gap[4] = "  ".into();
    let gap = case("gap.txt", &gap);
    let lab = case("ok.labels", &labels);
    refused(
        &[
            "train-head",
            "-m",
            b,
            "--data",
            s(&gap),
            "--labels",
            s(&lab),
            "-o",
            o,
        ],
        &["line 5 is empty"],
    );
    refused(
        &["train-head", "-m", b, "--data", s(&t), "-o", o],
        &["needs --labels"],
    );
    refused(
        &[
            "train-head",
            "-m",
            b,
            "--data",
            s(&t),
            "--labels",
            s(&lab),
            "-o",
            b,
        ],
        &["the backbone itself"],
    );
    refused(
        &[
            "train-head",
            "-m",
            b,
            "--data",
            s(&t),
            "--labels",
            s(&lab),
            "-o",
            o,
            "--holdout-fraction",
            "1",
        ],
        &["--holdout-fraction"],
    );
    // Texts for an image model, images for a text model.
    refused(
        &[
            "train-head",
            "-m",
            MNIST,
            "--data",
            s(&t),
            "--labels",
            s(&lab),
            "-o",
            o,
        ],
        &["image model"],
    );
    let imgs = dir.path("imgs");
    image_folders(&imgs, 2);
    refused(
        &["train-head", "-m", b, "--data", s(&imgs), "-o", o],
        &["text model"],
    );
    // A folder without class sub-folders; a list naming a missing file.
    let flat = dir.path("flat");
    std::fs::create_dir_all(&flat).unwrap();
    refused(
        &["train-head", "-m", MNIST, "--data", s(&flat), "-o", o],
        &["no class sub-folders"],
    );
    let list = case("missing.tsv", &["nope.png\thorizontal".to_string()]);
    refused(
        &[
            "train-head",
            "-m",
            MNIST,
            "--data",
            s(&imgs),
            "--labels",
            s(&list),
            "-o",
            o,
        ],
        &["line 1", "is not a file"],
    );
    // Not a model file at all.
    refused(
        &[
            "train-head",
            "-m",
            s(&t),
            "--data",
            s(&t),
            "--labels",
            s(&lab),
            "-o",
            o,
        ],
        &["t.txt"],
    );
    assert!(!out.exists(), "a refused run wrote {}", out.display());
    let report = dir.path("o.json");
    assert!(!report.exists(), "a refused run left {}", report.display());
}

/// `n` 64x48 colour images per class: warm (red-orange) or cold (blue-green) blobs over noise.
fn colour_folders(dir: &Path, per_class: usize) -> Vec<(PathBuf, &'static str)> {
    let mut rng = SplitMix::new(5);
    let mut all = Vec::new();
    for (label, warm) in [("cold", false), ("warm", true)] {
        let sub = dir.join(label);
        std::fs::create_dir_all(&sub).unwrap();
        for i in 0..per_class {
            let (cx, cy) = (16 + rng.below(32), 12 + rng.below(24));
            let img = image::RgbImage::from_fn(64, 48, |x, y| {
                let inside =
                    (x as usize).abs_diff(cx).pow(2) + (y as usize).abs_diff(cy).pow(2) < 150;
                let n = rng.below(30) as u8;
                match (inside, warm) {
                    (true, true) => image::Rgb([220, 90 + n, n]),
                    (true, false) => image::Rgb([n, 120 + n, 210]),
                    _ => image::Rgb([60 + n, 60 + n, 60 + n]),
                }
            });
            let p = sub.join(format!("{i:03}.png"));
            img.save(&p).expect("png written");
            all.push((p, label));
        }
    }
    all
}

/// The real EfficientNet-Lite0, whose last block runs a convolution and the global pooling
/// before its classifier: the features come from running that block up to the classifier here,
/// and the written model runs the whole block with the new classifier. Equal accuracies on the
/// held-out images mean both read the same features.
#[test]
fn image_head_on_efficientnet_reads_the_features_its_classifier_read() {
    let model = common::weights_file("efficientnet-lite0.apparate");
    let dir = TempDir::new("train-head-effnet");
    let data = dir.path("colours");
    let all = colour_folders(&data, 10);
    let out = dir.path("colours.apparate");
    let (code, _, err) = apparate(&[
        "train-head",
        "-m",
        s(&model),
        "--data",
        s(&data),
        "-o",
        s(&out),
        "--batch-size",
        "8",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let r = report(&dir.path("colours.json"));
    assert_eq!(r["features"], 1280);
    let held = held_out(&r);
    let files: Vec<PathBuf> = held.iter().map(|&i| all[i].0.clone()).collect();
    let answers = cnn_answers(&out, &files);
    let right = answers
        .iter()
        .zip(&held)
        .filter(|(a, i)| a.as_str() == all[**i].1)
        .count();
    assert_eq!(
        right as f64 / held.len() as f64,
        r["held_out_accuracy"].as_f64().unwrap()
    );
    assert!(r["held_out_accuracy"].as_f64().unwrap() >= 0.75, "{r}");
}

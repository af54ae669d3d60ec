//! Ramp training end to end (features -> heads -> ramps file -> fused kernel on held-out
//! inputs), profiles, and the bad inputs of both.

mod common;

use apparate::backbone::Backbone;
use apparate::backend::Backend;
use apparate::backend::emu::{EmuConfig, EmuDevice};
use apparate::backend::gpu::GpuBackend;
use apparate::dataset::{Inputs, Prefix, load_stream};
use apparate::format::{ModelFile, RampsFile};
use apparate::models::bert::synthetic::{TINY_WORDS, tiny_config, write_random_bert};
use apparate::profile::{Profile, ProfileConfig, measure};
use apparate::ramps::Ramps;
use apparate::ramps::bootstrap::{BootstrapConfig, train_ramps};
use apparate::ramps::train::TrainConfig;
use apparate::rng::SplitMix;
use apparate::tensor::DType;
use common::{TempDir, cpu, weights_file, workload_file};

fn tiny_texts(n: usize, seed: u64) -> Vec<String> {
    let mut rng = SplitMix::new(seed);
    (0..n)
        .map(|_| {
            let len = 2 + rng.below(10);
            (0..len)
                .map(|_| TINY_WORDS[rng.below(TINY_WORDS.len())])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

fn quick() -> BootstrapConfig {
    BootstrapConfig {
        batch_size: 16,
        train: TrainConfig {
            epochs: 15,
            ..TrainConfig::default()
        },
        ..BootstrapConfig::default()
    }
}

fn no_progress() -> impl FnMut(&str, usize, usize) {
    |_, _, _| {}
}

#[test]
fn tiny_bert_ramps_train_load_and_match_across_backends() {
    let dir = TempDir::new("ramps-bert");
    let model = dir.path("m.apparate");
    write_random_bert(&model, &tiny_config(), Some(3), DType::F32, 11).unwrap();
    let file = ModelFile::open(&model).unwrap();
    let backbone = Backbone::load(cpu(), &file).unwrap();
    let inputs = Inputs::Texts(tiny_texts(120, 5));
    let out = dir.path("m.ramps");
    let report = train_ramps(
        &backbone,
        &file,
        &inputs,
        &out,
        &quick(),
        &mut no_progress(),
    )
    .unwrap();
    // One ramp per encoder layer, 2-layer heads (the tiny model has a pooler).
    let points: Vec<&str> = report.ramps.iter().map(|r| r.point.as_str()).collect();
    assert_eq!(points, ["layer.0", "layer.1"]);
    assert!(report.ramps.iter().all(|r| r.head == "dense_tanh_linear"));
    assert_eq!((report.train_inputs, report.heldout_inputs), (108, 12));
    assert_eq!(report.label_counts.iter().sum::<usize>(), 120);
    for r in &report.ramps {
        assert!((0.0..=1.0).contains(&r.heldout_agreement), "{r:?}");
        assert!(r.final_loss.is_finite());
        // Raising the threshold never lowers the exit rate.
        assert!(r.curve.windows(2).all(|w| w[0].exit_rate <= w[1].exit_rate));
    }
    // Same seed, same bytes.
    let again = dir.path("again.ramps");
    train_ramps(
        &backbone,
        &file,
        &inputs,
        &again,
        &quick(),
        &mut no_progress(),
    )
    .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());

    // The trained ramps decide the same on the emulated GPU as on the CPU.
    let ramps_file = RampsFile::open(&out, &file).unwrap();
    let emu = GpuBackend::new(EmuDevice::new(EmuConfig::default()).unwrap(), DType::F32);
    let gpu_backbone = Backbone::load(emu, &file).unwrap();
    let (cpu_ramps, gpu_ramps) = (
        Ramps::load(&backbone, &ramps_file).unwrap(),
        Ramps::load(&gpu_backbone, &ramps_file).unwrap(),
    );
    let decide = |b: &dyn Fn() -> Vec<(u32, f32)>| b();
    let batch_cpu = inputs.batch(&backbone, 0..9).unwrap();
    let batch_gpu = inputs.batch(&gpu_backbone, 0..9).unwrap();
    let cpu_d = decide(&|| {
        let t = backbone.backend().upload(&[0.5], &[1]).unwrap();
        let x0 = backbone.run_stage(0, &batch_cpu, None).unwrap();
        let x1 = backbone.run_stage(1, &batch_cpu, Some(x0)).unwrap();
        cpu_ramps
            .check(&backbone, 0, &x1, &t)
            .unwrap()
            .iter()
            .map(|d| (d.class, d.uncertainty))
            .collect()
    });
    let gpu_d = decide(&|| {
        let t = gpu_backbone.backend().upload(&[0.5], &[1]).unwrap();
        let x0 = gpu_backbone.run_stage(0, &batch_gpu, None).unwrap();
        let x1 = gpu_backbone.run_stage(1, &batch_gpu, Some(x0)).unwrap();
        gpu_ramps
            .check(&gpu_backbone, 0, &x1, &t)
            .unwrap()
            .iter()
            .map(|d| (d.class, d.uncertainty))
            .collect()
    });
    for (c, g) in cpu_d.iter().zip(&gpu_d) {
        assert_eq!(c.0, g.0);
        assert!((c.1 - g.1).abs() < 1e-4, "{cpu_d:?} vs {gpu_d:?}");
    }
}

#[test]
fn vision_workload_ramps_agree_with_the_model() {
    let (file, backbone, inputs) = mnist_bootstrap();
    assert_eq!(inputs.len(), 2000);
    let dir = TempDir::new("ramps-mnist");
    let report = train_ramps(
        &backbone,
        &file,
        &inputs,
        &dir.path("mnist.ramps"),
        &BootstrapConfig::default(),
        &mut no_progress(),
    )
    .unwrap();
    assert_eq!(report.heldout_inputs, 200);
    let agr: Vec<f32> = report.ramps.iter().map(|r| r.heldout_agreement).collect();
    // Deep ramps see almost what the classifier sees; shallow ones much less.
    assert!(*agr.last().unwrap() >= 0.95, "{agr:?}");
    assert!(agr[0] < *agr.last().unwrap(), "{agr:?}");
}

#[test]
fn bad_bootstrap_data_is_a_clear_error() {
    let dir = TempDir::new("ramps-bad");
    let model = dir.path("m.apparate");
    write_random_bert(&model, &tiny_config(), Some(3), DType::F32, 3).unwrap();
    let file = ModelFile::open(&model).unwrap();
    let backbone = Backbone::load(cpu(), &file).unwrap();
    let err = |r: apparate::Result<Inputs>| r.unwrap_err().to_string();
    let mut p = |_: usize, _: usize| {};

    // An empty stream, a folder, a binary file: for a text model.
    let blank = dir.path("blank.txt");
    std::fs::write(&blank, "\n  \n\n").unwrap();
    assert!(
        err(load_stream(&blank, None, Prefix::Fraction(0.1), &mut p)).contains("holds no inputs")
    );
    assert!(err(load_stream(&dir.0, None, Prefix::Fraction(0.1), &mut p)).contains("is a folder"));
    let bin = dir.path("bin.txt");
    std::fs::write(&bin, [0u8, 159, 146, 150]).unwrap();
    assert!(err(load_stream(&bin, None, Prefix::Fraction(0.1), &mut p)).contains("not UTF-8"));
    assert!(err(load_stream(&blank, None, Prefix::Fraction(0.0), &mut p)).contains("fraction"));

    // Image data of the wrong kind or shape for an image model.
    let mnist = ModelFile::open(weights_file("mnist-resnet.apparate")).unwrap();
    let cnn = Backbone::load(cpu(), &mnist).unwrap();
    let img = cnn.image_input();
    let e = err(load_stream(&blank, img, Prefix::Fraction(1.0), &mut p));
    assert!(e.contains("folder of images or a .safetensors"), "{e}");
    let wrong = dir.path("wrong.safetensors");
    let data = vec![0u8; 2 * 32 * 32 * 3];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![2, 32, 32, 3], &data)
            .unwrap();
    safetensors::serialize_to_file([("images", view)], None, &wrong).unwrap();
    let e = err(load_stream(&wrong, img, Prefix::Fraction(1.0), &mut p));
    assert!(
        e.contains("[2, 32, 32, 3]") && e.contains("[n, 28, 28, 1]"),
        "{e}"
    );
    let empty_dir = dir.path("no-images");
    std::fs::create_dir_all(&empty_dir).unwrap();
    assert!(err(load_stream(&empty_dir, img, Prefix::Fraction(1.0), &mut p)).contains("no .png"));
    // A text model given images (and the reverse) at batch time.
    let images = Inputs::Images {
        pixels: vec![0.0; 784],
        count: 1,
        per_image: 784,
    };
    assert!(
        images
            .batch(&backbone, 0..1)
            .err()
            .unwrap()
            .to_string()
            .contains("text model")
    );

    // Too few inputs, a point that is not eligible, a model without a head.
    let run = |inputs: &Inputs, cfg: &BootstrapConfig, f: &ModelFile, b: &Backbone<_>| {
        train_ramps(b, f, inputs, &dir.path("x.ramps"), cfg, &mut no_progress())
            .unwrap_err()
            .to_string()
    };
    let two = Inputs::Texts(tiny_texts(2, 1));
    assert!(run(&two, &quick(), &file, &backbone).contains("too few"));
    let some = Inputs::Texts(tiny_texts(40, 1));
    let cfg = BootstrapConfig {
        points: Some(vec!["head".into()]),
        ..quick()
    };
    let e = run(&some, &cfg, &file, &backbone);
    assert!(
        e.contains("not a ramp-eligible point") && e.contains("layer.0"),
        "{e}"
    );
    let bare = dir.path("bare.apparate");
    write_random_bert(&bare, &tiny_config(), None, DType::F32, 3).unwrap();
    let bare_file = ModelFile::open(&bare).unwrap();
    let bare_backbone = Backbone::load(cpu(), &bare_file).unwrap();
    assert!(run(&some, &quick(), &bare_file, &bare_backbone).contains("no classifier head"));
}

#[test]
fn profiles_time_every_stage_and_ramp_and_stay_on_their_device() {
    let dir = TempDir::new("profile");
    let model = dir.path("m.apparate");
    write_random_bert(&model, &tiny_config(), Some(3), DType::F32, 2).unwrap();
    let file = ModelFile::open(&model).unwrap();
    let backbone = Backbone::load(cpu(), &file).unwrap();
    let inputs = Inputs::Texts(tiny_texts(60, 9));
    let ramps_path = dir.path("m.ramps");
    train_ramps(
        &backbone,
        &file,
        &inputs,
        &ramps_path,
        &quick(),
        &mut no_progress(),
    )
    .unwrap();
    let rf = RampsFile::open(&ramps_path, &file).unwrap();
    let ramps = Ramps::load(&backbone, &rf).unwrap();
    let cfg = ProfileConfig {
        max_batch: 4,
        warmup: 1,
        repeats: 3,
    };
    let p = measure(
        &backbone,
        file.sha256(),
        Some((&ramps, "abc".into())),
        &inputs,
        &cfg,
        &mut |_, _, _| {},
    )
    .unwrap();
    assert_eq!(
        p.batches.iter().map(|b| b.batch).collect::<Vec<_>>(),
        [1, 2, 4]
    );
    for b in &p.batches {
        let names: Vec<&str> = b.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["embeddings", "layer.0", "layer.1", "head"]);
        assert_eq!(b.ramps.len(), 2);
        assert!(b.vanilla_ms() > 0.0 && b.stages.iter().all(|s| s.median_ms > 0.0));
        assert!(b.seq.is_some());
    }
    assert_eq!(p.device, backbone.backend().device_id());
    let path = dir.path("p.json");
    p.save(&path).unwrap();
    let back = Profile::load(&path, &p.device, file.sha256()).unwrap();
    // (JSON keeps floats to within rounding.)
    assert_eq!(
        (back.batches.len(), &back.device, &back.commit),
        (3, &p.device, &p.commit)
    );
    for (a, b) in back.batches.iter().zip(&p.batches) {
        assert!((a.vanilla_ms() - b.vanilla_ms()).abs() < 1e-9);
        assert_eq!(a.stages.len(), b.stages.len());
    }
    let e = Profile::load(&path, "cuda: NVIDIA H200 (sm_90), f16", file.sha256()).unwrap_err();
    assert!(e.to_string().contains("measured on"), "{e}");
    let e = Profile::load(&path, &p.device, "0000").unwrap_err();
    assert!(e.to_string().contains("measured for model"), "{e}");
    std::fs::write(&path, "{\"profile_version\": 1}").unwrap();
    assert!(
        Profile::load(&path, &p.device, file.sha256())
            .unwrap_err()
            .to_string()
            .contains("not a profile")
    );
}

/// Grid ramps (`ramps::grid`): on the MNIST ResNet the first block's 16 channels, averaged over
/// the whole image, tell little about the digit; averaged over a 4x4 grid they tell much more.
/// And the three paths that read a grid ramp agree: the host features the heads are trained and
/// scored on, the fused kernel on the CPU and on the emulated GPU, and the serving engine.
#[test]
fn grid_ramps_see_more_than_the_global_average_and_every_path_agrees() {
    use apparate::adapt::ApparateConfig;
    use apparate::ramps::host_heads;
    use apparate::serve::{Engine, Exit, Input};

    let model = weights_file("mnist-resnet.apparate");
    let (file, backbone, inputs) = mnist_bootstrap();
    let dir = TempDir::new("ramps-grid");
    let train = |grid: Option<usize>, name: &str| {
        let cfg = BootstrapConfig {
            points: Some(vec!["layer1.0".into(), "layer2.0".into()]),
            grid,
            ..BootstrapConfig::default()
        };
        let path = dir.path(name);
        let r = train_ramps(&backbone, &file, &inputs, &path, &cfg, &mut no_progress()).unwrap();
        (r, path)
    };
    let (global, _) = train(Some(1), "global.ramps");
    let (auto, path) = train(None, "grid.ramps");
    let grids: Vec<(usize, usize)> = auto.ramps.iter().map(|r| (r.grid, r.width)).collect();
    // 28x28x16 and 14x14x32: the finest grid under 1,024 values is 4x4 at both.
    assert_eq!(grids, [(4, 256), (4, 512)]);
    let (g0, a0) = (
        global.ramps[0].heldout_agreement,
        auto.ramps[0].heldout_agreement,
    );
    assert!(a0 >= g0 + 0.15, "layer1.0 held out: global {g0}, grid {a0}");
    // A grid that does not fit the image is refused by name.
    let cfg = BootstrapConfig {
        grid: Some(29),
        ..BootstrapConfig::default()
    };
    let e = train_ramps(
        &backbone,
        &file,
        &inputs,
        &dir.path("x.ramps"),
        &cfg,
        &mut no_progress(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("grid 29") && e.contains("28x28"), "{e}");

    // Host features + host head == fused kernel (CPU) == fused kernel (emulated GPU).
    let ramps_file = RampsFile::open(&path, &file).unwrap();
    let heads = host_heads(&backbone, &ramps_file).unwrap();
    let emu = GpuBackend::new(EmuDevice::new(EmuConfig::default()).unwrap(), DType::F32);
    let gpu_backbone = Backbone::load(emu, &file).unwrap();
    let sample = inputs.slice(1800..1809);
    let decisions = [
        grid_decisions(&backbone, &ramps_file, &heads, &sample),
        grid_decisions(&gpu_backbone, &ramps_file, &heads, &sample),
    ];
    for (c, g) in decisions[0]
        .iter()
        .flatten()
        .zip(decisions[1].iter().flatten())
    {
        assert_eq!(c.class, g.class);
        assert!((c.uncertainty - g.uncertainty).abs() < 1e-3);
    }

    // The engine releases at the grid ramp what the host head predicts there.
    let engine = Engine::builder(&model)
        .ramps(&path)
        .apparate(ApparateConfig {
            fixed: Some(vec![("layer1.0".into(), 0.5)]),
            ..ApparateConfig::vision()
        })
        .build_on(cpu())
        .unwrap();
    let mut exited = 0;
    for (i, d) in decisions[0][0].iter().enumerate() {
        let Inputs::Images {
            pixels, per_image, ..
        } = &sample
        else {
            unreachable!("an image stream")
        };
        let x = pixels[i * per_image..][..*per_image].to_vec();
        let r = engine.infer_blocking(Input::Normalized(x)).unwrap();
        if let Exit::Ramp { point, .. } = &r.exit {
            assert_eq!(point, "layer1.0");
            assert_eq!(r.class, d.class as usize);
            exited += 1;
        }
        // The same rule as the kernel's decision at threshold 0.5.
        assert_eq!(
            matches!(r.exit, Exit::Ramp { .. }),
            d.uncertainty < 0.5,
            "{i}"
        );
    }
    assert!(exited > 0, "nothing exited at layer1.0 with threshold 0.5");
}

/// The fused kernel's decisions at every ramp of `file` on `inputs` (threshold 0), checked
/// against the host heads on the host features of the same outputs.
fn grid_decisions<B: Backend>(
    b: &Backbone<B>,
    file: &RampsFile,
    heads: &[apparate::ramps::train::TrainedHead],
    inputs: &Inputs,
) -> Vec<Vec<apparate::backend::RampDecision>> {
    let ramps = Ramps::load(b, file).unwrap();
    let never = b.backend().upload(&[0.0], &[1]).unwrap();
    let batch = inputs.batch(b, 0..inputs.len()).unwrap();
    let mut host = Vec::new();
    let mut kernel = Vec::new();
    b.run_stages(&batch, |s, o| {
        if let Some(r) = ramps.at_stage(s) {
            host.push(heads[r].predict(&b.pooled_features(o, ramps.grid(r))?));
            kernel.push(ramps.check(b, r, o, &never)?);
        }
        Ok(())
    })
    .unwrap();
    for (h, k) in host.iter().zip(&kernel) {
        // `predict` gives (class, u = 1 - max p), as the kernel does.
        for ((hc, hu), d) in h.iter().zip(k) {
            assert_eq!(*hc, d.class, "{}", b.backend().name());
            assert!(
                (hu - d.uncertainty).abs() < 1e-4,
                "host u {hu} vs kernel u {}",
                d.uncertainty
            );
        }
    }
    kernel
}

/// The MNIST ResNet on the CPU and its workload's bootstrap set (the first 10% of the stream).
fn mnist_bootstrap() -> (
    ModelFile,
    Backbone<apparate::backend::cpu::CpuBackend>,
    Inputs,
) {
    let file = ModelFile::open(weights_file("mnist-resnet.apparate")).unwrap();
    let backbone = Backbone::load(cpu(), &file).unwrap();
    let inputs = load_stream(
        &workload_file("mnist-stream.safetensors"),
        backbone.image_input(),
        Prefix::Fraction(0.1),
        &mut |_, _| {},
    )
    .unwrap();
    (file, backbone, inputs)
}

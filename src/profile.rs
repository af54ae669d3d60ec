//! Measured costs of every stage and every ramp, per batch size, on one device (Apparate section
//! 5): the latency model of threshold tuning and ramp adjustment reads `V(r)`, `V` and `o(r)`
//! from here, never from constants.
//!
//! A profile is a JSON file. It names the device it was taken on ([`Backend::device_id`]: the
//! processor or GPU, thread count, storage dtype) and the model file's sha256; loading it for
//! another device or model is refused, because those timings would be fiction there.

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backbone::Backbone;
use crate::backend::Backend;
use crate::dataset::Inputs;
use crate::error::{Error, Result};
use crate::ramps::Ramps;

/// Version of the profile file layout.
pub const PROFILE_VERSION: u32 = 1;

/// Settings of [`measure`].
#[derive(Clone, Debug)]
pub struct ProfileConfig {
    /// Largest batch size measured; sizes are 1, 2, 4, ... up to it (and it). Default 16.
    pub max_batch: usize,
    /// Untimed runs per batch size before measuring (caches, JIT, allocator). Default 2.
    pub warmup: usize,
    /// Timed runs per batch size; the median is kept. Default 10.
    pub repeats: usize,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        ProfileConfig {
            max_batch: 16,
            warmup: 2,
            repeats: 10,
        }
    }
}

/// Median, fastest and slowest of the timed runs, in milliseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    pub name: String,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

impl Timing {
    fn of(name: &str, mut samples: Vec<f64>) -> Timing {
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let median = if n == 0 {
            0.0
        } else if n % 2 == 1 {
            samples[n / 2]
        } else {
            (samples[n / 2 - 1] + samples[n / 2]) / 2.0
        };
        Timing {
            name: name.to_string(),
            median_ms: median,
            min_ms: samples.first().copied().unwrap_or(0.0),
            max_ms: samples.last().copied().unwrap_or(0.0),
        }
    }
}

/// Timings at one batch size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchProfile {
    pub batch: usize,
    /// Padded sequence length of the measured batch (text models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<usize>,
    /// Every stage, in order (each timed alone, synchronised before and after).
    pub stages: Vec<Timing>,
    /// Every ramp of the ramps file (fused kernel + reading its decisions back), stage order.
    pub ramps: Vec<Timing>,
    /// The whole model without ramps, run straight through (no per-stage synchronisation).
    pub vanilla: Timing,
}

impl BatchProfile {
    /// `V`: the model's latency without ramps (the straight-through median).
    pub fn vanilla_ms(&self) -> f64 {
        self.vanilla.median_ms
    }

    /// `V(r)`: backbone time from the input to the end of stage `name` (sum of stage medians,
    /// scaled so that all stages add up to `V`).
    pub fn until_ms(&self, name: &str) -> Option<f64> {
        let i = self.stages.iter().position(|s| s.name == name)?;
        let all: f64 = self.stages.iter().map(|s| s.median_ms).sum();
        let part: f64 = self.stages[..=i].iter().map(|s| s.median_ms).sum();
        Some(if all > 0.0 {
            part / all * self.vanilla_ms()
        } else {
            0.0
        })
    }

    /// `o(r)`: the cost of the ramp at `point`.
    pub fn ramp_ms(&self, point: &str) -> Option<f64> {
        self.ramps
            .iter()
            .find(|r| r.name == point)
            .map(|r| r.median_ms)
    }
}

/// A measured profile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub profile_version: u32,
    /// [`Backend::device_id`] of where it was measured.
    pub device: String,
    pub apparate_version: String,
    /// Source revision of the build that measured (see [`build_commit`]).
    pub commit: String,
    pub model_sha256: String,
    /// sha256 of the ramps file whose ramps were timed, if any.
    pub ramps_sha256: Option<String>,
    pub warmup: usize,
    pub repeats: usize,
    /// Wall time the measurement took (its cost), seconds.
    pub measure_seconds: f64,
    pub batches: Vec<BatchProfile>,
}

impl Profile {
    /// The profile of batch size `batch`, or of the smallest measured size above it, or the
    /// largest.
    pub fn for_batch(&self, batch: usize) -> Option<&BatchProfile> {
        self.batches
            .iter()
            .find(|b| b.batch >= batch)
            .or(self.batches.last())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("a profile serializes");
        let tmp = path.with_extension("partial");
        std::fs::write(&tmp, text + "\n").map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    /// Reads a profile and checks that it was taken on `device` for the model `model_sha256`.
    pub fn load(path: &Path, device: &str, model_sha256: &str) -> Result<Profile> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let p: Profile = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not a profile: {e}")))?;
        if p.profile_version != PROFILE_VERSION {
            return Err(Error::format(
                path,
                format!(
                    "profile version {} (this build reads {PROFILE_VERSION})",
                    p.profile_version
                ),
            ));
        }
        if p.device != device {
            return Err(Error::format(
                path,
                format!(
                    "measured on `{}`, but this is `{device}`: timings do not carry over \
                     between devices; run `apparate profile` here",
                    p.device
                ),
            ));
        }
        if p.model_sha256 != model_sha256 {
            return Err(Error::format(
                path,
                format!(
                    "measured for model {}, not this one ({model_sha256})",
                    p.model_sha256
                ),
            ));
        }
        if p.batches.is_empty() {
            return Err(Error::format(path, "holds no batch sizes"));
        }
        Ok(p)
    }
}

/// The source revision: `APPARATE_COMMIT` if set (CI, packagers), else `git describe` of the
/// source tree this binary was built from, else `unknown`.
pub fn build_commit() -> String {
    if let Ok(c) = std::env::var("APPARATE_COMMIT")
        && !c.is_empty()
    {
        return c;
    }
    std::process::Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR")])
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Batch sizes 1, 2, 4, ... up to `max` (and `max` itself).
pub fn batch_sizes(max: usize) -> Vec<usize> {
    let mut v: Vec<usize> = std::iter::successors(Some(1usize), |b| b.checked_mul(2))
        .take_while(|&b| b < max)
        .collect();
    if max > 0 {
        v.push(max);
    }
    v
}

/// Measures every stage and every ramp of `backbone` at each batch size, on inputs taken from
/// `inputs` (cycled to fill a batch). `progress(batch_size, index, count)`.
pub fn measure<B: Backend>(
    backbone: &Backbone<B>,
    model_sha256: &str,
    ramps: Option<(&Ramps<B::Tensor>, String)>,
    inputs: &Inputs,
    cfg: &ProfileConfig,
    progress: &mut dyn FnMut(usize, usize, usize),
) -> Result<Profile> {
    if cfg.max_batch == 0 || cfg.repeats == 0 {
        return Err(Error::Input(
            "the largest batch and the number of repeats must be at least 1".into(),
        ));
    }
    if inputs.is_empty() {
        return Err(Error::Input("no inputs to profile with".into()));
    }
    let t_all = Instant::now();
    let be = backbone.backend();
    let names: Vec<String> = backbone
        .graph()
        .stages
        .iter()
        .map(|s| s.name.clone())
        .collect();
    let never = be.upload(&[0.0], &[1])?;
    let sizes = batch_sizes(cfg.max_batch);
    let mut batches = Vec::new();
    for (k, &b) in sizes.iter().enumerate() {
        progress(b, k, sizes.len());
        let batch = cycled(inputs, b).batch(backbone, 0..b)?;
        let seq = match &batch {
            crate::backbone::BatchInput::Text(e) => Some(e.shape.seq),
            _ => None,
        };
        let mut stage_samples = vec![Vec::new(); names.len()];
        let mut ramp_samples = vec![Vec::new(); ramps.as_ref().map_or(0, |r| r.0.len())];
        let mut vanilla = Vec::new();
        for rep in 0..cfg.warmup + cfg.repeats {
            let timed = rep >= cfg.warmup;
            // Straight through, as the plain model runs.
            be.synchronize()?;
            let t = Instant::now();
            let last = backbone.forward(&batch)?;
            be.synchronize()?;
            drop(last);
            if timed {
                vanilla.push(t.elapsed().as_secs_f64() * 1e3);
            }
            // Stage by stage, each ramp right after its stage; a stage's clock starts when the
            // previous stage (and its ramp) is done.
            let mut t = Instant::now();
            backbone.run_stages(&batch, |s, o| {
                be.synchronize()?;
                if timed && let Some(samples) = stage_samples.get_mut(s) {
                    samples.push(t.elapsed().as_secs_f64() * 1e3);
                }
                if let Some((r, _)) = &ramps
                    && let Some(i) = r.at_stage(s)
                {
                    let t = Instant::now();
                    r.check(backbone, i, o, &never)?;
                    if timed {
                        ramp_samples[i].push(t.elapsed().as_secs_f64() * 1e3);
                    }
                }
                t = Instant::now();
                Ok(())
            })?;
        }
        batches.push(BatchProfile {
            batch: b,
            seq,
            stages: names
                .iter()
                .zip(stage_samples)
                .map(|(n, s)| Timing::of(n, s))
                .collect(),
            ramps: ramps
                .as_ref()
                .map(|(r, _)| {
                    r.iter()
                        .zip(&ramp_samples)
                        .map(|(ramp, s)| Timing::of(&ramp.point, s.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            vanilla: Timing::of("model", vanilla),
        });
    }
    progress(cfg.max_batch, sizes.len(), sizes.len());
    Ok(Profile {
        profile_version: PROFILE_VERSION,
        device: be.device_id(),
        apparate_version: env!("CARGO_PKG_VERSION").to_string(),
        commit: build_commit(),
        model_sha256: model_sha256.to_string(),
        ramps_sha256: ramps.map(|(_, sha)| sha),
        warmup: cfg.warmup,
        repeats: cfg.repeats,
        measure_seconds: t_all.elapsed().as_secs_f64(),
        batches,
    })
}

/// `n` inputs taken from `inputs` in order, wrapping around.
fn cycled(inputs: &Inputs, n: usize) -> Inputs {
    match inputs {
        Inputs::Texts(t) => Inputs::Texts((0..n).map(|i| t[i % t.len()].clone()).collect()),
        Inputs::Images {
            pixels,
            count,
            per_image,
        } => Inputs::Images {
            pixels: (0..n)
                .flat_map(|i| &pixels[(i % count) * per_image..][..*per_image])
                .copied()
                .collect(),
            count: n,
            per_image: *per_image,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_sizes_are_powers_of_two_then_the_max() {
        assert_eq!(batch_sizes(1), vec![1]);
        assert_eq!(batch_sizes(8), vec![1, 2, 4, 8]);
        assert_eq!(batch_sizes(12), vec![1, 2, 4, 8, 12]);
    }

    #[test]
    fn medians_and_cumulative_latency() {
        let t = Timing::of("x", vec![3.0, 1.0, 2.0, 10.0]);
        assert_eq!((t.median_ms, t.min_ms, t.max_ms), (2.5, 1.0, 10.0));
        let b = BatchProfile {
            batch: 1,
            seq: None,
            stages: ["a", "b", "c"]
                .iter()
                .zip([1.0, 2.0, 1.0])
                .map(|(n, v)| Timing::of(n, vec![v]))
                .collect(),
            ramps: vec![Timing::of("b", vec![0.1])],
            vanilla: Timing::of("model", vec![3.6]),
        };
        assert!((b.until_ms("b").unwrap() - 2.7).abs() < 1e-9);
        assert_eq!(b.until_ms("c"), Some(3.6));
        assert_eq!(b.ramp_ms("b"), Some(0.1));
        assert_eq!(b.until_ms("zz"), None);
    }
}

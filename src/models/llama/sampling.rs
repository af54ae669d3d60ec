//! Choosing the next token from logits: greedy at temperature 0 (on the backend, through
//! [`crate::backend::decoder::DecoderBackend::argmax`]), else temperature, top-k and top-p
//! (nucleus) sampling on the host, seeded so a run can be repeated.

use crate::error::{Error, Result};
use crate::rng::SplitMix;

/// How the next token is chosen. Defaults: greedy (temperature 0), no top-k or top-p cut.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct Sampling {
    /// Logits are divided by it before the softmax; 0 means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn check(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::config(
                "temperature",
                self.temperature,
                "0 (greedy) or a positive number",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::config("top_p", self.top_p, "(0, 1]"));
        }
        Ok(())
    }
}

/// A seeded sampler for one sequence.
pub struct Sampler {
    cfg: Sampling,
    rng: SplitMix,
}

impl Sampler {
    pub fn new(cfg: Sampling) -> Result<Sampler> {
        cfg.check()?;
        Ok(Sampler {
            cfg,
            rng: SplitMix::new(cfg.seed),
        })
    }

    pub fn config(&self) -> &Sampling {
        &self.cfg
    }

    /// A token drawn from `logits` (one row).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.is_greedy() || logits.len() < 2 {
            return argmax(logits);
        }
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        // Most likely first; ties by lower id, so a seed always gives the same draw.
        idx.sort_unstable_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if self.cfg.top_k > 0 {
            idx.truncate(self.cfg.top_k);
        }
        let t = self.cfg.temperature;
        let top = logits[idx[0] as usize];
        let mut p: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i as usize] - top) / t) as f64).exp())
            .collect();
        let z: f64 = p.iter().sum();
        p.iter_mut().for_each(|v| *v /= z);
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = p
                .iter()
                .position(|v| {
                    acc += v;
                    acc >= self.cfg.top_p as f64
                })
                .map_or(p.len(), |i| i + 1);
            p.truncate(keep);
        }
        let z: f64 = p.iter().sum();
        let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * z;
        let mut acc = 0.0;
        for (k, v) in p.iter().enumerate() {
            acc += v;
            if u < acc {
                return idx[k];
            }
        }
        idx[p.len() - 1]
    }
}

/// The index of the largest value: the lowest among equals, NaN never wins, 0 when every value
/// is NaN (the rule the backends' argmax follows too).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in x.iter().enumerate() {
        if !v.is_nan() && best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(Sampling::default()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.5]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_repeat() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 100) as f32 / 10.0).collect();
        let cfg = Sampling {
            temperature: 1.0,
            top_k: 1,
            ..Sampling::default()
        };
        let mut s = Sampler::new(cfg).unwrap();
        for _ in 0..10 {
            assert_eq!(s.sample(&logits), argmax(&logits));
        }
        let draw = |seed| {
            let mut s = Sampler::new(Sampling {
                temperature: 1.0,
                seed,
                ..Sampling::default()
            })
            .unwrap();
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_p_keeps_the_nucleus_and_frequencies_follow_the_softmax() {
        // p = softmax([ln 6, ln 3, ln 1]) = [0.6, 0.3, 0.1].
        let logits = [6f32.ln(), 3f32.ln(), 0.0];
        let mut s = Sampler::new(Sampling {
            temperature: 1.0,
            top_p: 0.85,
            seed: 1,
            ..Sampling::default()
        })
        .unwrap();
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            counts[s.sample(&logits) as usize] += 1;
        }
        assert_eq!(counts[2], 0, "outside the 0.85 nucleus: {counts:?}");
        let f0 = counts[0] as f64 / 20_000.0;
        assert!((f0 - 2.0 / 3.0).abs() < 0.02, "{counts:?}");
    }

    #[test]
    fn bad_settings_are_refused() {
        for cfg in [
            Sampling {
                temperature: -1.0,
                ..Sampling::default()
            },
            Sampling {
                top_p: 0.0,
                ..Sampling::default()
            },
            Sampling {
                temperature: f32::NAN,
                ..Sampling::default()
            },
        ] {
            assert!(Sampler::new(cfg).is_err(), "{cfg:?}");
        }
    }
}

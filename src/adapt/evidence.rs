//! The live loops' evidence (part 1): recent inputs with what every ramp said about them. Shadow
//! samples (and the bootstrap inputs) carry the pooled features of every candidate ramp point,
//! scored by the host copies of the heads, so every candidate ramp has live evidence; the other
//! batches add the active ramps' own outputs. Ramp sets and thresholds are chosen on it, and
//! the heads are retrained on its features.

use std::collections::VecDeque;
use std::sync::Arc;

use super::tuner::Samples;

/// A sample with features: `(seq, per-ramp features, the model's answer)`.
pub(crate) type Featured = (u64, Arc<Vec<Vec<f32>>>, u32);

/// One input.
#[derive(Clone, Debug)]
pub(crate) struct Sample {
    /// Position in the stream (bootstrap inputs first, then live ones in completion order).
    pub seq: u64,
    /// Per ramp of the file: `(u, its class == the model's answer)` under the serving head,
    /// when known.
    pub scores: Vec<Option<(f32, bool)>>,
    /// Per ramp of the file: the pooled features it reads (shadow and bootstrap samples).
    pub features: Option<Arc<Vec<Vec<f32>>>>,
    /// The model's answer.
    pub answer: u32,
}

/// The most recent samples, oldest first.
pub(crate) struct Evidence {
    samples: VecDeque<Sample>,
    capacity: usize,
}

impl Evidence {
    pub fn new(capacity: usize) -> Evidence {
        Evidence {
            samples: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn push(&mut self, s: Sample) {
        self.samples.push_back(s);
        while self.samples.len() > self.capacity {
            self.samples.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Drops every sample older than `seq` (a drift's estimated change point).
    pub fn keep_from(&mut self, seq: u64) {
        self.samples.retain(|s| s.seq >= seq);
    }

    /// The samples every ramp of `set` (ramps of the file) has scored, as tuner input (ramps
    /// in `set` order), and each row's sequence number.
    pub fn samples_and_seqs(&self, set: &[usize]) -> (Samples, Vec<u64>) {
        let (rows, seqs): (Vec<Vec<(f32, bool)>>, Vec<u64>) = self
            .samples
            .iter()
            .filter_map(|s| {
                set.iter()
                    .map(|&r| s.scores[r])
                    .collect::<Option<Vec<_>>>()
                    .map(|row| (row, s.seq))
            })
            .unzip();
        (Samples::from_rows(set.len(), &rows), seqs)
    }

    /// How many samples have features (what [`Evidence::featured`] would return, uncopied).
    pub fn featured_len(&self) -> usize {
        self.samples.iter().filter(|s| s.features.is_some()).count()
    }

    /// The samples with features: `(seq, features, answer)`, oldest first.
    pub fn featured(&self) -> Vec<Featured> {
        self.samples
            .iter()
            .filter_map(|s| s.features.clone().map(|f| (s.seq, f, s.answer)))
            .collect()
    }

    /// Ramp `r`'s scores under a new head: `scores` by sequence number (ascending) for the
    /// samples the new head scored; `rescore` scores a sample with features it did not see;
    /// samples without features lose ramp `r`'s score (it was the old head's).
    pub fn rescore(
        &mut self,
        r: usize,
        scores: &[(u64, (f32, bool))],
        mut rescore: impl FnMut(&[f32], u32) -> (f32, bool),
    ) {
        for s in self.samples.iter_mut() {
            s.scores[r] = match scores.binary_search_by_key(&s.seq, |x| x.0) {
                Ok(k) => Some(scores[k].1),
                Err(_) => s.features.as_ref().map(|f| rescore(&f[r], s.answer)),
            };
        }
    }
}

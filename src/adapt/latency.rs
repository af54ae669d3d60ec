//! The latency model of Apparate section 4, filled from a measured [`Profile`]: for active ramps
//! `r_0 < ... < r_{k-1}`, release latency `L_i = V(r_i) + sum_{j<=i} o(r_j)`, and for inputs that
//! do not exit `L_k = V + sum_j o(r_j)`.

use crate::profile::BatchProfile;

#[derive(Clone, Debug, PartialEq)]
pub struct LatencyModel {
    /// `V`: the model without ramps.
    pub vanilla_ms: f64,
    /// `V(r_i)`: backbone time up to each active ramp, in stage order.
    pub until_ms: Vec<f64>,
    /// `o(r_i)`: each active ramp's own cost.
    pub ramp_ms: Vec<f64>,
}

impl LatencyModel {
    /// The model for ramps at `points` (stage order) at one batch size; `None` when the profile
    /// lacks a stage or a ramp timing.
    pub fn from_profile(p: &BatchProfile, points: &[&str]) -> Option<LatencyModel> {
        Some(LatencyModel {
            vanilla_ms: p.vanilla_ms(),
            until_ms: points
                .iter()
                .map(|r| p.until_ms(r))
                .collect::<Option<_>>()?,
            ramp_ms: points.iter().map(|r| p.ramp_ms(r)).collect::<Option<_>>()?,
        })
    }

    /// `L_0 .. L_k` (`k + 1` values).
    pub fn release_ms(&self) -> Vec<f64> {
        let mut paid = 0.0;
        let mut l: Vec<f64> = self
            .until_ms
            .iter()
            .zip(&self.ramp_ms)
            .map(|(v, o)| {
                paid += o;
                v + paid
            })
            .collect();
        l.push(self.vanilla_ms + paid);
        l
    }

    /// Expected saving `(V - sum_i E_i L_i) / V` for exit fractions `E_0 .. E_k`.
    pub fn saving(&self, fractions: &[f64]) -> f64 {
        if self.vanilla_ms <= 0.0 {
            return 0.0;
        }
        let expected: f64 = self
            .release_ms()
            .iter()
            .zip(fractions)
            .map(|(l, e)| l * e)
            .sum();
        (self.vanilla_ms - expected) / self.vanilla_ms
    }

    /// Utility of each ramp (section 4.2): `E_i (L_{i+1} - L_i) - (sum_{m>i} E_m) o(r_i)`, the
    /// time it saves the inputs that exit there (until the next exit point) minus what it costs
    /// the inputs that pass it.
    pub fn utilities(&self, fractions: &[f64]) -> Vec<f64> {
        let l = self.release_ms();
        (0..self.ramp_ms.len())
            .map(|i| {
                let later: f64 = fractions[i + 1..].iter().sum();
                fractions[i] * (l[i + 1] - l[i]) - later * self.ramp_ms[i]
            })
            .collect()
    }

    /// Total ramp cost as a fraction of `V`.
    pub fn ramp_cost_fraction(&self) -> f64 {
        if self.vanilla_ms <= 0.0 {
            return 0.0;
        }
        self.ramp_ms.iter().sum::<f64>() / self.vanilla_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_latency_saving_and_utility() {
        let m = LatencyModel {
            vanilla_ms: 100.0,
            until_ms: vec![20.0, 60.0],
            ramp_ms: vec![1.0, 2.0],
        };
        assert_eq!(m.release_ms(), vec![21.0, 63.0, 103.0]);
        // Nobody exits: every input pays both ramps.
        assert!((m.saving(&[0.0, 0.0, 1.0]) + 0.03).abs() < 1e-12);
        // Half exit at ramp 0.
        assert!((m.saving(&[0.5, 0.0, 0.5]) - (100.0 - 10.5 - 51.5) / 100.0).abs() < 1e-12);
        let u = m.utilities(&[0.5, 0.0, 0.5]);
        assert!((u[0] - (0.5 * 42.0 - 0.5 * 1.0)).abs() < 1e-12);
        // Ramp 1 saves nobody and costs the half that passes it.
        assert!((u[1] + 0.5 * 2.0).abs() < 1e-12);
        assert!((m.ramp_cost_fraction() - 0.03).abs() < 1e-12);
    }
}

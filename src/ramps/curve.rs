//! How a trained ramp scores on labelled decisions: its agreement with the model and its exit
//! curve (exit rate and agreement over thresholds), as the training report shows them.

/// One point of a ramp's exit curve on labelled decisions.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CurvePoint {
    pub threshold: f32,
    /// Fraction of inputs with `u < threshold` (they would exit here).
    pub exit_rate: f32,
    /// Agreement with the model among the exiting inputs (1 when none exit).
    pub exited_agreement: f32,
    /// Agreement over all inputs if this were the only ramp (non-exiting inputs count as
    /// agreeing: they get the model's answer).
    pub overall_agreement: f32,
}

/// Thresholds the training report shows curves at.
pub const REPORT_THRESHOLDS: [f32; 10] = [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6];

/// The exit curve of one ramp's `(u, agrees with the model)` outputs.
pub fn exit_curve(outputs: &[(f32, bool)], thresholds: &[f32]) -> Vec<CurvePoint> {
    let n = outputs.len().max(1) as f32;
    thresholds
        .iter()
        .map(|&t| {
            let (mut exits, mut wrong) = (0usize, 0usize);
            for &(u, right) in outputs {
                if u < t {
                    exits += 1;
                    wrong += usize::from(!right);
                }
            }
            CurvePoint {
                threshold: t,
                exit_rate: exits as f32 / n,
                exited_agreement: if exits == 0 {
                    1.0
                } else {
                    1.0 - wrong as f32 / exits as f32
                },
                overall_agreement: 1.0 - wrong as f32 / n,
            }
        })
        .collect()
}

/// Fraction of outputs that agree with the model.
pub fn agreement(outputs: &[(f32, bool)]) -> f32 {
    outputs.iter().filter(|(_, right)| *right).count() as f32 / outputs.len().max(1) as f32
}

/// `(u, class == label)` of decisions against labels.
pub fn judged(decisions: &[(u32, f32)], labels: &[u32]) -> Vec<(f32, bool)> {
    decisions
        .iter()
        .zip(labels)
        .map(|((c, u), l)| (*u, c == l))
        .collect()
}

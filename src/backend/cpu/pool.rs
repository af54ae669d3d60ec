//! Token pooling: one vector per input from its token states (mean over the real tokens, or
//! the first).

use crate::backend::{BatchShape, Pooling};

pub(crate) fn pool(x: &[f32], shape: &BatchShape, cols: usize, kind: Pooling) -> Vec<f32> {
    let mut out = vec![0.0f32; shape.batch() * cols];
    for (b, o) in out.chunks_mut(cols).enumerate() {
        let first = b * shape.seq;
        match kind {
            Pooling::Cls => o.copy_from_slice(&x[first * cols..(first + 1) * cols]),
            Pooling::Mean => {
                let len = shape.lengths[b];
                for r in first..first + len {
                    for (o, v) in o.iter_mut().zip(&x[r * cols..(r + 1) * cols]) {
                        *o += v;
                    }
                }
                let inv = 1.0 / len.max(1) as f32;
                o.iter_mut().for_each(|v| *v *= inv);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pool_skips_padding() {
        let shape = BatchShape {
            seq: 3,
            lengths: vec![2, 1],
        };
        let x = [
            1.0, 2.0, 3.0, 4.0, 100.0, 100.0, 5.0, 6.0, 9.0, 9.0, 9.0, 9.0,
        ];
        assert_eq!(pool(&x, &shape, 2, Pooling::Mean), vec![2.0, 3.0, 5.0, 6.0]);
        assert_eq!(pool(&x, &shape, 2, Pooling::Cls), vec![1.0, 2.0, 5.0, 6.0]);
    }
}

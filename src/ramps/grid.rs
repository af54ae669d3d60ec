//! Spatial grids for CNN ramps.
//!
//! A CNN ramp used to read its stage's output averaged over every pixel (the global average
//! pool). Early in a CNN that throws away what the stage knows: the MNIST ResNet's first block has
//! 16 channels, and a head on their 16 averages agreed with the model on 57% of held-out digits,
//! where the model's own answer depends on *where* the strokes are. A ramp with grid `g` averages
//! the stage output over a `g x g` grid of cells instead and reads the `g * g * channels` cell
//! means (in row-major cell order, channels innermost: the NHWC layout flattened), so the head
//! sees coarse positions at the cost of a wider head.
//!
//! Cells are windows of `h / g` (rounded down) steps, widened so that exactly `g` of them cover the
//! image without padding (the last may overlap its neighbour by a few pixels). Grid 1 is the
//! global average, computed inside the fused ramp kernel as before; a larger grid runs one
//! average pool ([`crate::backend::Backend::pool2d`]) before the same kernel, which then reads one
//! position of `g * g * channels` values.

use crate::backend::Pool2d;

/// The most values a default grid lets a ramp read (`g * g * channels`): a head over
/// ImageNet's 1,000 classes then holds at most about a million weights, and the live loops
/// retrain it in well under a second. [`auto_grid`] picks the finest grid under it.
pub const MAX_GRID_FEATURES: usize = 1024;

/// Grids [`auto_grid`] considers, finest first.
pub const GRIDS: [usize; 3] = [4, 2, 1];

/// The finest grid of [`GRIDS`] that fits an `h x w x c` stage output: at most one cell per
/// pixel and at most [`MAX_GRID_FEATURES`] values. 1 (the global average) for a flat output.
pub fn auto_grid(h: usize, w: usize, c: usize) -> usize {
    GRIDS
        .into_iter()
        .find(|&g| g <= h && g <= w && c * g * g <= MAX_GRID_FEATURES)
        .unwrap_or(1)
}

/// Whether grid `g` fits an `h x w` image (and is not zero).
pub fn fits(g: usize, h: usize, w: usize) -> bool {
    g >= 1 && g <= h && g <= w
}

/// The average pool that turns an `h x w` image into `g x g` cells: stride `h / g`, window
/// `h - (g - 1) * stride` (so exactly `g` windows, the last ending at the image's edge).
/// Needs [`fits`].
pub fn cell_pool(g: usize, h: usize, w: usize) -> Pool2d {
    let (sh, sw) = ((h / g).max(1), (w / g).max(1));
    Pool2d {
        max: false,
        kernel: [h - (g - 1) * sh, w - (g - 1) * sw],
        stride: [sh, sw],
        padding: [0, 0],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn windows(n: usize, k: usize, s: usize) -> usize {
        (n - k) / s + 1
    }

    #[test]
    fn cells_cover_the_image_with_exactly_g_windows() {
        for h in 1..=64 {
            for g in GRIDS {
                if !fits(g, h, h) {
                    continue;
                }
                let p = cell_pool(g, h, h);
                assert_eq!(windows(h, p.kernel[0], p.stride[0]), g, "h {h}, g {g}");
                // The last window ends at the edge: no pixel is left out.
                assert_eq!((g - 1) * p.stride[0] + p.kernel[0], h, "h {h}, g {g}");
                assert!(p.kernel[0] >= p.stride[0]);
            }
        }
    }

    #[test]
    fn auto_grid_stays_under_the_feature_cap_and_inside_the_image() {
        // The MNIST ResNet's blocks: 28x28x16, 14x14x32, 7x7x64.
        assert_eq!(auto_grid(28, 28, 16), 4);
        assert_eq!(auto_grid(7, 7, 64), 4);
        // EfficientNet-Lite0's late blocks: 7x7x192 -> 2, 7x7x320 -> 1.
        assert_eq!(auto_grid(7, 7, 192), 2);
        assert_eq!(auto_grid(7, 7, 320), 1);
        assert_eq!(auto_grid(3, 3, 8), 2);
        assert_eq!(auto_grid(1, 1, 8), 1);
    }
}

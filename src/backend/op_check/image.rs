//! Checks of the image ops: convolution, pooling windows and global average pooling.

use super::calls::{
    Checked, ConvCall, ConvDims, ConvStep, GlobalPoolCall, InvertedResidualCall, Pool2dCall,
    Pool2dDims,
};
use super::fmt_shape;
use crate::backend::{Activation, Backend, Conv2d, Pool2d};
use crate::error::{Error, Result};

/// A convolution's geometry against its input and weight shapes. Stride, kernel and group
/// count are checked before the channels, so a zero among them is named as such rather than
/// reported as channels that do not agree.
pub fn conv_dims(
    x: &[usize],
    w: &[usize],
    b: Option<&[usize]>,
    p: &Conv2d,
    residual: Option<&[usize]>,
) -> Result<ConvDims> {
    const OP: &str = "conv2d";
    if x.len() != 4 || w.len() != 4 {
        return Err(Error::shape(
            OP,
            "input and weight shapes",
            "4-D: NHWC input, [cout, kh, kw, cin / groups] weight",
            format!("{x:?} and {w:?}"),
        ));
    }
    let (n, h, wd, cin) = (x[0], x[1], x[2], x[3]);
    let (cout, kh, kw, cg) = (w[0], w[1], w[2], w[3]);
    if p.stride.contains(&0) {
        return Err(Error::shape(
            OP,
            "stride",
            "at least 1",
            fmt_shape(&p.stride),
        ));
    }
    if kh == 0 || kw == 0 {
        return Err(Error::shape(
            OP,
            "kernel size (weight dimensions 1 and 2)",
            "at least 1x1",
            format!("{kh}x{kw}"),
        ));
    }
    if p.groups == 0 {
        return Err(Error::shape(OP, "groups", "at least 1", 0));
    }
    if cin == 0 || cout == 0 {
        return Err(Error::shape(
            OP,
            "input and output channels",
            "at least 1 each",
            format!("{cin} and {cout}"),
        ));
    }
    if !cin.is_multiple_of(p.groups) || !cout.is_multiple_of(p.groups) || cg * p.groups != cin {
        return Err(Error::shape(
            OP,
            format!("channels with groups = {}", p.groups),
            format!(
                "input channels = weight's last dimension x groups, both channel counts multiples of {}",
                p.groups
            ),
            format!("{cin} input channels, weight {w:?}"),
        ));
    }
    let (oh, ow) = p.output_size(h, wd, kh, kw).ok_or_else(|| {
        Error::shape(
            OP,
            "kernel size",
            format!(
                "at most the {h}x{wd} input padded by {:?} (+{:?})",
                p.padding, p.padding_extra
            ),
            format!("{kh}x{kw}"),
        )
    })?;
    if let Some(b) = b
        && b != [cout]
    {
        return Err(Error::shape(
            OP,
            "bias shape",
            format!("[{cout}]"),
            fmt_shape(b),
        ));
    }
    let out = [n, oh, ow, cout];
    if let Some(r) = residual
        && r != out
    {
        return Err(Error::shape(
            OP,
            "residual shape",
            fmt_shape(&out),
            fmt_shape(r),
        ));
    }
    Ok(ConvDims {
        n,
        h,
        w: wd,
        cin,
        cout,
        kh,
        kw,
        oh,
        ow,
    })
}

pub(crate) fn conv2d<'a, B: Backend + ?Sized>(
    be: &B,
    x: &'a B::Tensor,
    w: &'a B::Tensor,
    b: Option<&'a B::Tensor>,
    p: &Conv2d,
    residual: Option<&'a B::Tensor>,
    act: Activation,
) -> Result<ConvCall<'a, B::Tensor>> {
    let dims = conv_dims(
        be.shape(x),
        be.shape(w),
        b.map(|b| be.shape(b)),
        p,
        residual.map(|r| be.shape(r)),
    )?;
    Ok(ConvCall {
        x,
        w,
        b,
        p: *p,
        residual,
        act,
        dims,
        _checked: Checked,
    })
}

/// An inverted residual block: each step against the previous step's output shape, the outer
/// steps 1x1 convolutions that keep the pixels ([`ConvDims::is_pointwise`]), the middle one
/// depthwise, the residual of the projection's output shape.
pub(crate) fn inverted_residual<'a, B: Backend + ?Sized>(
    be: &B,
    x: &'a B::Tensor,
    expand: Option<ConvStep<'a, B::Tensor>>,
    depthwise: ConvStep<'a, B::Tensor>,
    project: ConvStep<'a, B::Tensor>,
    residual: Option<&'a B::Tensor>,
) -> Result<InvertedResidualCall<'a, B::Tensor>> {
    const OP: &str = "inverted_residual";
    let step = |s: &ConvStep<'a, B::Tensor>, input: &[usize], res: Option<&[usize]>| {
        conv_dims(input, be.shape(s.w), s.b.map(|b| be.shape(b)), &s.p, res)
    };
    let out = |d: &ConvDims| [d.n, d.oh, d.ow, d.cout];
    let mut input = be.shape(x).to_vec();
    let expand = match expand {
        Some(e) => {
            let d = step(&e, &input, None)?;
            if !d.is_pointwise(&e.p) {
                return Err(Error::shape(
                    OP,
                    "expansion",
                    "a 1x1 convolution at stride 1 without padding",
                    format!("{}x{} at stride {:?}", d.kh, d.kw, e.p.stride),
                ));
            }
            input = out(&d).to_vec();
            Some((e, d))
        }
        None => None,
    };
    let dd = step(&depthwise, &input, None)?;
    if depthwise.p.groups != dd.cin || dd.cout != dd.cin {
        return Err(Error::shape(
            OP,
            "depthwise step's groups and output channels",
            format!("both {} (the input's channels)", dd.cin),
            format!("{} groups, {} channels", depthwise.p.groups, dd.cout),
        ));
    }
    let pd = step(&project, &out(&dd), residual.map(|r| be.shape(r)))?;
    if !pd.is_pointwise(&project.p) {
        return Err(Error::shape(
            OP,
            "projection",
            "a 1x1 convolution at stride 1 without padding",
            format!("{}x{} at stride {:?}", pd.kh, pd.kw, project.p.stride),
        ));
    }
    Ok(InvertedResidualCall {
        x,
        expand,
        depthwise: (depthwise, dd),
        project: (project, pd),
        residual,
        _checked: Checked,
    })
}

/// A pooling window against an NHWC input shape.
pub fn pool2d_dims(x: &[usize], p: &Pool2d) -> Result<Pool2dDims> {
    const OP: &str = "pool2d";
    if x.len() != 4 || x[3] == 0 {
        return Err(Error::shape(
            OP,
            "input shape",
            "4-D (NHWC), at least 1 channel",
            fmt_shape(x),
        ));
    }
    if p.stride.contains(&0)
        || p.kernel.contains(&0)
        || p.padding[0] * 2 > p.kernel[0]
        || p.padding[1] * 2 > p.kernel[1]
    {
        return Err(Error::shape(
            OP,
            "window",
            "kernel and stride at least 1, padding at most half the kernel",
            format!(
                "kernel {:?}, stride {:?}, padding {:?}",
                p.kernel, p.stride, p.padding
            ),
        ));
    }
    let c = Conv2d {
        stride: p.stride,
        padding: p.padding,
        groups: 1,
        padding_extra: [0, 0],
    };
    let (oh, ow) = c
        .output_size(x[1], x[2], p.kernel[0], p.kernel[1])
        .ok_or_else(|| {
            Error::shape(
                OP,
                "window",
                format!(
                    "at most the {}x{} input padded by {:?}",
                    x[1], x[2], p.padding
                ),
                fmt_shape(&p.kernel),
            )
        })?;
    Ok(Pool2dDims {
        n: x[0],
        h: x[1],
        w: x[2],
        c: x[3],
        oh,
        ow,
    })
}

pub(crate) fn pool2d<'a, B: Backend + ?Sized>(
    be: &B,
    x: &'a B::Tensor,
    p: &Pool2d,
) -> Result<Pool2dCall<'a, B::Tensor>> {
    Ok(Pool2dCall {
        x,
        p: *p,
        dims: pool2d_dims(be.shape(x), p)?,
        _checked: Checked,
    })
}

pub(crate) fn global_avg_pool<'a, B: Backend + ?Sized>(
    be: &B,
    x: &'a B::Tensor,
) -> Result<GlobalPoolCall<'a, B::Tensor>> {
    let s = be.shape(x);
    // No pixels have no mean (a GPU would leave the output unwritten).
    if s.len() != 4 || s[1] == 0 || s[2] == 0 {
        return Err(Error::shape(
            "global_avg_pool",
            "input shape",
            "4-D (NHWC) with at least one pixel",
            fmt_shape(s),
        ));
    }
    Ok(GlobalPoolCall {
        x,
        n: s[0],
        hw: s[1] * s[2],
        c: s[3],
        _checked: Checked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(stride: usize, groups: usize) -> Conv2d {
        Conv2d {
            stride: [stride, stride],
            padding: [0, 0],
            groups,
            padding_extra: [0, 0],
        }
    }

    /// A zero stride, kernel or group count is named as such, even when the channels do not
    /// agree either (they used to be reported as a channel mismatch).
    #[test]
    fn zeros_are_named_before_channels() {
        let x = [1, 5, 5, 3];
        let e = conv_dims(&x, &[4, 3, 3, 2], None, &geo(0, 1), None).unwrap_err();
        assert!(e.to_string().contains("stride: expected at least 1"), "{e}");
        let e = conv_dims(&x, &[4, 0, 0, 2], None, &geo(1, 1), None).unwrap_err();
        assert!(e.to_string().contains("kernel size"), "{e}");
        let e = conv_dims(&x, &[4, 3, 3, 2], None, &geo(1, 0), None).unwrap_err();
        assert!(e.to_string().contains("groups: expected at least 1"), "{e}");
        let e = conv_dims(&x, &[4, 3, 3, 2], None, &geo(1, 1), None).unwrap_err();
        assert!(e.to_string().contains("channels with groups = 1"), "{e}");
    }

    #[test]
    fn pooling_windows_are_checked() {
        let p = |k: usize, s: usize| Pool2d {
            max: true,
            kernel: [k, k],
            stride: [s, s],
            padding: [0, 0],
        };
        assert_eq!(
            pool2d_dims(&[1, 8, 8, 3], &p(2, 2)).unwrap().to_array(),
            [1, 8, 8, 3, 4, 4]
        );
        for bad in [p(0, 1), p(2, 0), p(9, 1)] {
            assert!(pool2d_dims(&[1, 8, 8, 3], &bad).is_err(), "{bad:?}");
        }
        assert!(pool2d_dims(&[1, 8, 8, 0], &p(2, 2)).is_err());
    }
}

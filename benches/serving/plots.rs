//! The serving benchmark's pictures (SVG): latency CDFs of the systems side by side, and the
//! timeline of Apparate's active ramps and thresholds with every system's window agreement.

use std::path::Path;

use plotters::prelude::*;

use super::Report;

fn colour(system: &str) -> RGBColor {
    match system {
        "vanilla" => RGBColor(0, 0, 0),
        "apparate" => RGBColor(214, 39, 40),
        "static-shared" => RGBColor(31, 119, 180),
        "static-per-ramp" => RGBColor(44, 160, 44),
        "oracle" => RGBColor(148, 103, 189),
        "apparate-paper" => RGBColor(255, 127, 14),
        "apparate-no-shadow" => RGBColor(140, 86, 75),
        "apparate-no-bound" => RGBColor(227, 119, 194),
        "apparate-no-learning" => RGBColor(23, 190, 207),
        "apparate-no-drift" => RGBColor(188, 189, 34),
        _ => RGBColor(127, 127, 127),
    }
}

/// Colours of ramp points, in the order they are first seen.
const RAMP_COLOURS: [RGBColor; 8] = [
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// A plain line of `colour` for a series' legend entry.
fn legend_line(c: RGBColor, width: u32) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(width))
}

fn err(path: &Path, e: impl std::fmt::Debug) -> apparate::Error {
    apparate::Error::Input(format!("plotting {}: {e:?}", path.display()))
}

/// Fraction of requests answered within x ms, per system (log x, up to the largest max).
pub fn latency_cdf(r: &Report, path: &Path) -> apparate::Result<()> {
    let e = |x| err(path, x);
    let xmax = r
        .systems
        .iter()
        .map(|s| s.latency.max_ms)
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.1;
    let xmin = r
        .systems
        .iter()
        .flat_map(|s| s.latency_ms.iter().copied())
        .fold(f64::INFINITY, f64::min)
        .clamp(1e-3, xmax / 2.0)
        * 0.9;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let title = format!(
        "{} workload: latency CDF, {} requests at {:.1}/s",
        r.workload,
        r.systems.first().map_or(0, |s| s.requests),
        r.offered_rate
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d((xmin..xmax).log_scale(), 0.0..1.0)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_labels(12)
        .x_label_formatter(&|x| format!("{x:.2}"))
        .x_desc("latency from the scheduled send time (ms, log scale)")
        .y_desc("fraction of requests")
        .draw()
        .map_err(e)?;
    for s in &r.systems {
        let mut v = s.latency_ms.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1) as f64;
        let stride = (v.len() / 2000).max(1);
        let pts: Vec<(f64, f64)> = v
            .iter()
            .enumerate()
            .filter(|(i, _)| i % stride == 0 || *i + 1 == v.len())
            .map(|(i, &x)| (x.clamp(xmin, xmax), (i + 1) as f64 / n))
            .collect();
        let c = colour(&s.system);
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(e)?
            .label(format!("{} (p50 {:.2} ms)", s.system, s.latency.p50_ms))
            .legend(legend_line(c, 2));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// Top: Apparate's active ramps and their thresholds over the requests (a line per ramp point,
/// drawn while the ramp is active). Bottom: every system's agreement with the plain model in
/// consecutive windows, against the 99% floor. Where the stream changes (the injected drift, or
/// each clip change of a clip stream) is a dashed line.
pub fn timeline(r: &Report, path: &Path) -> apparate::Result<()> {
    let e = |x| err(path, x);
    let n = r.systems.first().map_or(0, |s| s.requests).max(1) as f64;
    let root = SVGBackend::new(path, (900, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let (top, bottom) = root.split_vertically(340);
    let marks: Vec<f64> = r.drift_marks.iter().map(|&d| d as f64).collect();
    let mark_label = if r.clips.is_empty() {
        "drift starts"
    } else {
        "clip changes"
    };

    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!(
                "{} workload: Apparate's active ramps and thresholds",
                r.workload
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..n, 0.0..1.0)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc("request")
        .y_desc("threshold (uncertainty)")
        .draw()
        .map_err(e)?;
    if let Some(a) = r.systems.iter().find(|s| s.system == "apparate") {
        let mut points: Vec<String> = Vec::new();
        for ev in &a.events {
            for p in &ev.ramps {
                if !points.contains(p) {
                    points.push(p.clone());
                }
            }
        }
        for (k, point) in points.iter().enumerate() {
            let c = RAMP_COLOURS[k % RAMP_COLOURS.len()];
            // One segment per stretch where the ramp is active with one threshold.
            let mut segments: Vec<Vec<(f64, f64)>> = Vec::new();
            for (i, ev) in a.events.iter().enumerate() {
                let from = ev.inputs as f64;
                let to = a.events.get(i + 1).map_or(n, |x| x.inputs as f64);
                if let Some(j) = ev.ramps.iter().position(|p| p == point) {
                    let t = ev.thresholds.get(j).copied().unwrap_or(0.0) as f64;
                    segments.push(vec![(from, t), (to, t)]);
                }
            }
            let mut first = true;
            for seg in segments {
                let s = chart
                    .draw_series(LineSeries::new(seg, c.stroke_width(3)))
                    .map_err(e)?;
                if first {
                    s.label(point.clone()).legend(legend_line(c, 3));
                    first = false;
                }
            }
        }
    }
    for (k, &d) in marks.iter().enumerate() {
        let s = chart
            .draw_series(DashedLineSeries::new(
                vec![(d, 0.0), (d, 1.0)],
                6,
                4,
                BLACK.stroke_width(1),
            ))
            .map_err(e)?;
        if k == 0 {
            s.label(mark_label).legend(legend_line(BLACK, 1));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;

    // Window agreement: sliding windows of `w` requests, one every `w / 8`.
    let w = r.window.max(1);
    let step = (w / 8).max(1);
    let windows = |agree: &[bool]| -> Vec<(f64, f64)> {
        (w..=agree.len())
            .step_by(step)
            .map(|end| {
                let c = &agree[end - w..end];
                (
                    end as f64,
                    c.iter().filter(|a| **a).count() as f64 / w as f64,
                )
            })
            .collect()
    };
    let lowest = r
        .systems
        .iter()
        .flat_map(|s| windows(&s.agree))
        .map(|p| p.1)
        .fold(0.98f64, f64::min);
    let ymin = ((lowest - 0.01) * 50.0).floor() / 50.0;
    let mut chart = ChartBuilder::on(&bottom)
        .caption(
            format!("agreement with the plain model, sliding {w}-request windows"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..n, ymin.max(0.0)..1.005)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc("request (end of the window)")
        .y_desc("window agreement")
        .draw()
        .map_err(e)?;
    chart
        .draw_series(DashedLineSeries::new(
            vec![(0.0, 0.99), (n, 0.99)],
            6,
            4,
            RGBColor(120, 120, 120).stroke_width(1),
        ))
        .map_err(e)?
        .label("99% floor")
        .legend(legend_line(RGBColor(120, 120, 120), 1));
    for &d in &marks {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(d, ymin.max(0.0)), (d, 1.005)],
                6,
                4,
                BLACK.stroke_width(1),
            ))
            .map_err(e)?;
    }
    for s in r
        .systems
        .iter()
        .filter(|s| !s.system.starts_with("vanilla"))
    {
        let pts = windows(&s.agree);
        let c = colour(&s.system);
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(e)?
            .label(s.system.clone())
            .legend(legend_line(c, 2));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

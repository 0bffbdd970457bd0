//! `--plot out.svg`: median downtime (left) and total time (right) against memory size, one line
//! per mode and baseline (plotters, SVG backend). Memory size is on a base-2 log scale, so the
//! usual doubling sizes (64M, 256M, 1G) are evenly spaced and labelled as sizes.

use super::report::{BenchReport, Row};
use super::BenchError;
use plotters::prelude::*;
use std::path::Path;

type Metric = fn(&Row) -> Option<f64>;

pub fn draw(report: &BenchReport, path: &Path) -> Result<(), BenchError> {
    let err = |e: &dyn std::fmt::Display| BenchError::Plot {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let sizes = report.sizes();
    let modes = report.modes();
    let x_min = sizes.iter().copied().min().unwrap_or(1).max(1) as f64 / 1.4;
    let x_max = sizes.iter().copied().max().unwrap_or(1).max(1) as f64 * 1.4;
    // About one label per doubling, so that they fall on the sizes (more made in-between
    // labels that rounded to the same text: "11M 12M 12M ... 16M" for 16M and 32M).
    let x_labels = ((x_max / x_min).log2().ceil() as usize + 1).clamp(2, 12);
    let root = SVGBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let panels: [(&str, Metric); 2] = [
        ("downtime (median, ms)", |r| r.downtime_ms.map(|v| v as f64)),
        ("total time (median, ms)", |r| r.total_ms.map(|v| v as f64)),
    ];
    for (area, (title, metric)) in root.split_evenly((1, 2)).iter().zip(panels) {
        let series: Vec<(String, Vec<(f64, f64)>)> = modes
            .iter()
            .map(|mode| {
                let points = sizes
                    .iter()
                    .filter_map(|&s| report.median(s, mode, metric).map(|m| (s as f64, m)))
                    .collect();
                (mode.clone(), points)
            })
            .collect();
        let y_max = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|&(_, y)| y))
            .fold(1.0f64, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((x_min..x_max).log_scale().base(2.0), 0f64..y_max)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("memory size (log scale)")
            .x_labels(x_labels)
            .x_label_formatter(&|&mib| size_label(mib))
            .y_desc("ms")
            .y_label_formatter(&|&ms| format!("{ms:.0}"))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (mode, points)) in series.iter().enumerate() {
            if points.is_empty() {
                continue;
            }
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(mode.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}

/// `64M`, `1G`, `1.5G`: a size in MiB as the bench's `--sizes` spells it.
fn size_label(mib: f64) -> String {
    if mib >= 1024.0 {
        format!("{}G", (mib / 1024.0 * 10.0).round() / 10.0)
    } else {
        format!("{}M", mib.round())
    }
}

#[cfg(test)]
mod tests {
    use super::super::report::{BenchReport, Row};
    use super::*;

    #[test]
    fn draws_an_svg() {
        let mut report = BenchReport {
            command: "test".into(),
            machine: Default::default(),
            link: Vec::new(),
            rows: Vec::new(),
            stopped: None,
        };
        for (size, mode, down) in [(16, "cold", 300), (64, "cold", 500), (16, "runc", 900)] {
            let mut r = Row::new(size, "mig", mode, 1);
            r.downtime_ms = Some(down);
            r.total_ms = Some(down + 100);
            report.rows.push(r);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.svg");
        draw(&report, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("cold") && svg.contains("runc"));
        // The sizes measured are the axis's labels, not fractions of MiB.
        let labels: Vec<&str> = svg.lines().filter(|l| !l.starts_with('<')).collect();
        assert!(
            labels.contains(&"16M") && labels.contains(&"64M"),
            "{labels:?}"
        );
        assert!(
            !labels.iter().any(|l| l.ends_with(".0")),
            "decimal tick labels: {labels:?}"
        );
    }

    /// Two close sizes (QA: 16M and 32M) get labels that are each a distinct size.
    #[test]
    fn close_sizes_get_distinct_labels() {
        let mut report = BenchReport {
            command: "test".into(),
            machine: Default::default(),
            link: Vec::new(),
            rows: Vec::new(),
            stopped: None,
        };
        for size in [16, 32] {
            let mut r = Row::new(size, "mig", "cold", 1);
            r.downtime_ms = Some(300);
            r.total_ms = Some(400);
            report.rows.push(r);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.svg");
        draw(&report, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let labels: Vec<&str> = svg
            .lines()
            .filter(|l| !l.starts_with('<') && l.ends_with('M'))
            .collect();
        // Two panels, each its own axis: each label once (12 labels made "32M 38M 45M" twice,
        // and in-between sizes nobody measured).
        let one_axis = &labels[..labels.len() / 2];
        assert_eq!(one_axis, ["16M", "32M"], "{labels:?}");
    }

    #[test]
    fn sizes_are_labelled_as_the_bench_spells_them() {
        assert_eq!(size_label(64.0), "64M");
        assert_eq!(size_label(1024.0), "1G");
        assert_eq!(size_label(1536.0), "1.5G");
    }
}

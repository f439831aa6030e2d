//! The sweep's picture: ingest→delivery p99 against offered rate, one line
//! per target, from the e2e rows of a CSV this tool wrote.
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, Result, anyhow, bail};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::server::Target;

const FONT: &str = "sans-serif";

/// One point: an e2e run.
#[derive(Clone, Debug)]
struct Point {
    rate: f64,
    p99_ms: f64,
    saturated: bool,
}

/// The e2e rows of `csv`, by target; a later row for the same target and
/// rate replaces an earlier one (a CSV collects runs over time).
struct Data {
    /// In the legend's order: the bucket's targets, then NATS, then others.
    series: Vec<(String, Vec<Point>)>,
    shapes: Vec<String>,
    cores: Vec<String>,
    windows: Vec<String>,
}

fn read(csv: &Path) -> Result<Data> {
    let text =
        std::fs::read_to_string(csv).with_context(|| format!("reading {}", csv.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| anyhow!("{} is empty", csv.display()))?
        .split(',')
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| anyhow!("{} has no column {name}", csv.display()))
    };
    let (mode, target, rate, p99, saturated) = (
        col("mode")?,
        col("target")?,
        col("offered_rate")?,
        col("e2e_p99_ms")?,
        col("saturated")?,
    );
    let (streams, in_flight, marks, cores, window) = (
        col("streams")?,
        col("in_flight")?,
        col("marks")?,
        col("machine_cores")?,
        col("window_s")?,
    );
    let mut points: BTreeMap<String, BTreeMap<u64, Point>> = BTreeMap::new();
    let (mut shapes, mut core_counts, mut windows) = (Vec::new(), Vec::new(), Vec::new());
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let v: Vec<&str> = line.split(',').collect();
        let get = |i: usize| v.get(i).copied().unwrap_or("");
        if get(mode) != "e2e" {
            continue;
        }
        let (Ok(r), Ok(p)) = (get(rate).parse::<f64>(), get(p99).parse::<f64>()) else {
            continue;
        };
        points.entry(get(target).to_owned()).or_default().insert(
            r as u64,
            Point {
                rate: r,
                p99_ms: p.max(0.001),
                saturated: get(saturated) == "true",
            },
        );
        let shape = format!(
            "{} streams × {} in flight, {} marks",
            get(streams),
            get(in_flight),
            get(marks)
        );
        for (list, value) in [
            (&mut shapes, shape),
            (&mut core_counts, get(cores).to_owned()),
            (
                &mut windows,
                format!("{:.0} s", get(window).parse().unwrap_or(0.0)),
            ),
        ] {
            if !list.contains(&value) {
                list.push(value);
            }
        }
    }
    if points.is_empty() {
        bail!("{} has no e2e rows with a p99 to plot", csv.display());
    }
    let mut series: Vec<(String, Vec<Point>)> = points
        .into_iter()
        .map(|(t, p)| (t, p.into_values().collect()))
        .collect();
    series.sort_by_key(|(t, _)| Target::from_name(t).map_or(usize::MAX, |t| t as usize));
    Ok(Data {
        series,
        shapes,
        cores: core_counts,
        windows,
    })
}

/// Registers DejaVu Sans with plotters' ab_glyph text (no fontconfig).
fn load_font(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "reading the font {} (apt-get install fonts-dejavu-core, or pass --font)",
            path.display()
        )
    })?;
    // plotters keeps fonts for the program's life.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(FONT, FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{} is not a usable TTF font", path.display()))
}

fn style_of(target: &str, i: usize) -> (String, RGBColor) {
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(127, 127, 127),
    ];
    match Target::from_name(target) {
        Some(Target::Sqlite) => (Target::Sqlite.label().into(), palette[0]),
        Some(Target::Postgres) => (Target::Postgres.label().into(), palette[1]),
        Some(Target::Redis) => (Target::Redis.label().into(), palette[2]),
        Some(Target::Nats) => (Target::Nats.label().into(), palette[3]),
        None => (target.to_owned(), palette[4 + i % 2]),
    }
}

fn one_or_mixed(values: &[String], what: &str) -> String {
    match values {
        [one] => one.clone(),
        _ => format!("mixed {what}"),
    }
}

pub fn draw(csv: &Path, png: &Path, font: &Path) -> Result<()> {
    let data = read(csv)?;
    load_font(font)?;

    let all: Vec<&Point> = data.series.iter().flat_map(|(_, p)| p).collect();
    let max_rate = all.iter().map(|p| p.rate).fold(0.0, f64::max);
    let min_ms = all.iter().map(|p| p.p99_ms).fold(f64::MAX, f64::min);
    let max_ms = all.iter().map(|p| p.p99_ms).fold(0.0, f64::max);
    let (y_lo, y_hi) = (min_ms / 2.0, max_ms * 2.0);

    let cores = one_or_mixed(&data.cores, "machines");
    let title = "Ingest → delivery latency, p99, against offered rate";
    let subtitle = format!(
        "{cores} cores, load generator on the same box · consumers: {} · {} per point",
        one_or_mixed(&data.shapes, "consumer shapes"),
        one_or_mixed(&data.windows, "durations"),
    );

    let root = BitMapBackend::new(png, (1000, 650)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, (FONT, 24))?;
    let root = root.titled(
        &subtitle,
        (FONT, 15).into_font().color(&RGBColor(80, 80, 80)),
    )?;
    let mut chart = ChartBuilder::on(&root)
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..max_rate * 1.05, (y_lo..y_hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("offered rate (packets/s)")
        .y_desc("p99 ingest → delivery (ms, log scale)")
        .light_line_style(RGBColor(238, 238, 238))
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 13))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| {
            if *y >= 10.0 {
                format!("{y:.0}")
            } else if *y >= 1.0 {
                format!("{y:.1}")
            } else {
                format!("{y:.2}")
            }
        })
        .draw()?;

    for (i, (target, points)) in data.series.iter().enumerate() {
        let (label, color) = style_of(target, i);
        let line: Vec<(f64, f64)> = points.iter().map(|p| (p.rate, p.p99_ms)).collect();
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        // Saturated runs hollow: the consumers fell behind, so their p99
        // is how long the backlog grew, not a latency of the system.
        chart.draw_series(points.iter().map(|p| {
            // A white disc under the ring, so the line does not fill it in.
            let (disc, ring) = if p.saturated {
                (WHITE.filled(), color.stroke_width(2))
            } else {
                (color.filled(), color.filled())
            };
            EmptyElement::at((p.rate, p.p99_ms))
                + Circle::new((0, 0), 6, disc)
                + Circle::new((0, 0), 6, ring)
        }))?;
    }
    // A legend entry explaining the hollow points.
    let grey = RGBColor(90, 90, 90);
    chart
        .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())?
        .label("hollow: saturated (delivered < 95% of offered, or undelivered)")
        .legend(move |(x, y)| {
            EmptyElement::at((x + 10, y))
                + Circle::new((0, 0), 6, WHITE.filled())
                + Circle::new((0, 0), 6, grey.stroke_width(2))
        });
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", png.display()))?;
    Ok(())
}

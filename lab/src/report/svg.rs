//! A small SVG writer for the report's plots: a document of lines,
//! polylines, circles, rectangles and text, plus a `Chart` that lays out a
//! title, a plot frame with linear or log axes and ticks, and a legend that
//! flows below the frame. The output is self-contained (generic font
//! family, inline attributes, no CSS) and every piece of text is escaped.

use std::fmt::Write;

/// Escapes text for XML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters are not allowed in XML 1.0.
            c if c.is_control() && c != '\n' && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A coordinate with one decimal (enough on screen, and keeps big plots small).
fn n(v: f64) -> String {
    let v = if v.is_finite() { v } else { 0.0 };
    let s = format!("{v:.1}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

/// How a shape is drawn: its stroke (lines) or fill (circles, rectangles).
#[derive(Copy, Clone, Debug)]
pub struct Pen<'a> {
    pub color: &'a str,
    pub width: f64,
    /// `stroke-dasharray`, e.g. `"6 4"`.
    pub dash: Option<&'a str>,
    pub opacity: f64,
    /// A class attribute, so that a reader (or a test) can find the marks.
    pub class: Option<&'a str>,
}

impl<'a> Pen<'a> {
    pub fn new(color: &'a str) -> Self {
        Pen {
            color,
            width: 1.0,
            dash: None,
            opacity: 1.0,
            class: None,
        }
    }

    pub fn width(self, width: f64) -> Self {
        Pen { width, ..self }
    }

    pub fn dash(self, dash: Option<&'a str>) -> Self {
        Pen { dash, ..self }
    }

    pub fn opacity(self, opacity: f64) -> Self {
        Pen { opacity, ..self }
    }

    pub fn class(self, class: &'a str) -> Self {
        Pen {
            class: Some(class),
            ..self
        }
    }

    fn stroke_attrs(&self) -> String {
        let mut a = format!(
            r#" stroke="{}" stroke-width="{}" fill="none""#,
            escape(self.color),
            n(self.width)
        );
        if let Some(d) = self.dash {
            let _ = write!(a, r#" stroke-dasharray="{}""#, escape(d));
        }
        self.common(&mut a);
        a
    }

    fn fill_attrs(&self) -> String {
        let mut a = format!(r#" fill="{}""#, escape(self.color));
        self.common(&mut a);
        a
    }

    fn common(&self, a: &mut String) {
        if self.opacity < 1.0 {
            let _ = write!(a, r#" opacity="{:.2}""#, self.opacity);
        }
        if let Some(c) = self.class {
            let _ = write!(a, r#" class="{}""#, escape(c));
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Anchor {
    Start,
    Middle,
    End,
}

/// How a piece of text is set.
#[derive(Copy, Clone, Debug)]
pub struct Font<'a> {
    pub size: f64,
    pub anchor: Anchor,
    pub color: &'a str,
    pub bold: bool,
    /// Rotated a quarter turn counterclockwise (a y-axis label).
    pub vertical: bool,
}

impl Font<'_> {
    pub fn new(size: f64) -> Self {
        Font {
            size,
            anchor: Anchor::Start,
            color: "#222222",
            bold: false,
            vertical: false,
        }
    }

    pub fn anchor(self, anchor: Anchor) -> Self {
        Font { anchor, ..self }
    }

    pub fn bold(self) -> Self {
        Font { bold: true, ..self }
    }

    pub fn vertical(self) -> Self {
        Font {
            vertical: true,
            ..self
        }
    }
}

/// An SVG document being written.
pub struct Svg {
    width: f64,
    height: f64,
    body: String,
}

impl Svg {
    pub fn new(width: f64, height: f64) -> Self {
        Svg {
            width,
            height,
            body: String::new(),
        }
    }

    pub fn set_height(&mut self, height: f64) {
        self.height = height;
    }

    /// A `<title>` child: the tooltip of the shape it closes.
    fn close(&mut self, name: &str, tip: Option<&str>) {
        match tip {
            Some(t) => {
                let _ = writeln!(self.body, "><title>{}</title></{name}>", escape(t));
            }
            None => self.body.push_str("/>\n"),
        }
    }

    pub fn line(&mut self, a: (f64, f64), b: (f64, f64), pen: Pen, tip: Option<&str>) {
        let _ = write!(
            self.body,
            r#"<line x1="{}" y1="{}" x2="{}" y2="{}"{}"#,
            n(a.0),
            n(a.1),
            n(b.0),
            n(b.1),
            pen.stroke_attrs()
        );
        self.close("line", tip);
    }

    pub fn polyline(&mut self, points: &[(f64, f64)], pen: Pen) {
        let pts: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{},{}", n(x), n(y)))
            .collect();
        let _ = writeln!(
            self.body,
            r#"<polyline points="{}"{} stroke-linejoin="round"/>"#,
            pts.join(" "),
            pen.stroke_attrs()
        );
    }

    pub fn circle(&mut self, c: (f64, f64), r: f64, pen: Pen) {
        let _ = writeln!(
            self.body,
            r#"<circle cx="{}" cy="{}" r="{}"{}/>"#,
            n(c.0),
            n(c.1),
            n(r),
            pen.fill_attrs()
        );
    }

    pub fn rect(&mut self, at: (f64, f64), size: (f64, f64), fill: Pen, stroke: Option<Pen>) {
        let stroke = stroke
            .map(|s| {
                let mut a = format!(
                    r#" stroke="{}" stroke-width="{}""#,
                    escape(s.color),
                    n(s.width)
                );
                if let Some(d) = s.dash {
                    let _ = write!(a, r#" stroke-dasharray="{}""#, escape(d));
                }
                a
            })
            .unwrap_or_default();
        let _ = writeln!(
            self.body,
            r#"<rect x="{}" y="{}" width="{}" height="{}"{}{stroke}/>"#,
            n(at.0),
            n(at.1),
            n(size.0.max(0.0)),
            n(size.1.max(0.0)),
            fill.fill_attrs()
        );
    }

    pub fn text(&mut self, at: (f64, f64), text: &str, font: Font) {
        let anchor = match font.anchor {
            Anchor::Start => "start",
            Anchor::Middle => "middle",
            Anchor::End => "end",
        };
        let mut attrs = format!(
            r#" font-family="sans-serif" font-size="{}" fill="{}" text-anchor="{anchor}""#,
            n(font.size),
            escape(font.color)
        );
        if font.bold {
            attrs.push_str(r#" font-weight="bold""#);
        }
        if font.vertical {
            let _ = write!(attrs, r#" transform="rotate(-90 {} {})""#, n(at.0), n(at.1));
        }
        let _ = writeln!(
            self.body,
            r#"<text x="{}" y="{}"{attrs}>{}</text>"#,
            n(at.0),
            n(at.1),
            escape(text)
        );
    }

    pub fn finish(self) -> String {
        format!(
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?>"#,
                "\n",
                r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">"#,
                "\n",
                r##"<rect x="0" y="0" width="{w}" height="{h}" fill="#ffffff"/>"##,
                "\n{body}</svg>\n"
            ),
            w = n(self.width),
            h = n(self.height),
            body = self.body
        )
    }
}

/// A domain mapped onto a pixel range.
#[derive(Copy, Clone, Debug)]
pub enum Scale {
    Linear {
        lo: f64,
        hi: f64,
    },
    /// Both bounds > 0.
    Log {
        lo: f64,
        hi: f64,
    },
}

impl Scale {
    /// Where `v` falls between the bounds, 0..=1 (clamped).
    fn fraction(&self, v: f64) -> f64 {
        let f = match *self {
            Scale::Linear { lo, hi } => (v - lo) / (hi - lo),
            Scale::Log { lo, hi } => (v.max(lo).ln() - lo.ln()) / (hi.ln() - lo.ln()),
        };
        if f.is_finite() {
            f.clamp(0.0, 1.0)
        } else {
            0.0
        }
    }

    /// Tick values: round steps of 1, 2 or 5 × 10^k (linear) or the
    /// decades (log).
    pub fn ticks(&self) -> Vec<f64> {
        match *self {
            Scale::Linear { lo, hi } => {
                let step = nice_step((hi - lo) / 8.0);
                let mut t = (lo / step).ceil() * step;
                let mut out = Vec::new();
                while t <= hi + step * 1e-9 && out.len() < 100 {
                    // -0.0 and 0.30000000000000004 print badly.
                    out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
                    t += step;
                }
                out
            }
            Scale::Log { lo, hi } => {
                let mut e = lo.log10().ceil() as i32;
                let mut out = Vec::new();
                while 10f64.powi(e) <= hi * (1.0 + 1e-9) && out.len() < 100 {
                    out.push(10f64.powi(e));
                    e += 1;
                }
                out
            }
        }
    }
}

/// The smallest of 1, 2, 5 × 10^k at least `raw`.
pub fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * mag)
}

/// A rounded upper bound for a linear axis starting at 0.
pub fn nice_max(v: f64) -> f64 {
    if !(v.is_finite() && v > 0.0) {
        return 1.0;
    }
    let step = nice_step(v / 8.0);
    (v / step).ceil() * step
}

/// A legend entry's sample.
#[derive(Copy, Clone, Debug)]
pub enum Swatch<'a> {
    Line(Pen<'a>),
    Dot(Pen<'a>),
    /// A short vertical bar (a mark along the frame's edge).
    Tick(Pen<'a>),
}

pub const WIDTH: f64 = 960.0;
const LEFT: f64 = 76.0;
const RIGHT: f64 = 24.0;
/// Title, subtitle and a strip above the frame for marks along the top.
const TOP: f64 = 62.0;
const PLOT_HEIGHT: f64 = 400.0;

/// A plot: title, frame, axes, and a legend below.
pub struct Chart {
    pub svg: Svg,
    x: Scale,
    y: Scale,
    /// The frame's left, top, width and height in pixels.
    left: f64,
    top: f64,
    width: f64,
    height: f64,
}

impl Chart {
    pub fn new(title: &str, subtitle: &str, x: Scale, y: Scale) -> Self {
        let mut svg = Svg::new(WIDTH, TOP + PLOT_HEIGHT + 60.0);
        svg.text((LEFT, 22.0), title, Font::new(16.0).bold());
        if !subtitle.is_empty() {
            svg.text((LEFT, 40.0), subtitle, Font::new(11.0));
        }
        Chart {
            svg,
            x,
            y,
            left: LEFT,
            top: TOP,
            width: WIDTH - LEFT - RIGHT,
            height: PLOT_HEIGHT,
        }
    }

    /// The pixel column of `v` on the x axis.
    pub fn px(&self, v: f64) -> f64 {
        self.left + self.x.fraction(v) * self.width
    }

    /// The pixel row of `v` on the y axis (up is larger).
    pub fn py(&self, v: f64) -> f64 {
        self.top + (1.0 - self.y.fraction(v)) * self.height
    }

    /// The frame's top edge, and the bottom of the strip above it.
    pub fn top(&self) -> f64 {
        self.top
    }

    pub fn bottom(&self) -> f64 {
        self.top + self.height
    }

    /// The frame, grid lines, ticks with their labels, and the axis labels.
    pub fn axes(
        &mut self,
        x_label: &str,
        y_label: &str,
        x_tick: impl Fn(f64) -> String,
        y_tick: impl Fn(f64) -> String,
    ) {
        let grid = Pen::new("#e4e4e4");
        let axis = Pen::new("#444444");
        let small = Font::new(11.0);
        let (l, t, r, b) = (self.left, self.top, self.left + self.width, self.bottom());
        for v in self.x.ticks() {
            let x = self.px(v);
            self.svg.line((x, t), (x, b), grid, None);
            self.svg.line((x, b), (x, b + 5.0), axis, None);
            self.svg
                .text((x, b + 18.0), &x_tick(v), small.anchor(Anchor::Middle));
        }
        for v in self.y.ticks() {
            let y = self.py(v);
            self.svg.line((l, y), (r, y), grid, None);
            self.svg.line((l - 5.0, y), (l, y), axis, None);
            self.svg
                .text((l - 8.0, y + 4.0), &y_tick(v), small.anchor(Anchor::End));
        }
        self.svg.rect(
            (l, t),
            (self.width, self.height),
            Pen::new("none"),
            Some(axis),
        );
        self.svg.text(
            ((l + r) / 2.0, b + 38.0),
            x_label,
            Font::new(12.0).anchor(Anchor::Middle),
        );
        self.svg.text(
            (18.0, (t + b) / 2.0),
            y_label,
            Font::new(12.0).anchor(Anchor::Middle).vertical(),
        );
    }

    /// A vertical line across the frame at `x` (domain value).
    pub fn vline(&mut self, x: f64, pen: Pen, tip: Option<&str>) {
        let px = self.px(x);
        let (t, b) = (self.top, self.bottom());
        self.svg.line((px, t), (px, b), pen, tip);
    }

    /// The legend, flowing left to right in rows below the x-axis label;
    /// then the document.
    pub fn finish(mut self, legend: &[(Swatch, String)]) -> String {
        let font = Font::new(11.0);
        let row_height = 18.0;
        let (mut x, mut y) = (self.left, self.bottom() + 62.0);
        let right = self.left + self.width;
        for (swatch, label) in legend {
            // About 6.5 px a character at 11 px sans-serif.
            let w = 26.0 + 6.5 * label.chars().count() as f64 + 18.0;
            if x > self.left && x + w > right {
                x = self.left;
                y += row_height;
            }
            let mid = y - 4.0;
            match *swatch {
                Swatch::Line(p) => {
                    self.svg
                        .line((x, mid), (x + 20.0, mid), Pen { class: None, ..p }, None)
                }
                Swatch::Dot(p) => self
                    .svg
                    .circle((x + 10.0, mid), 3.5, Pen { class: None, ..p }),
                Swatch::Tick(p) => self.svg.line(
                    (x + 10.0, mid - 6.0),
                    (x + 10.0, mid + 6.0),
                    Pen { class: None, ..p },
                    None,
                ),
            }
            self.svg.text((x + 26.0, y), label, font);
            x += w;
        }
        self.svg.set_height(y + 14.0);
        self.svg.finish()
    }
}

/// A document with a title and one line of text in place of a plot.
pub fn message(title: &str, text: &str) -> String {
    let mut svg = Svg::new(WIDTH, 160.0);
    svg.text((LEFT, 22.0), title, Font::new(16.0).bold());
    svg.text(
        (WIDTH / 2.0, 90.0),
        text,
        Font::new(14.0).anchor(Anchor::Middle),
    );
    svg.finish()
}

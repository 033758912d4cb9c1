//! The synthetic long-video reasoning dataset (`reel data synth`): procedurally drawn videos with
//! multiple-choice questions whose answers need the whole video, in the LongVideo-Reason format.
//!
//! Each video: 2–4 objects, each a different shape (circle, square, triangle, diamond), on a plain
//! dark background. Every object appears at its own frame, moves along a straight path through
//! a midpoint to a final spot well inside one quadrant, changes colour 0–3 times, and disappears
//! at its own frame before the video ends. The scene's [`Event`] log (appear, colour change,
//! disappear; frame, object, colour, position) drives both the drawing and the question, so
//! answers are exact.
//!
//! One question per video, of four kinds (`problem_type`):
//! - `temporal`: which shape appeared first / last (options: the four shapes);
//! - `counting`: how many times a shape changed colour, or how many shapes appeared;
//! - `before_after`: what colour a shape had when another one appeared or disappeared (only
//!   asked where that colour is unambiguous: the same on the frames either side of the event);
//! - `spatial`: in which quadrant a shape was last seen.
//!
//! The reasoning trace walks the relevant events in time order (times in seconds) and concludes
//! with the option. Videos are Motion-JPEG AVI (`videos/<problem_id>.avi`); records are split into
//! `train.jsonl` and `heldout.jsonl` by [`is_held_out`]. Everything is drawn from ChaCha8 streams
//! keyed by (seed, video index): the same settings give byte-identical files.

use std::fmt::Write as _;
use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::longvideo::{is_held_out, write_reason_jsonl, ReasonRecord};
use crate::video::avi::AviWriter;
use crate::{DataError, Result};

/// Generator settings (`reel data synth` flags).
#[derive(Clone, Debug, PartialEq)]
pub struct SynthVideoConfig {
    /// Videos (= records) to generate; default 64.
    pub videos: usize,
    /// Frames per video (≥ 8); default 32.
    pub frames: usize,
    /// Frame width in pixels (≥ 32); default 112.
    pub width: usize,
    /// Frame height in pixels (≥ 32); default 112.
    pub height: usize,
    /// Frames per second written in the AVI; default 4.
    pub fps: f64,
    /// Seed of every random choice; default 0.
    pub seed: u64,
    /// Fraction of records in `heldout.jsonl`; default 0.125.
    pub held_out: f64,
    /// JPEG quality of the frames; default 90.
    pub quality: u8,
    /// Question kinds drawn, by `problem_type` (`temporal`, `counting`, `before_after`,
    /// `spatial`); default empty = all four.
    pub problem_types: Vec<String>,
    /// Reasoning trace of the conclusion only (the trace's last sentence, then the answer)
    /// instead of the event-by-event walk; default false.
    pub brief_reasoning: bool,
    /// Options listed in their pool's order (quadrants, shapes, counts ascending, colours)
    /// instead of shuffled, so the letter follows from the answer; default false.
    pub ordered_options: bool,
    /// Every object keeps one colour of its own for its whole life (no colour changes) and is
    /// named by it ("the red shape"), so the cue a question names is one a patch's mean colour
    /// carries; questions are then about order, count and place (`before_after` and colour-change
    /// counting need colour changes and are not asked); default false.
    pub colour_names: bool,
    /// Questions asked of each video (1–8), distinct where the scene allows; each is its own
    /// record (`<id>`, `<id>-q1`, …) sharing the video file, and all of a video's records fall on
    /// the same side of the held-out split; default 1.
    pub questions_per_video: usize,
}

impl Default for SynthVideoConfig {
    fn default() -> Self {
        SynthVideoConfig {
            videos: 64,
            frames: 32,
            width: 112,
            height: 112,
            fps: 4.0,
            seed: 0,
            held_out: 0.125,
            quality: 90,
            problem_types: Vec::new(),
            brief_reasoning: false,
            ordered_options: false,
            colour_names: false,
            questions_per_video: 1,
        }
    }
}

impl SynthVideoConfig {
    /// Checks the settings; `out` names the dataset in the error.
    fn check(&self, out: &Path) -> Result<()> {
        let bad = |m: String| {
            Err(DataError::config(
                out,
                format!("synthetic video dataset: {m}"),
            ))
        };
        if self.frames < 8 {
            return bad(format!("need at least 8 frames, got {}", self.frames));
        }
        if self.width < 32 || self.height < 32 || self.width > 4096 || self.height > 4096 {
            return bad(format!(
                "frame size must be 32..=4096 a side, got {}x{}",
                self.width, self.height
            ));
        }
        if !(self.fps.is_finite() && self.fps > 0.0) {
            return bad(format!("fps must be > 0, got {}", self.fps));
        }
        if let Some(t) = self
            .problem_types
            .iter()
            .find(|t| !PROBLEM_TYPES.contains(&t.as_str()))
        {
            return bad(format!(
                "unknown problem type `{t}` (expected one of {})",
                PROBLEM_TYPES.join(", ")
            ));
        }
        if !(1..=8).contains(&self.questions_per_video) {
            return bad(format!(
                "questions per video must be 1..=8, got {}",
                self.questions_per_video
            ));
        }
        if self.colour_names && self.problem_types.iter().any(|t| t == "before_after") {
            return bad(
                "`before_after` questions ask about colour changes, which objects named by \
                 colour do not have"
                    .into(),
            );
        }
        if !(0.0..=1.0).contains(&self.held_out) {
            return bad(format!(
                "held-out fraction must be in [0, 1], got {}",
                self.held_out
            ));
        }
        Ok(())
    }
}

/// The question kinds' `problem_type`s.
pub const PROBLEM_TYPES: [&str; 4] = ["temporal", "counting", "before_after", "spatial"];

/// The shapes, one per object of a video.
pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "diamond"];

/// Colour names and their RGB values.
pub const COLORS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 190, 60]),
    ("blue", [50, 90, 235]),
    ("yellow", [235, 215, 40]),
    ("purple", [160, 60, 200]),
    ("white", [245, 245, 245]),
];

const BACKGROUND: [u8; 3] = [30, 30, 30];

/// The quadrants, indexed `2·bottom + right`.
pub const QUADRANTS: [&str; 4] = ["top-left", "top-right", "bottom-left", "bottom-right"];

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The object is drawn from this frame on, in `color`.
    Appear,
    /// From this frame the object is drawn in `color` instead of `from`.
    ColorChange { from: usize },
    /// From this frame the object is gone; `pos` is where it was last seen (the frame before).
    Disappear,
}

/// One entry of a scene's event log.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Event {
    pub frame: usize,
    /// Index into [`Scene::objects`].
    pub object: usize,
    pub kind: EventKind,
    /// Index into [`COLORS`]: the object's colour from this frame (for `Disappear`: its last).
    pub color: usize,
    /// Object centre `(x, y)` in pixels at the event (last seen, for `Disappear`).
    pub pos: (f64, f64),
}

/// One object's life.
#[derive(Clone, Debug, PartialEq)]
pub struct Track {
    /// Index into [`SHAPES`].
    pub shape: usize,
    /// First frame drawn.
    pub appear: usize,
    /// First frame not drawn (< number of frames).
    pub disappear: usize,
    /// Start, middle and final centre; positions are linear in between.
    pub path: [(f64, f64); 3],
    /// `(frame, colour)`: the initial colour at `appear`, then each change.
    pub colors: Vec<(usize, usize)>,
}

impl Track {
    pub fn visible(&self, f: usize) -> bool {
        self.appear <= f && f < self.disappear
    }

    /// Colour index at frame `f` (its last colour after it disappears).
    pub fn color_at(&self, f: usize) -> usize {
        self.colors
            .iter()
            .take_while(|(cf, _)| *cf <= f)
            .last()
            .map_or(self.colors[0].1, |c| c.1)
    }

    /// Centre at frame `f` (clamped to its lifetime).
    pub fn pos_at(&self, f: usize) -> (f64, f64) {
        let last = self.disappear - 1;
        let f = f.clamp(self.appear, last) as f64;
        let (a, l) = (self.appear as f64, last as f64);
        let mid = (a + l) / 2.0;
        let lerp =
            |p: (f64, f64), q: (f64, f64), t: f64| (p.0 + (q.0 - p.0) * t, p.1 + (q.1 - p.1) * t);
        if f <= mid {
            lerp(
                self.path[0],
                self.path[1],
                if mid > a { (f - a) / (mid - a) } else { 1.0 },
            )
        } else {
            lerp(self.path[1], self.path[2], (f - mid) / (l - mid))
        }
    }
}

/// A question about a scene: four options and the index of the right one.
#[derive(Clone, Debug, PartialEq)]
pub struct Question {
    /// `temporal`, `counting`, `before_after` or `spatial`.
    pub problem_type: &'static str,
    pub kind: QuestionKind,
    pub text: String,
    pub options: [String; 4],
    pub answer: usize,
    pub reasoning: String,
}

/// What a question asks, with the objects it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuestionKind {
    /// Which shape appeared first (`first`) or last.
    Order { first: bool },
    /// How many times `object` changed colour.
    ColorChanges { object: usize },
    /// How many shapes appeared.
    ObjectCount,
    /// `object`'s colour when `other` appeared (`appeared`) or disappeared.
    ColorAtEvent {
        object: usize,
        other: usize,
        appeared: bool,
    },
    /// The quadrant where `object` was last seen.
    LastQuadrant { object: usize },
}

impl QuestionKind {
    /// The `problem_type` of questions of this kind.
    pub fn problem_type(&self) -> &'static str {
        match self {
            QuestionKind::Order { .. } => "temporal",
            QuestionKind::ColorChanges { .. } | QuestionKind::ObjectCount => "counting",
            QuestionKind::ColorAtEvent { .. } => "before_after",
            QuestionKind::LastQuadrant { .. } => "spatial",
        }
    }
}

/// One synthetic video: its objects, event log (time order) and questions.
#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    pub width: usize,
    pub height: usize,
    pub frames: usize,
    pub fps: f64,
    /// Objects are named by their (one) colour, not their shape.
    pub colour_names: bool,
    pub objects: Vec<Track>,
    pub events: Vec<Event>,
    /// `SynthVideoConfig::questions_per_video` questions (at least one).
    pub questions: Vec<Question>,
}

/// Quadrant index (`2·bottom + right`) of a point.
pub fn quadrant(pos: (f64, f64), width: usize, height: usize) -> usize {
    let right = pos.0 >= width as f64 / 2.0;
    let bottom = pos.1 >= height as f64 / 2.0;
    2 * bottom as usize + right as usize
}

/// `1.25s`, `2s`: a frame's time.
fn secs(frame: usize, fps: f64) -> String {
    let s = format!("{:.2}", frame as f64 / fps);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}s")
}

const LETTERS: [char; 4] = ['A', 'B', 'C', 'D'];

impl Scene {
    /// Object radius in pixels.
    pub fn radius(&self) -> f64 {
        (self.width.min(self.height) as f64 / 10.0).max(4.0)
    }

    /// Draws frame `f` as `[H, W, 3]` RGB.
    pub fn render(&self, f: usize) -> Vec<u8> {
        let (w, h) = (self.width, self.height);
        let mut img: Vec<u8> = BACKGROUND.iter().copied().cycle().take(w * h * 3).collect();
        let r = self.radius();
        for t in self.objects.iter().filter(|t| t.visible(f)) {
            let (cx, cy) = t.pos_at(f);
            let rgb = COLORS[t.color_at(f)].1;
            let (x0, x1) = (
                (cx - r).floor().max(0.0) as usize,
                ((cx + r).ceil() as usize).min(w - 1),
            );
            let (y0, y1) = (
                (cy - r).floor().max(0.0) as usize,
                ((cy + r).ceil() as usize).min(h - 1),
            );
            for y in y0..=y1 {
                for x in x0..=x1 {
                    let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
                    let inside = match SHAPES[t.shape] {
                        "circle" => dx * dx + dy * dy <= r * r,
                        "square" => dx.abs() <= 0.8 * r && dy.abs() <= 0.8 * r,
                        "triangle" => dy.abs() <= r && dx.abs() <= (dy + r) / 2.0,
                        _ => dx.abs() + dy.abs() <= r,
                    };
                    if inside {
                        img[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&rgb);
                    }
                }
            }
        }
        img
    }

    /// How questions and traces name object `o`: its shape, or `<colour> shape`.
    fn name(&self, o: usize) -> String {
        let t = &self.objects[o];
        if self.colour_names {
            format!("{} shape", COLORS[t.colors[0].1].0)
        } else {
            SHAPES[t.shape].to_string()
        }
    }

    /// The attribute `name` leaves out: the first colour, or the shape.
    fn other_attribute(&self, o: usize) -> &'static str {
        let t = &self.objects[o];
        if self.colour_names {
            SHAPES[t.shape]
        } else {
            COLORS[t.colors[0].1].0
        }
    }

    fn t(&self, frame: usize) -> String {
        secs(frame, self.fps)
    }
}

/// Generates scene `index` of `cfg` (its objects, events and question).
pub fn synth_scene(cfg: &SynthVideoConfig, index: usize) -> Scene {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    rng.set_stream(index as u64);
    let (w, h, nf) = (cfg.width, cfg.height, cfg.frames);
    let r = (w.min(h) as f64 / 10.0).max(4.0);
    let k = rng.random_range(2..=4usize);
    let mut shapes: Vec<usize> = (0..SHAPES.len()).collect();
    shapes.shuffle(&mut rng);
    // Named by colour: one colour each, all different (drawn only then, so the default streams
    // stay as they were).
    let mut palette: Vec<usize> = (0..COLORS.len()).collect();
    if cfg.colour_names {
        palette.shuffle(&mut rng);
    }
    // Distinct appear frames in the first half, distinct disappear frames after a third of the
    // video has passed for each object.
    let mut appears: Vec<usize> = (0..nf / 2).collect();
    appears.shuffle(&mut rng);
    let mut disappear_used: Vec<usize> = Vec::new();
    let mut objects = Vec::new();
    let rand_pos = |rng: &mut ChaCha8Rng| {
        (
            rng.random_range(r..w as f64 - r),
            rng.random_range(r..h as f64 - r),
        )
    };
    for (j, &shape) in shapes.iter().take(k).enumerate() {
        let appear = appears
            .pop()
            .expect("nf/2 ≥ 4 frames for at most 4 objects");
        let lo = appear + nf / 3;
        let mut disappear;
        loop {
            disappear = rng.random_range(lo.min(nf - 1)..nf);
            if !disappear_used.contains(&disappear) || disappear_used.len() >= nf - lo {
                break;
            }
        }
        disappear_used.push(disappear);
        let disappear = disappear.max(appear + 2);
        // Final spot: well inside a quadrant (margin r + 2 from the midlines and edges).
        let q = rng.random_range(0..4usize);
        let m = r + 2.0;
        let (xs, ys) = (
            if q.is_multiple_of(2) {
                (m, w as f64 / 2.0 - m)
            } else {
                (w as f64 / 2.0 + m, w as f64 - m)
            },
            if q / 2 == 0 {
                (m, h as f64 / 2.0 - m)
            } else {
                (h as f64 / 2.0 + m, h as f64 - m)
            },
        );
        let end = (
            rng.random_range(xs.0..xs.1.max(xs.0 + 1e-9)),
            rng.random_range(ys.0..ys.1.max(ys.0 + 1e-9)),
        );
        let path = [rand_pos(&mut rng), rand_pos(&mut rng), end];
        // Colour changes at frames in (appear, disappear - 1), at least 2 frames apart.
        let n_changes = if cfg.colour_names {
            0
        } else {
            rng.random_range(0..=3usize)
        };
        let mut frames_at: Vec<usize> = Vec::new();
        for _ in 0..20 {
            if frames_at.len() == n_changes || appear + 2 >= disappear - 1 {
                break;
            }
            let f = rng.random_range(appear + 2..disappear - 1);
            if frames_at.iter().all(|&g| g.abs_diff(f) >= 2) {
                frames_at.push(f);
            }
        }
        frames_at.sort_unstable();
        let mut color = if cfg.colour_names {
            palette[j]
        } else {
            rng.random_range(0..COLORS.len())
        };
        let mut colors = vec![(appear, color)];
        for f in frames_at {
            let next = (color + rng.random_range(1..COLORS.len())) % COLORS.len();
            colors.push((f, next));
            color = next;
        }
        objects.push(Track {
            shape,
            appear,
            disappear,
            path,
            colors,
        });
    }
    let mut events = Vec::new();
    for (o, t) in objects.iter().enumerate() {
        events.push(Event {
            frame: t.appear,
            object: o,
            kind: EventKind::Appear,
            color: t.colors[0].1,
            pos: t.pos_at(t.appear),
        });
        for pair in t.colors.windows(2) {
            events.push(Event {
                frame: pair[1].0,
                object: o,
                kind: EventKind::ColorChange { from: pair[0].1 },
                color: pair[1].1,
                pos: t.pos_at(pair[1].0),
            });
        }
        events.push(Event {
            frame: t.disappear,
            object: o,
            kind: EventKind::Disappear,
            color: t.color_at(t.disappear),
            pos: t.pos_at(t.disappear - 1),
        });
    }
    events.sort_by_key(|e| (e.frame, e.object));
    let mut scene = Scene {
        width: w,
        height: h,
        frames: nf,
        fps: cfg.fps,
        colour_names: cfg.colour_names,
        objects,
        events,
        questions: Vec::new(),
    };
    let first = ask(&scene, cfg, &mut rng);
    scene.questions.push(first);
    // Further questions: redrawn (a few times at most) while they repeat one already asked.
    for _ in 1..cfg.questions_per_video {
        let mut q = ask(&scene, cfg, &mut rng);
        for _ in 0..16 {
            if scene.questions.iter().all(|o| o.text != q.text) {
                break;
            }
            q = ask(&scene, cfg, &mut rng);
        }
        scene.questions.push(q);
    }
    scene
}

/// Four options: `correct` plus three distinct distractors from `pool`, shuffled.
fn options(
    rng: &mut ChaCha8Rng,
    correct: String,
    pool: Vec<String>,
    ordered: bool,
) -> ([String; 4], usize) {
    let mut others: Vec<String> = pool.iter().filter(|p| **p != correct).cloned().collect();
    others.shuffle(rng);
    let mut opts = vec![correct.clone()];
    opts.extend(others.into_iter().take(3));
    opts.shuffle(rng);
    if ordered {
        opts.sort_by_key(|o| pool.iter().position(|p| p == o));
    }
    let answer = opts
        .iter()
        .position(|o| *o == correct)
        .expect("correct is an option");
    let opts: [String; 4] = opts.try_into().expect("pools hold at least four values");
    (opts, answer)
}

/// Picks and words the question of `scene`, with its reasoning trace.
fn ask(s: &Scene, cfg: &SynthVideoConfig, rng: &mut ChaCha8Rng) -> Question {
    loop {
        let kind = match rng.random_range(0..5) {
            // Objects named by colour never change it.
            1 | 3 if s.colour_names => continue,
            0 => QuestionKind::Order {
                first: rng.random_bool(0.5),
            },
            1 => QuestionKind::ColorChanges {
                object: rng.random_range(0..s.objects.len()),
            },
            2 => QuestionKind::ObjectCount,
            3 => {
                let object = rng.random_range(0..s.objects.len());
                let other = rng.random_range(0..s.objects.len());
                let appeared = rng.random_bool(0.5);
                let t = &s.objects[object];
                let o = &s.objects[other];
                let f = if appeared { o.appear } else { o.disappear - 1 };
                let (before, after) = if appeared {
                    (f.saturating_sub(1), f)
                } else {
                    (f, f + 1)
                };
                // Unambiguous: the object is visible, with one colour, on both sides.
                let ok = other != object
                    && f >= 1
                    && t.visible(before)
                    && t.visible(after)
                    && t.color_at(before) == t.color_at(after);
                if !ok {
                    continue;
                }
                QuestionKind::ColorAtEvent {
                    object,
                    other,
                    appeared,
                }
            }
            _ => QuestionKind::LastQuadrant {
                object: rng.random_range(0..s.objects.len()),
            },
        };
        let allowed = &cfg.problem_types;
        if !allowed.is_empty() && !allowed.iter().any(|t| t == kind.problem_type()) {
            continue;
        }
        return word(s, kind, cfg, rng);
    }
}

fn word(s: &Scene, kind: QuestionKind, cfg: &SynthVideoConfig, rng: &mut ChaCha8Rng) -> Question {
    let mut why = String::new();
    let names = || {
        if s.colour_names {
            COLORS
                .iter()
                .map(|c| format!("the {} shape", c.0))
                .collect::<Vec<_>>()
        } else {
            SHAPES
                .iter()
                .map(|x| format!("the {x}"))
                .collect::<Vec<_>>()
        }
    };
    let (problem_type, text, correct, pool) = match kind {
        QuestionKind::Order { first } => {
            let mut order: Vec<usize> = (0..s.objects.len()).collect();
            order.sort_by_key(|&o| s.objects[o].appear);
            for &o in &order {
                let t = &s.objects[o];
                let _ = write!(
                    why,
                    "The {} appears at {} ({}). ",
                    s.name(o),
                    s.t(t.appear),
                    s.other_attribute(o)
                );
            }
            let pick = if first {
                order[0]
            } else {
                *order.last().expect("≥ 2 objects")
            };
            let word = if first { "first" } else { "last" };
            let _ = write!(why, "So the {} appeared {word}.", s.name(pick));
            (
                "temporal",
                format!("Which shape appeared {word} in the video?"),
                format!("the {}", s.name(pick)),
                names(),
            )
        }
        QuestionKind::ColorChanges { object } => {
            let t = &s.objects[object];
            let _ = write!(
                why,
                "The {} appears at {} in {}. ",
                s.name(object),
                s.t(t.appear),
                COLORS[t.colors[0].1].0
            );
            for pair in t.colors.windows(2) {
                let _ = write!(
                    why,
                    "At {} it turns from {} to {}. ",
                    s.t(pair[1].0),
                    COLORS[pair[0].1].0,
                    COLORS[pair[1].1].0
                );
            }
            let n = t.colors.len() - 1;
            let _ = write!(
                why,
                "It disappears at {}. It changed colour {n} time{}.",
                s.t(t.disappear),
                if n == 1 { "" } else { "s" }
            );
            (
                "counting",
                format!("How many times did the {} change colour?", s.name(object)),
                n.to_string(),
                (0..=5).map(|x| x.to_string()).collect(),
            )
        }
        QuestionKind::ObjectCount => {
            let mut order: Vec<usize> = (0..s.objects.len()).collect();
            order.sort_by_key(|&o| s.objects[o].appear);
            for (k, &o) in order.iter().enumerate() {
                let _ = write!(
                    why,
                    "At {} a {} appears ({} so far). ",
                    s.t(s.objects[o].appear),
                    s.name(o),
                    k + 1
                );
            }
            let n = s.objects.len();
            let _ = write!(why, "No other shape appears, so {n} shapes appeared.");
            (
                "counting",
                "How many different shapes appeared in the video?".to_string(),
                n.to_string(),
                (1..=6).map(|x| x.to_string()).collect(),
            )
        }
        QuestionKind::ColorAtEvent {
            object,
            other,
            appeared,
        } => {
            let t = &s.objects[object];
            let o = &s.objects[other];
            let f = if appeared { o.appear } else { o.disappear - 1 };
            let verb = if appeared { "appeared" } else { "disappeared" };
            let at = if appeared { o.appear } else { o.disappear };
            let _ = write!(why, "The {} {verb} at {}. ", s.name(other), s.t(at));
            let _ = write!(
                why,
                "The {} appeared at {} in {}",
                s.name(object),
                s.t(t.appear),
                COLORS[t.colors[0].1].0
            );
            let changes: Vec<&(usize, usize)> =
                t.colors[1..].iter().filter(|(cf, _)| *cf <= f).collect();
            if changes.is_empty() {
                why.push_str(" and had not changed colour by then. ");
            } else {
                for (cf, c) in changes {
                    let _ = write!(why, ", turned {} at {}", COLORS[*c].0, s.t(*cf));
                }
                why.push_str(". ");
            }
            let c = COLORS[t.color_at(f)].0;
            let _ = write!(
                why,
                "So when the {} {verb}, the {} was {c}.",
                s.name(other),
                s.name(object)
            );
            (
                "before_after",
                format!(
                    "What colour was the {} when the {} {verb}?",
                    s.name(object),
                    s.name(other)
                ),
                c.to_string(),
                COLORS.iter().map(|c| c.0.to_string()).collect(),
            )
        }
        QuestionKind::LastQuadrant { object } => {
            let t = &s.objects[object];
            let (w, h) = (s.width, s.height);
            let start = quadrant(t.path[0], w, h);
            let last = t.pos_at(t.disappear - 1);
            let q = quadrant(last, w, h);
            let _ = write!(
                why,
                "The {} appears at {} in the {} of the frame and moves around. It is last seen at {}, \
                 in the {} half and the {} half of the frame, just before it disappears at {}. ",
                s.name(object),
                s.t(t.appear),
                QUADRANTS[start],
                s.t(t.disappear - 1),
                if q / 2 == 0 { "top" } else { "bottom" },
                if q.is_multiple_of(2) { "left" } else { "right" },
                s.t(t.disappear)
            );
            let _ = write!(why, "So it ended up in the {}.", QUADRANTS[q]);
            (
                "spatial",
                format!(
                    "In which part of the frame was the {} when it was last seen?",
                    s.name(object)
                ),
                QUADRANTS[q].to_string(),
                QUADRANTS.iter().map(|q| q.to_string()).collect(),
            )
        }
    };
    debug_assert_eq!(problem_type, kind.problem_type());
    if cfg.brief_reasoning {
        // The conclusion: the last sentence of the walk.
        let start = why.trim_end().rfind(". ").map_or(0, |i| i + 2);
        why = why[start..].trim().to_string();
    }
    let (options, answer) = options(rng, correct, pool, cfg.ordered_options);
    let _ = write!(why, " The answer is {}.", LETTERS[answer]);
    Question {
        problem_type,
        kind,
        text,
        options,
        answer,
        reasoning: why,
    }
}

/// The problem id of video `index`.
pub fn synth_problem_id(cfg: &SynthVideoConfig, index: usize) -> String {
    format!("synth-s{}-{index:05}", cfg.seed)
}

/// The problem id of question `j` of video `index`: the video's id, then `-q<j>` from the second.
pub fn synth_question_id(cfg: &SynthVideoConfig, index: usize, j: usize) -> String {
    let id = synth_problem_id(cfg, index);
    if j == 0 {
        id
    } else {
        format!("{id}-q{j}")
    }
}

/// The LongVideo-Reason record of question `q` (video at `video_path`, relative to the JSONL
/// folder).
pub fn synth_record(q: &Question, problem_id: String, video_path: String) -> ReasonRecord {
    let mut problem = q.text.clone();
    for (l, o) in LETTERS.iter().zip(&q.options) {
        let _ = write!(problem, "\n{l}. {o}");
    }
    ReasonRecord {
        problem_id,
        problem,
        data_type: "video".into(),
        problem_type: q.problem_type.into(),
        reasoning: q.reasoning.clone(),
        videos: vec![video_path],
        answer: LETTERS[q.answer].to_string(),
    }
}

/// What [`write_synth_dataset`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthSummary {
    pub train: usize,
    pub held_out: usize,
    /// Frames written over all videos.
    pub frames: usize,
    /// Bytes of all video files.
    pub video_bytes: u64,
}

/// Writes `out/videos/<id>.avi`, `out/train.jsonl` and `out/heldout.jsonl`.
pub fn write_synth_dataset(cfg: &SynthVideoConfig, out: &Path) -> Result<SynthSummary> {
    cfg.check(out)?;
    let vdir = out.join("videos");
    std::fs::create_dir_all(&vdir).map_err(|e| DataError::io(&vdir, e))?;
    let (mut train, mut held) = (Vec::new(), Vec::new());
    let mut summary = SynthSummary {
        train: 0,
        held_out: 0,
        frames: 0,
        video_bytes: 0,
    };
    for i in 0..cfg.videos {
        let scene = synth_scene(cfg, i);
        let id = synth_problem_id(cfg, i);
        let rel = format!("videos/{id}.avi");
        let path = out.join(&rel);
        let mut w = AviWriter::create(&path, cfg.width, cfg.height, cfg.fps, cfg.quality)?;
        for f in 0..cfg.frames {
            w.write_frame(&scene.render(f))?;
        }
        w.finish()?;
        summary.frames += cfg.frames;
        summary.video_bytes += std::fs::metadata(&path)
            .map_err(|e| DataError::io(&path, e))?
            .len();
        // The split follows the video, so no held-out question's video is trained on.
        let side = if is_held_out(&id, cfg.held_out, cfg.seed) {
            &mut held
        } else {
            &mut train
        };
        for (j, q) in scene.questions.iter().enumerate() {
            side.push(synth_record(q, synth_question_id(cfg, i, j), rel.clone()));
        }
    }
    write_reason_jsonl(&out.join("train.jsonl"), &train)?;
    write_reason_jsonl(&out.join("heldout.jsonl"), &held)?;
    summary.train = train.len();
    summary.held_out = held.len();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::longvideo::{validate_reason_file, ReasonFile, VideoCheck};
    use crate::video::Video;

    /// The right option's text, recomputed from the event log alone.
    fn answer_from_events(s: &Scene, q: &Question) -> String {
        let ev = &s.events;
        let name = |o: usize| s.name(o);
        let appear_of = |o: usize| {
            ev.iter()
                .find(|e| e.object == o && e.kind == EventKind::Appear)
                .unwrap()
        };
        let disappear_of = |o: usize| {
            ev.iter()
                .find(|e| e.object == o && e.kind == EventKind::Disappear)
                .unwrap()
        };
        match q.kind {
            QuestionKind::Order { first } => {
                let appears = ev.iter().filter(|e| e.kind == EventKind::Appear);
                let e = if first {
                    appears.min_by_key(|e| e.frame).unwrap()
                } else {
                    appears.max_by_key(|e| e.frame).unwrap()
                };
                format!("the {}", name(e.object))
            }
            QuestionKind::ColorChanges { object } => ev
                .iter()
                .filter(|e| e.object == object && matches!(e.kind, EventKind::ColorChange { .. }))
                .count()
                .to_string(),
            QuestionKind::ObjectCount => ev
                .iter()
                .filter(|e| e.kind == EventKind::Appear)
                .count()
                .to_string(),
            QuestionKind::ColorAtEvent {
                object,
                other,
                appeared,
            } => {
                let f = if appeared {
                    appear_of(other).frame
                } else {
                    disappear_of(other).frame - 1
                };
                let e = ev
                    .iter()
                    .rev()
                    .find(|e| e.object == object && e.kind != EventKind::Disappear && e.frame <= f)
                    .unwrap();
                // Visible on both frames either side of the event.
                let (before, after) = if appeared { (f - 1, f) } else { (f, f + 1) };
                assert!(appear_of(object).frame <= before && disappear_of(object).frame > after);
                COLORS[e.color].0.to_string()
            }
            QuestionKind::LastQuadrant { object } => {
                QUADRANTS[quadrant(disappear_of(object).pos, s.width, s.height)].to_string()
            }
        }
    }

    #[test]
    fn answers_recomputed_from_the_event_log() {
        let mut types = std::collections::BTreeSet::new();
        for (frames, w, h) in [(8, 32, 32), (16, 64, 48), (40, 112, 112)] {
            let cfg = SynthVideoConfig {
                frames,
                width: w,
                height: h,
                seed: 3,
                ..Default::default()
            };
            for i in 0..150 {
                let s = synth_scene(&cfg, i);
                let q = &s.questions[0];
                assert_eq!(
                    q.options[q.answer],
                    answer_from_events(&s, q),
                    "scene {i}: {q:?}"
                );
                let mut opts = q.options.to_vec();
                opts.sort();
                opts.dedup();
                assert_eq!(opts.len(), 4, "distinct options: {q:?}");
                assert!(q
                    .reasoning
                    .ends_with(&format!("The answer is {}.", LETTERS[q.answer])));
                // Events are in time order and inside the video.
                assert!(s.events.windows(2).all(|p| p[0].frame <= p[1].frame));
                assert!(s.events.iter().all(|e| e.frame < frames));
                let rec = synth_record(q, synth_problem_id(&cfg, i), "v.avi".into());
                assert_eq!(rec.answer, LETTERS[q.answer].to_string());
                let back =
                    ReasonRecord::from_json(&serde_json::from_str(&rec.to_json_line()).unwrap());
                assert_eq!(back.unwrap(), rec);
                types.insert(q.problem_type);
            }
        }
        assert_eq!(
            types.into_iter().collect::<Vec<_>>(),
            vec!["before_after", "counting", "spatial", "temporal"]
        );
    }

    #[test]
    fn problem_types_filter_the_questions_and_brief_traces_keep_the_conclusion() {
        let base = SynthVideoConfig {
            videos: 40,
            frames: 16,
            width: 56,
            height: 56,
            ..Default::default()
        };
        let only = SynthVideoConfig {
            problem_types: vec!["spatial".into(), "temporal".into()],
            ..base.clone()
        };
        let brief = SynthVideoConfig {
            brief_reasoning: true,
            ..base.clone()
        };
        let ordered = SynthVideoConfig {
            ordered_options: true,
            ..base.clone()
        };
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..base.videos {
            let q = synth_scene(&only, i).questions.remove(0);
            assert!(["spatial", "temporal"].contains(&q.problem_type), "{q:?}");
            seen.insert(q.problem_type);
            // The same scene, briefly reasoned: the full trace's last sentence and the answer.
            let full = synth_scene(&base, i).questions.remove(0);
            let short = synth_scene(&brief, i).questions.remove(0);
            assert_eq!((short.answer, &short.options), (full.answer, &full.options));
            assert!(full.reasoning.ends_with(&short.reasoning), "{short:?}");
            assert_eq!(
                short.reasoning.matches(". ").count(),
                1,
                "{}",
                short.reasoning
            );
            assert!(short.reasoning.len() < full.reasoning.len());
            // Ordered options: the same set in pool order (quadrants as listed, counts up).
            let o = synth_scene(&ordered, i).questions.remove(0);
            let mut set = full.options.to_vec();
            set.sort();
            let mut oset = o.options.to_vec();
            oset.sort();
            assert_eq!(set, oset);
            assert_eq!(o.options[o.answer], full.options[full.answer]);
            if o.problem_type == "spatial" {
                assert_eq!(o.options.to_vec(), QUADRANTS.to_vec(), "{o:?}");
            }
            if let QuestionKind::ObjectCount = o.kind {
                let n: Vec<u32> = o.options.iter().map(|x| x.parse().unwrap()).collect();
                assert!(n.windows(2).all(|w| w[0] < w[1]), "{n:?}");
            }
        }
        assert_eq!(seen.len(), 2);
        let bad = SynthVideoConfig {
            problem_types: vec!["colour".into()],
            ..base
        };
        let tmp = tempfile::tempdir().unwrap();
        let e = write_synth_dataset(&bad, tmp.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`colour`"), "{e}");
    }

    #[test]
    fn colour_names_keep_one_colour_per_object_and_several_questions_share_a_video() {
        let base = SynthVideoConfig {
            videos: 60,
            frames: 16,
            width: 56,
            height: 56,
            seed: 5,
            held_out: 0.3,
            ..Default::default()
        };
        let cfg = SynthVideoConfig {
            colour_names: true,
            questions_per_video: 3,
            ..base.clone()
        };
        let mut types = std::collections::BTreeSet::new();
        for i in 0..cfg.videos {
            let s = synth_scene(&cfg, i);
            // One colour each, all different, and never a colour change.
            let mut firsts: Vec<usize> = s.objects.iter().map(|t| t.colors[0].1).collect();
            assert!(s.objects.iter().all(|t| t.colors.len() == 1), "{s:?}");
            firsts.sort_unstable();
            firsts.dedup();
            assert_eq!(firsts.len(), s.objects.len());
            assert_eq!(s.questions.len(), 3);
            for q in &s.questions {
                assert_eq!(q.options[q.answer], answer_from_events(&s, q), "{q:?}");
                assert!(
                    !matches!(
                        q.kind,
                        QuestionKind::ColorChanges { .. } | QuestionKind::ColorAtEvent { .. }
                    ),
                    "{q:?}"
                );
                // Named by colour, never by shape.
                assert!(SHAPES.iter().all(|x| !q.text.contains(x)), "{}", q.text);
                types.insert(q.problem_type);
            }
            if let QuestionKind::Order { .. } = s.questions[0].kind {
                assert!(s.questions[0].options.iter().all(|o| o.ends_with(" shape")));
            }
        }
        assert_eq!(
            types.into_iter().collect::<Vec<_>>(),
            vec!["counting", "spatial", "temporal"]
        );
        // More questions leave the scene and its first question as one question draws them.
        let three = SynthVideoConfig {
            questions_per_video: 3,
            ..base.clone()
        };
        for i in 0..10 {
            let (a, b) = (synth_scene(&base, i), synth_scene(&three, i));
            assert_eq!((&a.objects, &a.events), (&b.objects, &b.events));
            assert_eq!(a.questions[0], b.questions[0]);
        }

        // Files: three records per video, ids <id>, <id>-q1, <id>-q2, one video each, and a
        // video's records all on one side of the split.
        let tmp = tempfile::tempdir().unwrap();
        let sum = write_synth_dataset(&cfg, tmp.path()).unwrap();
        assert_eq!(sum.train + sum.held_out, 3 * cfg.videos);
        assert!(sum.held_out > 0 && sum.train > 0);
        let mut side = std::collections::HashMap::new();
        for (f, held) in [("train.jsonl", false), ("heldout.jsonl", true)] {
            let recs = ReasonFile::read(&tmp.path().join(f)).unwrap().records;
            for r in recs {
                let video = r.videos[0].clone();
                let base_id = r.problem_id.split("-q").next().unwrap().to_string();
                assert_eq!(video, format!("videos/{base_id}.avi"));
                assert_eq!(*side.entry(video).or_insert(held), held);
            }
        }
        assert_eq!(side.len(), cfg.videos);
        // Refused: colour-change questions of objects that keep their colour; 0 or 9 questions.
        for bad in [
            SynthVideoConfig {
                problem_types: vec!["before_after".into()],
                ..cfg.clone()
            },
            SynthVideoConfig {
                questions_per_video: 0,
                ..cfg.clone()
            },
            SynthVideoConfig {
                questions_per_video: 9,
                ..cfg.clone()
            },
        ] {
            let e = write_synth_dataset(&bad, tmp.path())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("before_after") || e.contains("questions per video"),
                "{e}"
            );
        }
    }

    #[test]
    fn same_seed_same_bytes_and_the_videos_show_the_log() {
        let cfg = SynthVideoConfig {
            videos: 6,
            frames: 12,
            width: 64,
            height: 48,
            seed: 11,
            held_out: 0.5,
            ..Default::default()
        };
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let sa = write_synth_dataset(&cfg, a.path()).unwrap();
        let sb = write_synth_dataset(&cfg, b.path()).unwrap();
        assert_eq!(sa, sb);
        assert_eq!(sa.train + sa.held_out, 6);
        assert_eq!(sa.frames, 72);
        for f in ["train.jsonl", "heldout.jsonl"] {
            assert_eq!(
                std::fs::read(a.path().join(f)).unwrap(),
                std::fs::read(b.path().join(f)).unwrap()
            );
        }
        for i in 0..6 {
            let rel = format!("videos/{}.avi", synth_problem_id(&cfg, i));
            assert_eq!(
                std::fs::read(a.path().join(&rel)).unwrap(),
                std::fs::read(b.path().join(&rel)).unwrap()
            );
        }
        write_synth_dataset(
            &SynthVideoConfig {
                seed: 12,
                ..cfg.clone()
            },
            c.path(),
        )
        .unwrap();
        let read = |d: &Path| {
            [
                std::fs::read(d.join("train.jsonl")).unwrap(),
                std::fs::read(d.join("heldout.jsonl")).unwrap(),
            ]
            .concat()
        };
        assert_ne!(read(a.path()), read(c.path()));

        // Every record validates, videos decoded.
        let mut n = 0;
        for f in ["train.jsonl", "heldout.jsonl"] {
            let (file, errs) = validate_reason_file(&a.path().join(f), VideoCheck::Full).unwrap();
            assert!(errs.is_empty(), "{errs:?}");
            n += file.records.len();
            // Held-out membership is the documented hash split.
            let (train, held) = file.split(cfg.held_out, cfg.seed);
            assert_eq!(
                if f == "train.jsonl" {
                    held.len()
                } else {
                    train.len()
                },
                0
            );
        }
        assert_eq!(n, 6);

        // The decoded video shows the log: each object's colour at its centre mid-life (where no
        // other object covers it), and an empty last frame.
        let file = ReasonFile::read(&a.path().join("train.jsonl")).unwrap();
        for (k, rec) in file.records.iter().enumerate() {
            let i: usize = rec.problem_id.rsplit('-').next().unwrap().parse().unwrap();
            let s = synth_scene(&cfg, i);
            let v = Video::open(&file.video_paths(k)[0]).unwrap();
            let all = v.decode(&(0..cfg.frames).collect::<Vec<_>>()).unwrap();
            assert!(all
                .frame(cfg.frames - 1)
                .chunks(3)
                .all(|p| p.iter().zip(BACKGROUND).all(|(a, b)| a.abs_diff(b) < 12)));
            let r = s.radius();
            for (o, t) in s.objects.iter().enumerate() {
                let f = (t.appear + t.disappear) / 2;
                let (cx, cy) = t.pos_at(f);
                let covered = s.objects.iter().enumerate().any(|(p, u)| {
                    let (ux, uy) = u.pos_at(f);
                    p != o && u.visible(f) && (ux - cx).hypot(uy - cy) < 2.2 * r
                });
                if covered {
                    continue;
                }
                let (x, y) = (cx as usize, cy as usize);
                let px = &all.frame(f)[(y * cfg.width + x) * 3..(y * cfg.width + x) * 3 + 3];
                let want = COLORS[t.color_at(f)].1;
                assert!(
                    px.iter().zip(want).all(|(a, b)| a.abs_diff(b) < 40),
                    "video {i} object {o} frame {f}: {px:?} vs {want:?}"
                );
            }
        }
    }

    #[test]
    fn bad_settings_are_refused() {
        let d = tempfile::tempdir().unwrap();
        for cfg in [
            SynthVideoConfig {
                frames: 7,
                ..Default::default()
            },
            SynthVideoConfig {
                width: 16,
                ..Default::default()
            },
            SynthVideoConfig {
                held_out: 1.5,
                ..Default::default()
            },
        ] {
            assert!(write_synth_dataset(&cfg, d.path()).is_err());
        }
    }
}

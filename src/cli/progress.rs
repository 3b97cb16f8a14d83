//! Rendering build events: spinners on a terminal, BuildKit-style plain lines in CI logs,
//! one JSON object per line with `--progress json`. All of it goes to stderr; stdout carries
//! only the result.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::images::human_size;
use crate::build::Event;
use crate::digest::Digest;
use crate::store::ImageName;

/// How to show progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Spinners (a terminal).
    Tty,
    /// Plain lines.
    Plain,
    /// JSON lines.
    Json,
    /// Nothing.
    Quiet,
}

impl Mode {
    /// From `--progress`.
    pub fn parse(s: &str) -> Mode {
        match s {
            "plain" => Mode::Plain,
            "tty" => Mode::Tty,
            "json" | "rawjson" => Mode::Json,
            "quiet" => Mode::Quiet,
            _ if std::io::stderr().is_terminal() => Mode::Tty,
            _ => Mode::Plain,
        }
    }
}

/// Renders events in one [`Mode`].
pub struct Renderer {
    mode: Mode,
    bars: HashMap<usize, (ProgressBar, String)>,
}

impl Renderer {
    /// A renderer for `mode`.
    pub fn new(mode: Mode) -> Renderer {
        Renderer {
            mode,
            bars: HashMap::new(),
        }
    }

    fn line(&self, s: &str) {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{s}");
    }

    /// Show one event.
    pub fn event(&mut self, e: &Event) {
        match (self.mode, e) {
            (Mode::Quiet, _) => {}
            (Mode::Json, e) => {
                let v = match e {
                    Event::Step {
                        id,
                        stage,
                        index,
                        total,
                        text,
                    } => {
                        json!({"type": "step", "id": id, "stage": stage, "index": index, "total": total, "text": text})
                    }
                    Event::StepDone {
                        id,
                        cached,
                        layer,
                        millis,
                    } => json!({
                        "type": "step_done", "id": id, "millis": millis, "cached": cached,
                        "layer": layer.as_ref().map(|l| json!({"digest": l.digest.to_string(), "size": l.size, "mediaType": l.media_type.to_string()})),
                    }),
                    Event::Warning(m) => json!({"type": "warning", "message": m}),
                };
                self.line(&v.to_string());
            }
            (_, Event::Warning(m)) => {
                self.line(&format!("WARNING: {m}"));
            }
            (
                Mode::Plain,
                Event::Step {
                    id,
                    stage,
                    index,
                    total,
                    text,
                },
            ) => self.line(&format!("#{id} [{stage} {index}/{total}] {text}")),
            (
                Mode::Plain,
                Event::StepDone {
                    id,
                    cached,
                    layer,
                    millis,
                },
            ) => {
                let extra = layer
                    .as_ref()
                    .map(|l| format!(" (layer {} {})", l.digest.short(), human_size(l.size)))
                    .unwrap_or_default();
                if *cached {
                    self.line(&format!("#{id} CACHED{extra}"));
                } else {
                    self.line(&format!(
                        "#{id} DONE {:.1}s{extra}",
                        *millis as f64 / 1000.0
                    ));
                }
            }
            (
                Mode::Tty,
                Event::Step {
                    id,
                    stage,
                    index,
                    total,
                    text,
                },
            ) => {
                let bar = ProgressBar::new_spinner();
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                        .expect("static template is valid"),
                );
                let msg = format!("[{stage} {index}/{total}] {text}");
                bar.set_message(msg.clone());
                bar.enable_steady_tick(std::time::Duration::from_millis(100));
                self.bars.insert(*id, (bar, msg));
            }
            (
                Mode::Tty,
                Event::StepDone {
                    id,
                    cached,
                    layer,
                    millis,
                },
            ) => {
                if let Some((bar, msg)) = self.bars.remove(id) {
                    let extra = layer
                        .as_ref()
                        .map(|l| format!("  {}", human_size(l.size)))
                        .unwrap_or_default();
                    bar.finish_and_clear();
                    if *cached {
                        self.line(&format!("✔ {msg}  CACHED{extra}"));
                    } else {
                        self.line(&format!("✔ {msg}  {:.1}s{extra}", *millis as f64 / 1000.0));
                    }
                }
            }
        }
    }

    /// Stop any spinners left (a failed step).
    pub fn finish(&mut self) {
        for (_, (bar, msg)) in self.bars.drain() {
            bar.finish_and_clear();
            if self.mode == Mode::Tty {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "✘ {msg}");
            }
        }
    }

    /// A remark (plain/tty only).
    pub fn note(&self, s: &str) {
        if matches!(self.mode, Mode::Plain | Mode::Tty) {
            self.line(s);
        }
    }

    /// The final result.
    pub fn result(&self, digest: &Digest, tags: &[ImageName]) {
        match self.mode {
            Mode::Json => {
                let names: Vec<String> = tags.iter().map(ToString::to_string).collect();
                self.line(
                    &json!({"type": "result", "digest": digest.to_string(), "tags": names})
                        .to_string(),
                );
            }
            Mode::Plain | Mode::Tty => {
                for t in tags {
                    self.line(&format!("tagged {t}"));
                }
            }
            Mode::Quiet => {}
        }
    }
}

/// Renders registry transfers: a bar per blob with bytes and rate on a terminal, one line per
/// finished blob in logs, JSON objects with `--progress json`. Shared by the client's
/// transfer tasks, hence the lock.
pub struct TransferRenderer {
    mode: Mode,
    state: std::sync::Mutex<TransferState>,
}

#[derive(Default)]
struct TransferState {
    multi: Option<indicatif::MultiProgress>,
    bars: HashMap<crate::digest::Digest, ProgressBar>,
}

impl TransferRenderer {
    /// A renderer for `mode`.
    pub fn new(mode: Mode) -> TransferRenderer {
        TransferRenderer {
            mode,
            state: std::sync::Mutex::new(TransferState::default()),
        }
    }

    fn line(&self, s: &str) {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{s}");
    }

    /// Show one transfer event.
    pub fn event(&self, e: &crate::registry::TransferEvent) {
        use crate::registry::TransferEvent as T;
        match self.mode {
            Mode::Quiet => {}
            Mode::Json => {
                let v = match e {
                    T::Progress {
                        digest,
                        done,
                        total,
                    } => {
                        json!({"type": "blob", "event": "progress", "digest": digest.to_string(), "done": done, "total": total})
                    }
                    T::Skipped { digest, size } => {
                        json!({"type": "blob", "event": "exists", "digest": digest.to_string(), "size": size})
                    }
                    T::Mounted { digest, from } => {
                        json!({"type": "blob", "event": "mounted", "digest": digest.to_string(), "from": from})
                    }
                    T::Finished { digest, size } => {
                        json!({"type": "blob", "event": "done", "digest": digest.to_string(), "size": size})
                    }
                };
                self.line(&v.to_string());
            }
            Mode::Plain => match e {
                T::Progress { .. } => {}
                T::Skipped { digest, size } => self.line(&format!(
                    "blob {} exists ({})",
                    digest.short(),
                    human_size(*size)
                )),
                T::Mounted { digest, from } => {
                    self.line(&format!("blob {} mounted from {from}", digest.short()))
                }
                T::Finished { digest, size } => self.line(&format!(
                    "blob {} done ({})",
                    digest.short(),
                    human_size(*size)
                )),
            },
            Mode::Tty => {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let multi = st
                    .multi
                    .get_or_insert_with(|| {
                        indicatif::MultiProgress::with_draw_target(
                            indicatif::ProgressDrawTarget::stderr(),
                        )
                    })
                    .clone();
                match e {
                    T::Progress {
                        digest,
                        done,
                        total,
                    } => {
                        let bar = st.bars.entry(*digest).or_insert_with(|| {
                            let b = multi.add(ProgressBar::new(*total));
                            b.set_style(
                                ProgressStyle::with_template(
                                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                                )
                                .expect("static template is valid")
                                .progress_chars("=> "),
                            );
                            b.set_message(digest.short());
                            b
                        });
                        bar.set_position(*done);
                    }
                    T::Skipped { digest, .. } => {
                        let _ = multi.println(format!("✔ {} exists", digest.short()));
                    }
                    T::Mounted { digest, from } => {
                        let _ = multi.println(format!("✔ {} mounted from {from}", digest.short()));
                    }
                    T::Finished { digest, size } => {
                        if let Some(b) = st.bars.remove(digest) {
                            b.finish_and_clear();
                        }
                        let _ =
                            multi.println(format!("✔ {} {}", digest.short(), human_size(*size)));
                    }
                }
            }
        }
    }

    /// Clear any bars left.
    pub fn finish(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for (_, b) in st.bars.drain() {
            b.finish_and_clear();
        }
    }

    /// Summarise a push.
    pub fn pushed(&self, dest: &crate::registry::Reference, report: &crate::registry::PushReport) {
        use crate::registry::BlobRoute;
        let count = |f: fn(&BlobRoute) -> bool| report.blobs.iter().filter(|(_, r)| f(r)).count();
        let uploaded = count(|r| matches!(r, BlobRoute::Uploaded));
        let mounted = count(|r| matches!(r, BlobRoute::Mounted(_)));
        let present = count(|r| matches!(r, BlobRoute::Present));
        let relayed = count(|r| matches!(r, BlobRoute::Relayed(_)));
        match self.mode {
            Mode::Json => self.line(
                &json!({"type": "pushed", "reference": dest.to_string(), "digest": report.digest.to_string(),
                        "uploaded": uploaded, "mounted": mounted, "present": present, "relayed": relayed})
                .to_string(),
            ),
            Mode::Plain | Mode::Tty => self.line(&format!(
                "pushed {dest} ({}): {uploaded} uploaded, {mounted} mounted, {present} already there, {relayed} relayed",
                report.digest
            )),
            Mode::Quiet => {}
        }
    }
}

//! Prometheus text exposition: queue depth and builds by state (from the queue, so every
//! replica reports the same), and this process's build durations and cache hits.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use super::spec::State;

/// Upper bounds (seconds) of the build duration histogram.
const BUCKETS: [f64; 9] = [1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0];

#[derive(Default)]
struct Inner {
    /// Per final state: bucket counts, sum, count.
    durations: BTreeMap<State, ([u64; BUCKETS.len()], f64, u64)>,
    cache_hits: u64,
    layer_steps: u64,
}

/// This process's counters.
#[derive(Default)]
pub struct Metrics(Mutex<Inner>);

impl Metrics {
    /// A build ended in `state` after `d`.
    pub fn finished(&self, state: State, d: Duration) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.durations.entry(state).or_default();
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                e.0[i] += 1;
            }
        }
        e.1 += s;
        e.2 += 1;
    }

    /// A successful build reused `hits` of its `steps` layers.
    pub fn layers(&self, hits: u64, steps: u64) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.cache_hits += hits;
        m.layer_steps += steps.max(hits);
    }

    /// The exposition text, with `counts` (builds by state) from the queue.
    pub fn render(&self, counts: &BTreeMap<State, i64>) -> String {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP strata_serve_queue_depth Builds waiting for a worker."
        );
        let _ = writeln!(o, "# TYPE strata_serve_queue_depth gauge");
        let _ = writeln!(
            o,
            "strata_serve_queue_depth {}",
            counts.get(&State::Queued).copied().unwrap_or(0)
        );
        let _ = writeln!(
            o,
            "# HELP strata_serve_builds Builds in the queue's records, by state."
        );
        let _ = writeln!(o, "# TYPE strata_serve_builds gauge");
        for s in State::ALL {
            let _ = writeln!(
                o,
                "strata_serve_builds{{state=\"{}\"}} {}",
                s.as_str(),
                counts.get(&s).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(
            o,
            "# HELP strata_serve_build_duration_seconds Wall time of builds this process ran."
        );
        let _ = writeln!(o, "# TYPE strata_serve_build_duration_seconds histogram");
        for (state, (buckets, sum, count)) in &m.durations {
            let st = state.as_str();
            for (b, n) in BUCKETS.iter().zip(buckets) {
                let _ = writeln!(
                    o,
                    "strata_serve_build_duration_seconds_bucket{{state=\"{st}\",le=\"{b}\"}} {n}"
                );
            }
            let _ = writeln!(
                o,
                "strata_serve_build_duration_seconds_bucket{{state=\"{st}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                o,
                "strata_serve_build_duration_seconds_sum{{state=\"{st}\"}} {sum}"
            );
            let _ = writeln!(
                o,
                "strata_serve_build_duration_seconds_count{{state=\"{st}\"}} {count}"
            );
        }
        let _ = writeln!(
            o,
            "# HELP strata_serve_cache_hits_total Layers reused from the cache."
        );
        let _ = writeln!(o, "# TYPE strata_serve_cache_hits_total counter");
        let _ = writeln!(o, "strata_serve_cache_hits_total {}", m.cache_hits);
        let _ = writeln!(
            o,
            "# HELP strata_serve_layer_steps_total Steps that made or reused a layer."
        );
        let _ = writeln!(o, "# TYPE strata_serve_layer_steps_total counter");
        let _ = writeln!(o, "strata_serve_layer_steps_total {}", m.layer_steps);
        let ratio = if m.layer_steps == 0 {
            0.0
        } else {
            m.cache_hits as f64 / m.layer_steps as f64
        };
        let _ = writeln!(
            o,
            "# HELP strata_serve_cache_hit_ratio Cache hits per layer step."
        );
        let _ = writeln!(o, "# TYPE strata_serve_cache_hit_ratio gauge");
        let _ = writeln!(o, "strata_serve_cache_hit_ratio {ratio}");
        o
    }
}

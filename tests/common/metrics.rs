//! Metrics as a test sees them: a debugging recorder in force only inside
//! a closure on the calling thread, so tests that run side by side in one
//! binary never count each other's events.

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// A recorder a test feeds through [`TestRecorder::record`].
pub struct TestRecorder {
    recorder: DebuggingRecorder,
    snapshotter: Snapshotter,
}

impl TestRecorder {
    pub fn new() -> TestRecorder {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        TestRecorder {
            recorder,
            snapshotter,
        }
    }

    /// Runs `f` with this as the thread's recorder. Metrics recorded after
    /// an `.await` may land on another thread, so `f` is synchronous.
    pub fn record<T>(&self, f: impl FnOnce() -> T) -> T {
        ::metrics::with_local_recorder(&self.recorder, f)
    }

    /// What was recorded since the last call: a snapshot drains the values.
    pub fn take(&self) -> Recorded {
        recorded(&self.snapshotter)
    }
}

/// Drains `snapshotter` (of a recorder installed any way) into [`Recorded`].
pub fn recorded(snapshotter: &Snapshotter) -> Recorded {
    let entries = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (key.name().to_owned(), labels, value)
        })
        .collect();
    Recorded(entries)
}

/// One metric: name, labels and value.
type Entry = (String, Vec<(String, String)>, DebugValue);

/// Metric values by name and labels.
pub struct Recorded(Vec<Entry>);

impl Recorded {
    /// The sum of the counters named `name` that carry at least `labels`.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.matching(name, labels)
            .filter_map(|v| match v {
                DebugValue::Counter(n) => Some(*n),
                _ => None,
            })
            .sum()
    }

    /// The samples of the histograms named `name` that carry at least `labels`.
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.matching(name, labels)
            .filter_map(|v| match v {
                DebugValue::Histogram(samples) => Some(samples.iter().map(|s| s.into_inner())),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a DebugValue> {
        self.0.iter().filter_map(move |(n, have, value)| {
            let wanted = labels
                .iter()
                .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v));
            (n == name && wanted).then_some(value)
        })
    }
}

//! Summary statistics of repeated measurements.

use std::time::Duration;

/// Median, 90th percentile, min and max of a set of samples.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub p90: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    /// Nearest-rank percentiles over `samples` (any unit). None when empty.
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let rank = |p: f64| s[((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
        Some(Self {
            n: s.len(),
            median: rank(0.5),
            p90: rank(0.9),
            min: s[0],
            max: s[s.len() - 1],
        })
    }

    pub fn of_durations_ms(samples: &[Duration]) -> Option<Self> {
        Self::of(
            &samples
                .iter()
                .map(|d| d.as_secs_f64() * 1000.0)
                .collect::<Vec<_>>(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Summary::of(&[5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0]).unwrap();
        assert_eq!(
            (s.n, s.median, s.p90, s.min, s.max),
            (10, 5.0, 9.0, 1.0, 10.0)
        );
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[2.5]).unwrap().p90, 2.5);
    }
}

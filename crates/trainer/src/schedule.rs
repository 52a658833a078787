//! Learning-rate schedules with transformers' formulas (`get_constant_schedule_with_warmup`,
//! `get_linear_schedule_with_warmup`, `get_cosine_schedule_with_warmup`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    #[default]
    Linear,
    Cosine,
}

/// A schedule resolved against the run's total number of optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// `warmup_steps` wins over `warmup_ratio` when both are set, as in transformers; the
    /// ratio rounds up (`math.ceil`).
    pub fn new(
        kind: ScheduleKind,
        peak_lr: f64,
        warmup_steps: Option<u64>,
        warmup_ratio: Option<f64>,
        total_steps: u64,
    ) -> Self {
        let warmup_steps = warmup_steps
            .unwrap_or_else(|| (warmup_ratio.unwrap_or(0.0) * total_steps as f64).ceil() as u64);
        Self {
            kind,
            peak_lr,
            warmup_steps,
            total_steps,
        }
    }

    /// The learning rate of the update with index `step` (0-based), as the schedulers'
    /// `lr_lambda(current_step)` times the peak.
    pub fn lr(&self, step: u64) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < self.warmup_steps {
            return self.peak_lr * s / w.max(1.0);
        }
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        };
        self.peak_lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from transformers 5.24 (`get_*_schedule_with_warmup`, lr 1.0, 3 warmup of 10).
    #[test]
    fn matches_transformers() {
        let linear = [
            0.0,
            1.0 / 3.0,
            2.0 / 3.0,
            1.0,
            6.0 / 7.0,
            5.0 / 7.0,
            4.0 / 7.0,
            3.0 / 7.0,
            2.0 / 7.0,
            1.0 / 7.0,
        ];
        let s = Schedule::new(ScheduleKind::Linear, 1.0, Some(3), None, 10);
        for (step, want) in linear.iter().enumerate() {
            assert!((s.lr(step as u64) - want).abs() < 1e-12, "linear {step}");
        }
        let s = Schedule::new(ScheduleKind::Cosine, 1.0, None, Some(0.3), 10);
        assert_eq!(s.warmup_steps, 3);
        let cosine = [
            0.0,
            1.0 / 3.0,
            2.0 / 3.0,
            1.0,
            0.9504844339512095,
            0.811744900929367,
            0.6112604669781572,
            0.3887395330218428,
            0.18825509907063323,
            0.04951556604879043,
        ];
        for (step, want) in cosine.iter().enumerate() {
            assert!((s.lr(step as u64) - want).abs() < 1e-12, "cosine {step}");
        }
        let s = Schedule::new(ScheduleKind::Constant, 2.0, Some(2), None, 10);
        assert_eq!([s.lr(0), s.lr(1), s.lr(2), s.lr(9)], [0.0, 1.0, 2.0, 2.0]);
    }
}

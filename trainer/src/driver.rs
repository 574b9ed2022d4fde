//! The training loop both stages share (method §4.3, §5.3): draw a batch from the domain sampler,
//! forward and backward (accumulated over micro-batches), clip the global gradient norm, step
//! the optimizers with the cosine schedule's multiplier; every `eval_interval` steps evaluate
//! per domain and update the domain weights; checkpoint, guard against non-finite steps, stop
//! cleanly on SIGINT/SIGTERM. What differs between pruning and continued pre-training is behind
//! [`Stage`].

use shears_models::ShearsAutodiff;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use shears_core::error::IoContext;
use shears_core::{Error, Result};
use shears_data::dbl::DomainValues;
use shears_data::{Dataset, DomainSampler, ReferenceSource, SamplerConfig, Split};

use crate::checkpoint::{self, Staging};
use crate::config::{DblSettings, Faults, LoopSettings, StageKind};
use crate::parallel::Comm;
use crate::records::{
    EvalExtras, EvalRecord, LoopState, MetricRecord, Num, ReferenceRecord, StageState, StepRecord,
    STATE_FORMAT,
};
use crate::run_dir::RunDir;
use crate::schedule::CosineWithWarmup;
use shears_eval::domain::{losses_of, DomainEval, DomainSum, EvalSettings, Part};

/// Losses of one step (means over its micro-batches).
#[derive(Debug, Clone, Copy)]
pub struct StepLosses {
    pub lm: f64,
    pub lagrangian: Option<f64>,
    /// The distillation term, when training with a teacher.
    pub distill: Option<DistillLoss>,
}

/// The KD term of a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistillLoss {
    /// Its weight in the objective (the LM loss gets `1 − alpha`).
    pub alpha: f64,
    /// Mean `T²`-scaled divergence (summed over micro-batches like `lm`).
    pub kd: f64,
}

impl StepLosses {
    /// The objective the step minimised: the LM loss, or `(1 − α)·LM + α·KD` with a teacher,
    /// plus the Lagrangian term when pruning.
    pub fn objective(&self) -> f64 {
        let main = match self.distill {
            Some(d) => (1.0 - d.alpha) * self.lm + d.alpha * d.kd,
            None => self.lm,
        };
        main + self.lagrangian.unwrap_or(0.0)
    }
}

/// What a stage contributes to the loop.
pub trait Stage<B: ShearsAutodiff> {
    /// Which stage this is.
    fn kind(&self) -> StageKind;
    /// Forward and backward over `micro` (each a list of equal-length sequences), each
    /// micro-batch's loss divided by `of` (the step's micro-batch count over all ranks); the
    /// gradients are summed and kept until [`Stage::apply`] or [`Stage::discard`]. `seeds`
    /// gives each micro-batch its random stream. The LM loss returned is the sum over `micro`
    /// divided by `of` (so the ranks' values add up to the step's mean).
    fn backward_share(
        &mut self,
        micro: &[Vec<Vec<u32>>],
        step: usize,
        seeds: &[u64],
        of: usize,
    ) -> StepLosses;
    /// [`Stage::backward_share`] of a whole step on one rank.
    fn backward(&mut self, micro: &[Vec<Vec<u32>>], step: usize, seeds: &[u64]) -> StepLosses {
        self.backward_share(micro, step, seeds, micro.len())
    }
    /// Sum the pending gradients of every parameter group over `comm`'s ranks.
    fn all_reduce(&mut self, comm: &Comm) -> Result<()>;
    /// The device the stage computes on.
    fn device(&self) -> B::Device;
    /// L2 norm over all pending gradients.
    fn grad_norm(&self) -> f64;
    /// Multiply the pending gradients by `s`.
    fn scale_grads(&mut self, s: f64);
    /// Step every optimizer with its learning rate times `lr_scale`.
    fn apply(&mut self, lr_scale: f64);
    /// Drop the pending gradients.
    fn discard(&mut self);
    /// The model weights' learning rate at `lr_scale`.
    fn lr(&self, lr_scale: f64) -> f64;
    /// Per-domain summed eval NLL of the model as it is, over `part`'s share of the batches.
    fn eval_part(
        &self,
        data: &Dataset,
        s: &EvalSettings,
        part: Part,
    ) -> Result<BTreeMap<String, DomainSum>>;
    /// [`Stage::eval_part`] of the starting model, for reference losses from the source.
    fn eval_source_part(
        &self,
        data: &Dataset,
        s: &EvalSettings,
        part: Part,
    ) -> Result<BTreeMap<String, DomainSum>> {
        self.eval_part(data, s, part)
    }
    /// Per-domain eval losses of the model as it is (all batches).
    fn eval(&self, data: &Dataset, s: &EvalSettings) -> Result<BTreeMap<String, DomainEval>> {
        losses_of(&self.eval_part(data, s, Part::WHOLE)?)
    }
    /// Extra fields of an eval record (expected sparsity, λ, parameter counts).
    fn eval_extras(&self, step: usize) -> EvalExtras;
    /// Write the stage's state into `dir`; returns what goes into `state.json`.
    fn save(&self, dir: &Path) -> Result<StageState>;
    /// Restore what [`Stage::save`] wrote (`state` is of this stage's kind).
    fn load(&mut self, dir: &Path, state: &StageState) -> Result<()>;

    /// One step on a single micro-batch without clipping: [`Stage::backward`] then
    /// [`Stage::apply`]. What the parity tests and the benchmarks drive; the loop adds
    /// accumulation, clipping and the guards around the same two calls.
    fn step(&mut self, seqs: &[Vec<u32>], step: usize, seed: u64, lr_scale: f64) -> StepLosses {
        let losses = self.backward(&[seqs.to_vec()], step, &[seed]);
        self.apply(lr_scale);
        losses
    }
}

/// The loop's inputs besides the stage.
pub struct LoopInputs<'a> {
    /// Every setting the loop reads, resolved (no default is filled in here).
    pub settings: &'a LoopSettings,
    pub dbl: &'a DblSettings,
    pub faults: &'a Faults,
    pub data: &'a Dataset,
    /// Starting domain weights (used on a fresh start).
    pub initial_weights: BTreeMap<String, f64>,
    /// Reference losses already known (given, fitted, or from an earlier stage); `None` with
    /// `reference = source_model` means: measure the starting model.
    pub reference: Option<DomainValues>,
    /// Set by SIGINT/SIGTERM.
    pub interrupt: Arc<AtomicBool>,
    /// Show a progress bar.
    pub progress: bool,
}

/// How a loop ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// All steps done; the final checkpoint.
    Finished { step: usize, checkpoint: PathBuf },
    /// Stopped by a signal after writing a checkpoint.
    Interrupted { step: usize, checkpoint: PathBuf },
}

fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser.
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The seed of micro-batch `i` of step `t`: a pure function, so a resumed run samples the same
/// masks without carrying an RNG.
pub fn micro_seed(seed: u64, t: usize, i: usize) -> u64 {
    mix(mix(seed ^ 0x5348_4541_5253) ^ mix(t as u64) ^ mix((i as u64) << 32))
}

fn train_sizes(data: &Dataset) -> Result<BTreeMap<String, u64>> {
    data.domains()
        .into_iter()
        .map(|d| Ok((d.clone(), data.split(&d, Split::Train)?.len())))
        .collect()
}

/// Default starting weights: each domain's share of the train tokens.
pub fn token_share(data: &Dataset) -> BTreeMap<String, f64> {
    data.manifest
        .domains
        .iter()
        .map(|(k, d)| (k.clone(), d.train_tokens as f64))
        .collect()
}

fn map_of(e: &BTreeMap<String, DomainEval>) -> DomainValues {
    e.iter().map(|(k, v)| (k.clone(), v.loss)).collect()
}

struct Ctx<'a, 'b> {
    inp: &'b LoopInputs<'a>,
    comm: &'b Comm,
    dir: &'b mut RunDir,
    sampler: DomainSampler,
    reference: DomainValues,
    bad: usize,
    /// Sampler warnings already logged.
    warned: usize,
    pb: ProgressBar,
}

impl Ctx<'_, '_> {
    fn log(&mut self, msg: &str) {
        let dir = &mut *self.dir;
        self.pb.suspend(|| dir.log(msg));
    }

    fn evaluate<B: ShearsAutodiff, S: Stage<B>>(
        &mut self,
        stage: &S,
        t: usize,
        es: &EvalSettings,
    ) -> Result<()> {
        let start = Instant::now();
        let sums = stage.eval_part(self.inp.data, es, part_of(self.comm))?;
        let evals = losses_of(&reduce_sums(stage, self.comm, sums)?)?;
        let losses = map_of(&evals);
        let before = self.sampler.weights().clone();
        let rule = self.inp.dbl.rule.build();
        let after = rule.update(&before, &losses, &self.reference)?;
        self.sampler.set_weights(t as u64, &after, Some(&losses))?;
        let after = self.sampler.weights().clone();
        let rec = EvalRecord {
            step: t,
            domain_tokens: evals.iter().map(|(k, v)| (k.clone(), v.tokens)).collect(),
            reference_loss: self.reference.clone(),
            excess_loss: losses
                .iter()
                .map(|(k, v)| (k.clone(), v - self.reference[k]))
                .collect(),
            domain_loss: losses.clone(),
            weights_before: before,
            domain_weights: after.clone(),
            rule: rule.name().to_string(),
            extras: stage.eval_extras(t),
            eval_s: start.elapsed().as_secs_f64(),
        };
        self.dir.metric(&MetricRecord::Eval(Box::new(rec)))?;
        let worst = losses
            .iter()
            .map(|(k, v)| (k, v - self.reference[k]))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let mean = losses.values().sum::<f64>() / losses.len().max(1) as f64;
        let msg = match worst {
            Some((k, gap)) => format!(
                "eval @ step {t}: mean domain loss {mean:.4}; largest excess over reference {gap:+.4} ({k}); weights {}",
                fmt_weights(&after)
            ),
            None => format!("eval @ step {t}"),
        };
        self.log(&msg);
        Ok(())
    }

    /// [`Ctx::save`] on the leader; the other ranks return the checkpoint path the leader
    /// writes.
    fn save_if_leader<B: ShearsAutodiff, S: Stage<B>>(
        &mut self,
        stage: &S,
        t: usize,
        finished: bool,
    ) -> Result<PathBuf> {
        if self.comm.is_leader() {
            self.save(stage, t, finished)
        } else {
            Ok(self.dir.checkpoints().join(checkpoint::dir_name(t)))
        }
    }

    fn save<B: ShearsAutodiff, S: Stage<B>>(
        &mut self,
        stage: &S,
        t: usize,
        finished: bool,
    ) -> Result<PathBuf> {
        let root = self.dir.checkpoints();
        let staging = Staging::begin(&root, t)?;
        if self.inp.faults.checkpoint_error_at_steps.contains(&t) {
            let p = staging.path().join("model.safetensors");
            std::fs::write(&p, b"partial").at(&p, "cannot write")?;
            return Err(Error::io(
                &p,
                "cannot write (injected fault)",
                std::io::Error::from_raw_os_error(28),
            ));
        }
        let stage_state = stage.save(staging.path())?;
        let state = LoopState {
            format: STATE_FORMAT.into(),
            stage: stage_state,
            step: t,
            finished,
            metrics_bytes: self.dir.metrics_len(),
            sampler: self.sampler.state().clone(),
            reference_losses: self.reference.clone(),
            bad_steps: self.bad,
        };
        shears_core::fsutil::write_atomic(
            &staging.path().join("state.json"),
            state.to_json().as_bytes(),
            true,
        )?;
        let path = staging.commit()?;
        checkpoint::prune_old(&root, self.inp.settings.keep_checkpoints)?;
        self.log(&format!("checkpoint {}", path.display()));
        Ok(path)
    }
}

/// This rank's share of the eval batches.
fn part_of(comm: &Comm) -> Part {
    Part {
        rank: comm.rank(),
        world: comm.world(),
    }
}

/// Per-domain eval sums added up over the ranks (the identity on one rank).
fn reduce_sums<B: ShearsAutodiff, S: Stage<B>>(
    stage: &S,
    comm: &Comm,
    sums: BTreeMap<String, DomainSum>,
) -> Result<BTreeMap<String, DomainSum>> {
    if comm.world() == 1 {
        return Ok(sums);
    }
    let flat: Vec<f64> = sums
        .values()
        .flat_map(|s| [s.nll, s.tokens as f64])
        .collect();
    let flat = comm.sum_f64::<B::InnerBackend>(&flat, &stage.device())?;
    Ok(sums
        .keys()
        .zip(flat.chunks(2))
        .map(|(k, v)| {
            (
                k.clone(),
                DomainSum {
                    nll: v[0],
                    tokens: v[1] as u64,
                },
            )
        })
        .collect())
}

fn fmt_weights(w: &BTreeMap<String, f64>) -> String {
    w.iter()
        .map(|(k, v)| format!("{k}={v:.3}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where a loop starts: a finished run, or the step and state to go on from.
enum Start {
    Finished(Outcome),
    At {
        step: usize,
        sampler: DomainSampler,
        reference: DomainValues,
        bad: usize,
    },
}

/// Restore `stage` and the loop's state from the newest valid checkpoint (when `resume` and one
/// exists), or set up a fresh start: the sampler and the reference losses (measured on the
/// starting model when the plan asks for that).
fn restore<B: ShearsAutodiff, S: Stage<B>>(
    stage: &mut S,
    inp: &LoopInputs<'_>,
    dir: &mut RunDir,
    resume: bool,
    es: &EvalSettings,
    comm: &Comm,
) -> Result<Start> {
    let sizes = train_sizes(inp.data)?;
    // An explicit resume never starts over while checkpoints exist: when none of them
    // verifies, the run stops (naming each and why) and leaves everything as it is.
    let found = if resume {
        let (found, rejected) = checkpoint::newest_valid(&dir.checkpoints());
        if found.is_none() && !rejected.is_empty() {
            return Err(checkpoint::nothing_valid(&dir.checkpoints(), &rejected));
        }
        for r in rejected {
            dir.log(&format!(
                "skipping damaged checkpoint {}: {}",
                r.path.display(),
                r.why
            ));
        }
        found
    } else {
        None
    };
    if let Some((_, path)) = found {
        let st = LoopState::read(&path)?;
        if st.step > inp.settings.steps {
            return Err(Error::format(
                path.join("state.json"),
                format!(
                    "is at step {}, beyond the plan's {} steps",
                    st.step, inp.settings.steps
                ),
            ));
        }
        if st.stage.kind() != stage.kind() {
            return Err(Error::format(
                path.join("state.json"),
                format!(
                    "is a '{}' checkpoint; this run is a '{}' one",
                    st.stage.kind().name(),
                    stage.kind().name()
                ),
            ));
        }
        stage.load(&path, &st.stage)?;
        dir.truncate_metrics(st.metrics_bytes)?;
        dir.log(&format!(
            "resumed from {} (step {})",
            path.display(),
            st.step
        ));
        if st.finished {
            return Ok(Start::Finished(Outcome::Finished {
                step: st.step,
                checkpoint: path,
            }));
        }
        return Ok(Start::At {
            step: st.step,
            sampler: DomainSampler::restore(st.sampler, &sizes)?,
            reference: st.reference_losses,
            bad: st.bad_steps,
        });
    }
    if resume {
        // No checkpoint was ever written (the run stopped before its first one): what the
        // metrics hold is what starting over writes again.
        dir.log("no checkpoint written yet; starting from step 0");
        dir.truncate_metrics(0)?;
    }
    let sampler = DomainSampler::new(
        SamplerConfig {
            seed: inp.settings.seed,
            rank: 0,
            world_size: 1,
            exhaustion: inp.dbl.exhaustion,
        },
        &sizes,
        &inp.initial_weights,
    )?;
    let reference = match (&inp.reference, &inp.dbl.reference) {
        (Some(r), _) => r.clone(),
        (None, ReferenceSource::SourceModel) => {
            dir.log("measuring the starting model's per-domain eval loss (reference losses)");
            let sums = stage.eval_source_part(inp.data, es, part_of(comm))?;
            map_of(&losses_of(&reduce_sums(stage, comm, sums)?)?)
        }
        (None, other) => other.resolve(None)?,
    };
    dir.metric(&MetricRecord::Reference(ReferenceRecord {
        step: 0,
        reference_loss: reference.clone(),
    }))?;
    dir.log(&format!("reference losses: {}", fmt_weights(&reference)));
    Ok(Start::At {
        step: 0,
        sampler,
        reference,
        bad: 0,
    })
}

fn progress_bar(show: bool, kind: StageKind, steps: usize, start: usize) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(steps as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix} step {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .expect("template"),
    );
    pb.set_prefix(kind.name());
    pb.set_position(start as u64);
    pb
}

impl Ctx<'_, '_> {
    /// The next global batch, cut into micro-batches of `len` tokens per sequence.
    fn draw_batch(&mut self, len: usize) -> Result<Vec<Vec<Vec<u32>>>> {
        let s = self.inp.settings;
        let mut micro = Vec::with_capacity(s.batch_size.div_ceil(s.micro_batch));
        let mut current = Vec::with_capacity(s.micro_batch);
        for _ in 0..s.batch_size {
            let d = self.sampler.draw()?;
            let seq = self
                .inp
                .data
                .split(&d.domain, Split::Train)?
                .sequence(d.index)?;
            current.push(seq[..len].to_vec());
            if current.len() == s.micro_batch {
                micro.push(std::mem::take(&mut current));
            }
        }
        if !current.is_empty() {
            micro.push(current);
        }
        Ok(micro)
    }

    /// Step `t` on the global batch `micro`: this rank's micro-batches (`i % world == rank`)
    /// forward and backward, the gradients and losses summed over the ranks, the non-finite
    /// guard, clipping and the update (or a discard). Returns the step's record and whether
    /// any rank was asked to stop (SIGINT/SIGTERM).
    fn step<B: ShearsAutodiff, S: Stage<B>>(
        &mut self,
        stage: &mut S,
        t: usize,
        micro: Vec<Vec<Vec<u32>>>,
        lr_scale: f64,
    ) -> Result<(StepRecord, bool)> {
        let (s, faults, comm) = (self.inp.settings, self.inp.faults, self.comm);
        let of = micro.len();
        let tokens: usize = micro.iter().flatten().map(Vec::len).sum();
        let (world, rank) = (comm.world(), comm.rank());
        let seeds: Vec<u64> = (rank..of)
            .step_by(world)
            .map(|i| micro_seed(s.seed, t, i))
            .collect();
        let mine: Vec<Vec<Vec<u32>>> = micro.into_iter().skip(rank).step_by(world).collect();
        faults.at_rank(rank, t + 1, comm)?;
        let timer = Instant::now();
        let mut losses = stage.backward_share(&mine, t, &seeds, of);
        let in_collective = Instant::now();
        stage.all_reduce(comm)?;
        let stop = self.inp.interrupt.load(Ordering::SeqCst);
        let stop = if world > 1 {
            let kd = losses.distill.map_or(0.0, |d| d.kd);
            let r = comm.sum_f64::<B::InnerBackend>(
                &[losses.lm, f64::from(u8::from(stop)), kd],
                &stage.device(),
            )?;
            losses.lm = r[0];
            if let Some(d) = &mut losses.distill {
                d.kd = r[2];
            }
            r[1] > 0.0
        } else {
            stop
        };
        let collective_s = (world > 1).then(|| in_collective.elapsed().as_secs_f64());
        if faults.nan_loss_at_steps.contains(&(t + 1)) {
            // Injected: the loss and every gradient become NaN, as a diverged step's would.
            losses.lm = f64::NAN;
            stage.scale_grads(f64::NAN);
        }
        let norm = stage.grad_norm();
        let finite = losses.lm.is_finite()
            && losses.lagrangian.is_none_or(f64::is_finite)
            && losses.distill.is_none_or(|d| d.kd.is_finite())
            && norm.is_finite();
        if finite {
            let clip = s.grad_clip;
            if clip > 0.0 {
                let coef = clip / (norm + 1e-6);
                if coef < 1.0 {
                    stage.scale_grads(coef);
                }
            }
            stage.apply(lr_scale);
            self.bad = 0;
        } else {
            stage.discard();
            self.bad += 1;
        }
        if faults.step_delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(faults.step_delay_ms));
        }
        let secs = timer.elapsed().as_secs_f64();
        let rec = StepRecord {
            step: t + 1,
            loss: Num(losses.objective()),
            lm_loss: Num(losses.lm),
            lagrangian_loss: losses.lagrangian.map(Num),
            kd_loss: losses.distill.map(|d| Num(d.kd)),
            lr: stage.lr(lr_scale),
            lr_scale,
            grad_norm: Num(norm),
            tokens,
            skipped: !finite,
            tokens_per_s: tokens as f64 / secs.max(1e-9),
            step_s: secs,
            collective_s,
        };
        Ok((rec, stop))
    }

    /// Write a step's record, move the progress bar, and log a skipped step and any new
    /// sampler warnings.
    fn log_step(&mut self, rec: &StepRecord) -> Result<()> {
        self.dir.metric(&MetricRecord::Step(rec.clone()))?;
        self.pb.set_position(rec.step as u64);
        self.pb.set_message(format!(
            "loss {:.4} | {:.0} tok/s",
            rec.loss.0, rec.tokens_per_s
        ));
        if rec.skipped {
            let msg = format!(
                "step {}: non-finite loss or gradient (lm loss {}, grad norm {}); step skipped ({} in a row)",
                rec.step, rec.lm_loss.0, rec.grad_norm.0, self.bad
            );
            self.log(&msg);
        }
        let fresh: Vec<String> = self.sampler.state().warnings[self.warned..].to_vec();
        self.warned += fresh.len();
        for w in fresh {
            self.log(&format!("warning: {w}"));
        }
        Ok(())
    }
}

/// Run `stage` in `dir` from its newest checkpoint (when `resume` and one exists) or from the
/// start, as rank `comm.rank()` of `comm.world()` (see [`crate::parallel`]; only the leader
/// writes into `dir`).
pub fn run_loop<B: ShearsAutodiff, S: Stage<B>>(
    stage: &mut S,
    inp: &LoopInputs<'_>,
    dir: &mut RunDir,
    resume: bool,
    comm: &Comm,
) -> Result<Outcome> {
    let run = inp.settings;
    let steps = run.steps;
    let (len, es) = (run.seq_len, run.eval);
    let schedule = CosineWithWarmup {
        warmup: run.warmup_steps,
        max: steps,
        final_ratio: run.final_lr_ratio,
    };
    let (start, sampler, reference, bad) = match restore(stage, inp, dir, resume, &es, comm)? {
        Start::Finished(outcome) => return Ok(outcome),
        Start::At {
            step,
            sampler,
            reference,
            bad,
        } => (step, sampler, reference, bad),
    };
    let leader = comm.is_leader();
    let mut ctx = Ctx {
        inp,
        comm,
        warned: sampler.state().warnings.len(),
        pb: progress_bar(inp.progress && leader, stage.kind(), steps, start),
        dir,
        sampler,
        reference,
        bad,
    };
    let (eval_every, ckpt_every) = (run.eval_interval, run.checkpoint_interval);
    for t in start..steps {
        if (t == 0 && run.eval_first) || (t > 0 && t % eval_every == 0) {
            ctx.evaluate(stage, t, &es)?;
        }
        let micro = ctx.draw_batch(len)?;
        let (rec, stop) = ctx.step(stage, t, micro, schedule.at(t))?;
        ctx.log_step(&rec)?;
        if !rec.skipped && rec.grad_norm.0 == 0.0 {
            // Every gradient exactly zero: the objective cannot move anything, so every further
            // step would be a silent no-op.
            ctx.pb.abandon();
            return Err(Error::invalid(format!(
                "stopped at step {}: the objective has no gradient (gradient norm exactly 0, \
                 loss {}{}); training would change nothing. With [distill], a temperature far \
                 below 1 makes both distributions one-hot (the KD term is then 0 with no gradient)",
                t + 1,
                rec.loss.0,
                rec.kd_loss
                    .map_or(String::new(), |k| format!(", kd_loss {}", k.0)),
            )));
        }
        if rec.skipped && ctx.bad >= run.max_bad_steps {
            let written = match leader {
                true => format!(
                    "checkpoint written to {}",
                    ctx.save(stage, t + 1, false)?.display()
                ),
                false => "rank 0 writes the checkpoint".into(),
            };
            ctx.pb.abandon();
            return Err(Error::invalid(format!(
                "stopped: {} consecutive steps had a non-finite loss or gradient (steps {}..={}); {written}; lower the learning rate or check the data, then resume with --resume",
                ctx.bad,
                t + 2 - ctx.bad,
                t + 1,
            )));
        }
        if stop {
            let p = ctx.save_if_leader(stage, t + 1, false)?;
            ctx.pb.abandon();
            ctx.log(&format!(
                "interrupted after step {}; resume with --resume",
                t + 1
            ));
            return Ok(Outcome::Interrupted {
                step: t + 1,
                checkpoint: p,
            });
        }
        if (t + 1) % ckpt_every == 0 && t + 1 < steps {
            ctx.save_if_leader(stage, t + 1, false)?;
        }
    }
    ctx.evaluate(stage, steps, &es)?;
    let p = ctx.save_if_leader(stage, steps, true)?;
    ctx.pb.finish_and_clear();
    ctx.log(&format!("finished {steps} steps"));
    Ok(Outcome::Finished {
        step: steps,
        checkpoint: p,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finite f64s with varied exponents and mantissas, from a fixed LCG.
    fn floats(n: usize) -> Vec<f64> {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut out = vec![
            10.827629626743377,
            0.1,
            1.0 / 3.0,
            f64::MIN_POSITIVE,
            5e-324,
        ];
        while out.len() < n {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let x = f64::from_bits(s);
            if x.is_finite() {
                out.push(x);
            }
        }
        out
    }

    /// Resume is bit-exact: every float of a checkpoint's state.json (reference losses, domain
    /// weights, weight history, stage state) reads back with the bits it was written with.
    /// (Losses are non-negative and weights sum to one, or the state is refused: the floats
    /// are made so, keeping their arbitrary mantissas.)
    #[test]
    fn run_state_floats_round_trip_exactly() {
        let xs: Vec<f64> = floats(3000).into_iter().map(f64::abs).collect();
        let named = |off: usize| -> BTreeMap<String, f64> {
            (0..500)
                .map(|i| (format!("d{i:03}"), xs[off + i]))
                .collect()
        };
        let sequences: BTreeMap<String, u64> = named(0).keys().map(|k| (k.clone(), 10)).collect();
        let uniform: BTreeMap<String, f64> = sequences.keys().map(|k| (k.clone(), 1.0)).collect();
        let mut sampler = DomainSampler::new(SamplerConfig::default(), &sequences, &uniform)
            .unwrap()
            .state()
            .clone();
        // Mantissas of 500 floats in [1, 2), normalised.
        let mantissas: BTreeMap<String, f64> = named(500)
            .into_iter()
            .map(|(k, x)| {
                (
                    k,
                    f64::from_bits(x.to_bits() & ((1 << 52) - 1) | 1.0f64.to_bits()),
                )
            })
            .collect();
        let sum: f64 = mantissas.values().sum();
        sampler.weights = mantissas.into_iter().map(|(k, x)| (k, x / sum)).collect();
        sampler.history[0].losses = Some(named(1000));
        let state = LoopState {
            format: STATE_FORMAT.into(),
            stage: StageState::Train(crate::records::TrainState {
                optimizer_steps: named(2000).keys().map(|k| (k.clone(), 3)).collect(),
            }),
            step: 7,
            finished: false,
            metrics_bytes: 0,
            sampler,
            reference_losses: named(0),
            bad_steps: 0,
        };
        let dir = tempfile::tempdir().unwrap();
        let text = serde_json::to_string_pretty(&state).unwrap();
        std::fs::write(dir.path().join("state.json"), text).unwrap();
        let back = LoopState::read(dir.path()).unwrap();
        let bits = |m: &BTreeMap<String, f64>| m.values().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back.reference_losses), bits(&state.reference_losses));
        assert_eq!(back.reference_losses["d000"], 10.827629626743377);
        assert_eq!(bits(&back.sampler.weights), bits(&state.sampler.weights));
        assert_eq!(
            bits(back.sampler.history[0].losses.as_ref().unwrap()),
            bits(state.sampler.history[0].losses.as_ref().unwrap())
        );
        assert_eq!(back, state);
    }
}

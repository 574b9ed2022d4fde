//! Data parallelism on burn's collective engine (`burn-collective`): N ranks in one process,
//! one thread and one device each, each with a full replica of the stage.
//!
//! The rule that makes N ranks equal one rank: every rank runs the same global
//! [`DomainSampler`](shears_data::DomainSampler) (same seed, same weights, same cursor), so all
//! ranks draw the same global batch; micro-batch `i` of a step goes to rank `i % N`, is seeded
//! with [`micro_seed`](crate::driver::micro_seed)`(seed, step, i)` (the global index, never
//! the rank), and its loss is divided by the global micro-batch count. The gradients of all
//! three parameter groups are then summed over the ranks (an all-reduce per parameter, in the
//! fixed order of the parameter names), so each replica holds what one rank accumulating every
//! micro-batch would hold, and every replica clips and steps identically. The per-step losses,
//! the stop flag and the per-domain eval sums (each rank scores eval batch `j` when
//! `j % N == rank`) are all-reduced too, in f64 where the backend has it.
//!
//! Because the sampler is global, a checkpoint's sampler state is every rank's, and a run can
//! resume with another N: it reads the same data with the same noise; only the order in which
//! the per-rank gradient sums are added changes (float rounding).
//!
//! Failures: a rank that returns an error or panics makes the coordinator reset the collective,
//! which wakes every rank waiting in an all-reduce with an error; the run returns the failing
//! rank's error, naming it. A rank that waits in one collective longer than
//! `collective_timeout_s` ends the run the same way. Only rank 0 writes (checkpoints are
//! atomic), so the last good checkpoint stays intact. One data-parallel run per process at a
//! time (the collective server is per backend type): [`run_ranks`] serialises them.
//!
//! Multi-node (not implemented, not tested): burn-collective's global level adds an
//! orchestrator address, the node count and a data-service port to the same
//! `CollectiveConfig`; the rule above carries over with `rank = node * devices + local`.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorCreationOptions, TensorData, TensorPrimitive};
use burn_collective::{
    all_reduce, finish_collective, register, reset_collective, CollectiveConfig, PeerId,
    ReduceOperation,
};
use shears_core::{Error, Result};
use shears_models::ShearsAutodiff;

/// What ranks share with the coordinator.
struct Shared {
    start: Instant,
    /// Per rank: milliseconds since `start` when it entered its current collective + 1; 0 when
    /// it is not in one.
    entered: Vec<AtomicU64>,
    /// Per rank: a collective of this rank failed after the coordinator aborted the run (its
    /// error is a consequence, not the cause).
    secondary: Vec<AtomicBool>,
    /// Set by the coordinator when the run is being stopped.
    aborted: AtomicBool,
}

/// A rank's handle on the collective: its rank, the world size, and the reductions. With one
/// rank ([`Comm::single`]) every reduction is the identity and nothing is registered.
#[derive(Clone)]
pub struct Comm {
    rank: usize,
    world: usize,
    shared: Option<Arc<Shared>>,
}

impl Comm {
    /// One rank, no collective.
    pub fn single() -> Comm {
        Comm {
            rank: 0,
            world: 1,
            shared: None,
        }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Rank 0 writes checkpoints, metrics and logs.
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    /// The run is being stopped (another rank failed): long waits should end.
    pub fn aborted(&self) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|s| s.aborted.load(Ordering::SeqCst))
    }

    fn peer(&self) -> PeerId {
        PeerId(self.rank as u32)
    }

    /// Run `f` as one collective: watched for the timeout, and its failure marked as a
    /// consequence when the run was already aborted.
    fn collective<T>(
        &self,
        what: &str,
        f: impl FnOnce() -> std::result::Result<T, String>,
    ) -> Result<T> {
        let Some(sh) = &self.shared else {
            return f().map_err(Error::invalid);
        };
        if sh.aborted.load(Ordering::SeqCst) {
            sh.secondary[self.rank].store(true, Ordering::SeqCst);
            return Err(Error::invalid(format!(
                "rank {}: {what}: the run was stopped",
                self.rank
            )));
        }
        let now = sh.start.elapsed().as_millis() as u64 + 1;
        sh.entered[self.rank].store(now, Ordering::SeqCst);
        let r = f();
        sh.entered[self.rank].store(0, Ordering::SeqCst);
        r.map_err(|e| {
            if sh.aborted.load(Ordering::SeqCst) {
                sh.secondary[self.rank].store(true, Ordering::SeqCst);
            }
            Error::invalid(format!("rank {}: {what} failed: {e}", self.rank))
        })
    }

    /// Sum `t` over the ranks (every rank gets the sum).
    pub fn sum_primitive<B: Backend>(
        &self,
        t: B::FloatTensorPrimitive,
    ) -> Result<B::FloatTensorPrimitive> {
        if self.world == 1 {
            return Ok(t);
        }
        let peer = self.peer();
        self.collective("all-reduce", || {
            all_reduce::<B>(peer, t, ReduceOperation::Sum).map_err(|e| format!("{e:?}"))
        })
    }

    /// Sum a float tensor over the ranks.
    pub fn sum_tensor<B: Backend, const D: usize>(&self, t: Tensor<B, D>) -> Result<Tensor<B, D>> {
        if self.world == 1 {
            return Ok(t);
        }
        let p = self.sum_primitive::<B>(t.into_primitive().tensor())?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(p)))
    }

    /// Sum host numbers over the ranks, element-wise, through the collective on `device`: in
    /// f64 where the backend supports it, else in f32.
    pub fn sum_f64<B: Backend>(&self, xs: &[f64], device: &B::Device) -> Result<Vec<f64>> {
        if self.world == 1 || xs.is_empty() {
            return Ok(xs.to_vec());
        }
        let dtype = if B::supports_dtype(device, DType::F64) {
            DType::F64
        } else {
            DType::F32
        };
        let opts = TensorCreationOptions::<B>::new(device.clone()).with_dtype(dtype);
        let t = Tensor::<B, 1>::from_data(TensorData::new(xs.to_vec(), [xs.len()]), opts);
        let t = self.sum_tensor(t)?;
        t.into_data()
            .convert::<f64>()
            .into_vec::<f64>()
            .map_err(|e| Error::invalid(format!("rank {}: reduced values: {e:?}", self.rank)))
    }
}

/// The data-parallel settings of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParallelSettings {
    /// Ranks (devices).
    pub devices: usize,
    /// Longest wait of one rank in one collective before the run is stopped.
    pub timeout: Duration,
}

/// Serialises data-parallel runs: burn-collective keeps one server per backend type.
static RUN_LOCK: Mutex<()> = Mutex::new(());

/// Why a run ended badly.
enum Failure {
    Rank(usize, Error),
    Panic(usize, String),
    Timeout { rank: usize, waited: f64 },
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// What a rank's thread ends with: its result, or its panic.
type Ended<T> = std::thread::Result<Result<T>>;
/// What a rank thread sends back: its rank and how it ended.
type RankResult<T> = (usize, Ended<T>);

/// Run `work` on `settings.devices` ranks, each in its own thread with `threads / devices` CPU
/// threads (rayon pool) and the device `device_of(rank)`, registered with burn-collective on
/// backend `B` (the inner, non-autodiff backend the gradients live on). Returns rank 0's result
/// when every rank succeeds, else the failing rank's error (the lowest rank whose error is a
/// cause, not a consequence of the stop), naming it.
pub fn run_ranks<B: Backend, T: Send>(
    settings: ParallelSettings,
    device_of: impl Fn(usize) -> B::Device + Sync,
    work: impl Fn(Comm, B::Device) -> Result<T> + Sync,
) -> Result<T> {
    let n = settings.devices;
    if n == 0 {
        return Err(Error::invalid("run.devices must be at least 1"));
    }
    if n == 1 {
        return work(Comm::single(), device_of(0));
    }
    let _lock = RUN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // A previous run that failed may have left peers registered.
    reset_collective::<B>();
    let shared = Arc::new(Shared {
        start: Instant::now(),
        entered: (0..n).map(|_| AtomicU64::new(0)).collect(),
        secondary: (0..n).map(|_| AtomicBool::new(false)).collect(),
        aborted: AtomicBool::new(false),
    });
    let (tx, rx) = mpsc::channel::<RankResult<T>>();
    let (results, timeout) = std::thread::scope(|scope| {
        for rank in 0..n {
            spawn_rank::<B, T>(scope, rank, n, &shared, tx.clone(), &device_of, &work);
        }
        drop(tx);
        supervise::<B, T>(&rx, n, &shared, settings.timeout)
    });
    reset_collective::<B>();
    collect(results, timeout, &shared, n, settings.timeout)
}

/// Start rank `rank` of `n` in a thread of `scope`: its device, its share of the CPU threads,
/// registration with the collective, then `work`; the result (or the panic) goes to `tx`.
fn spawn_rank<'s, 'e, B: Backend, T: Send + 's>(
    scope: &'s std::thread::Scope<'s, 'e>,
    rank: usize,
    n: usize,
    shared: &Arc<Shared>,
    tx: mpsc::Sender<RankResult<T>>,
    device_of: &'s (impl Fn(usize) -> B::Device + Sync),
    work: &'s (impl Fn(Comm, B::Device) -> Result<T> + Sync),
) {
    let per_rank = (rayon::current_num_threads() / n).max(1);
    let config = CollectiveConfig::default().with_num_devices(n);
    let comm = Comm {
        rank,
        world: n,
        shared: Some(shared.clone()),
    };
    std::thread::Builder::new()
        .name(format!("shears-rank-{rank}"))
        .spawn_scoped(scope, move || {
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let device = device_of(rank);
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(per_rank)
                    .thread_name(move |i| format!("shears-rank-{rank}-{i}"))
                    .build()
                    .map_err(|e| Error::invalid(format!("rank {rank}: threads: {e}")))?;
                pool.install(|| {
                    comm.collective("registering with the collective", || {
                        register::<B>(comm.peer(), device.clone(), config)
                            .map_err(|e| format!("{e:?}"))
                    })?;
                    let out = work(comm.clone(), device);
                    if out.is_ok() {
                        let _ = finish_collective::<B>(comm.peer());
                    }
                    out
                })
            }));
            let _ = tx.send((rank, r));
        })
        .expect("spawn a rank thread");
}

/// Wait for the `n` ranks' results, stopping the collective when one fails and when one waits
/// in a collective longer than `timeout` (the hung rank is reported).
fn supervise<B: Backend, T>(
    rx: &mpsc::Receiver<RankResult<T>>,
    n: usize,
    shared: &Shared,
    timeout: Duration,
) -> (Vec<Option<Ended<T>>>, Option<Failure>) {
    let mut results: Vec<Option<Ended<T>>> = (0..n).map(|_| None).collect();
    let mut hung: Option<Failure> = None;
    let abort = |shared: &Shared| {
        if !shared.aborted.swap(true, Ordering::SeqCst) {
            reset_collective::<B>();
        }
    };
    let mut left = n;
    while left > 0 {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((rank, r)) => {
                left -= 1;
                if !matches!(r, Ok(Ok(_))) {
                    abort(shared);
                }
                results[rank] = Some(r);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if shared.aborted.load(Ordering::SeqCst) {
                    // Wake waiters that entered a collective after the reset.
                    reset_collective::<B>();
                    continue;
                }
                let now = shared.start.elapsed().as_millis() as u64 + 1;
                for (rank, e) in shared.entered.iter().enumerate() {
                    let since = e.load(Ordering::SeqCst);
                    if since > 0 && now.saturating_sub(since) > timeout.as_millis() as u64 {
                        hung = Some(Failure::Timeout {
                            rank,
                            waited: (now - since) as f64 / 1e3,
                        });
                        abort(shared);
                        break;
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    (results, hung)
}

/// Rank 0's result when every rank succeeded, else the error of the run: the lowest rank
/// whose failure was a cause (not a consequence of the stop), or the timeout.
fn collect<T>(
    results: Vec<Option<Ended<T>>>,
    timeout: Option<Failure>,
    shared: &Shared,
    n: usize,
    limit: Duration,
) -> Result<T> {
    let mut failure: Option<Failure> = None;
    let mut outs = Vec::with_capacity(n);
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Some(Ok(Ok(v))) => outs.push(v),
            Some(Ok(Err(e)))
                if failure.is_none() && !shared.secondary[rank].load(Ordering::SeqCst) =>
            {
                failure = Some(Failure::Rank(rank, e));
            }
            Some(Err(p)) if failure.is_none() => {
                failure = Some(Failure::Panic(rank, panic_text(p.as_ref())));
            }
            _ => {}
        }
    }
    match failure.or(timeout) {
        Some(Failure::Rank(rank, e)) => Err(Error::invalid(format!(
            "rank {rank} of {n} failed, so the run stopped: {e}"
        ))),
        Some(Failure::Panic(rank, msg)) => Err(Error::invalid(format!(
            "rank {rank} of {n} panicked, so the run stopped: {msg}"
        ))),
        Some(Failure::Timeout { rank, waited }) => Err(Error::invalid(format!(
            "rank {rank} of {n} waited {waited:.1} s in a collective (more than run.collective_timeout_s = {:.1}); another rank did not arrive, so the run stopped",
            limit.as_secs_f64()
        ))),
        None if outs.len() == n => Ok(outs.swap_remove(0)),
        None => Err(Error::invalid(
            "a rank ended without a result (its error was a consequence of another rank's stop)",
        )),
    }
}
/// Host data every data-parallel rank builds its device copy from: kept until `ranks` ranks
/// have used it, then freed.
pub struct UntilEveryRank<T> {
    value: Mutex<(Option<T>, usize)>,
    ranks: usize,
}

impl<T> UntilEveryRank<T> {
    pub fn new(value: T, ranks: usize) -> Self {
        UntilEveryRank {
            value: Mutex::new((Some(value), 0)),
            ranks,
        }
    }

    /// `f` of the value (one rank at a time); the last rank's call frees it.
    pub fn use_once<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        let mut g = self.value.lock().unwrap_or_else(|e| e.into_inner());
        let r = f(g.0.as_ref().expect("host data until every rank is built"));
        g.1 += 1;
        if g.1 == self.ranks {
            g.0 = None;
        }
        r
    }
}

/// The device of data-parallel rank `rank`: `device`'s kind with index `rank` (`cuda:rank`);
/// on the CPU backends every rank gets the one CPU device.
pub fn rank_device<B: ShearsAutodiff>(device: &B::Device, rank: usize) -> B::Device {
    use burn::tensor::backend::Device;
    if rank == 0 {
        return device.clone();
    }
    let mut id = device.to_id();
    id.index_id = id.index_id.saturating_add(rank as u16);
    <B::Device as Device>::from_id(id)
}

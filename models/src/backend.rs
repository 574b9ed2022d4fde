//! Choosing a backend at run time. Model code is generic over `B: Backend`; a task is written
//! once as a generic method and [`dispatch`] runs the copy monomorphised for the backend the
//! user named, or says the binary was built without it.

use crate::ops::{ShearsAutodiff, ShearsOps};
use shears_core::{Error, Result};

/// The backends Shears knows, whether or not this binary was built with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// burn-ndarray: the deterministic CPU reference backend.
    NdArray,
    /// burn-flex: burn's newer pure-Rust CPU backend.
    Flex,
    /// burn-wgpu: Vulkan / Metal / DX12 GPUs (and Mesa's software Vulkan on CPU).
    Wgpu,
    /// burn-cuda: NVIDIA GPUs.
    Cuda,
}

impl BackendKind {
    /// Every backend, in the order they are documented.
    pub const ALL: [BackendKind; 4] = [
        BackendKind::NdArray,
        BackendKind::Flex,
        BackendKind::Wgpu,
        BackendKind::Cuda,
    ];

    /// Command-line name.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::NdArray => "ndarray",
            BackendKind::Flex => "flex",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        }
    }

    /// Whether this binary was built with the backend.
    pub fn is_compiled(self) -> bool {
        match self {
            BackendKind::NdArray => cfg!(feature = "ndarray"),
            BackendKind::Flex => cfg!(feature = "flex"),
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
            BackendKind::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// The backends this binary was built with.
    pub fn compiled() -> Vec<BackendKind> {
        Self::ALL.into_iter().filter(|b| b.is_compiled()).collect()
    }

    /// Whether the backend computes on the CPU.
    pub fn is_cpu(self) -> bool {
        matches!(self, BackendKind::NdArray | BackendKind::Flex)
    }

    /// The default backend: flex when built (it won the CPU benchmark, see the README), else
    /// ndarray, else the first compiled one.
    pub fn default_backend() -> Option<BackendKind> {
        [
            BackendKind::Flex,
            BackendKind::NdArray,
            BackendKind::Cuda,
            BackendKind::Wgpu,
        ]
        .into_iter()
        .find(|b| b.is_compiled())
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|b| b.name() == s.to_ascii_lowercase())
            .ok_or_else(|| format!("unknown backend '{s}' (expected ndarray, flex, wgpu or cuda)"))
    }
}

/// Work to run on whichever inference backend is chosen.
pub trait BackendTask {
    /// What the task returns.
    type Output;
    /// Run on backend `B`.
    fn run<B: ShearsOps>(self, device: B::Device) -> Self::Output;
}

/// Work that needs gradients, run on the autodiff wrapper of the chosen backend.
pub trait AutodiffTask {
    /// What the task returns.
    type Output;
    /// Run on autodiff backend `B`.
    fn run<B: ShearsAutodiff>(self, device: B::Device) -> Self::Output;
}

/// burn-ndarray with f32 floats.
#[cfg(feature = "ndarray")]
pub type NdArrayBackend = burn::backend::NdArray<f32>;
/// burn-flex.
#[cfg(feature = "flex")]
pub type FlexBackend = burn::backend::Flex;
/// burn-wgpu with f32 floats.
#[cfg(feature = "wgpu")]
pub type WgpuBackend = burn::backend::Wgpu;
/// burn-cuda with f32 floats.
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Cuda;

fn not_compiled(kind: BackendKind) -> Error {
    let built: Vec<&str> = BackendKind::compiled().iter().map(|b| b.name()).collect();
    Error::invalid(format!(
        "this binary was built without the '{kind}' backend (built with: {}); rebuild with `--features {kind}`",
        built.join(", ")
    ))
}

/// Run `task` on the backend `kind`.
pub fn dispatch<T: BackendTask>(kind: BackendKind, task: T) -> Result<T::Output> {
    #[allow(unreachable_patterns)]
    match kind {
        #[cfg(feature = "ndarray")]
        BackendKind::NdArray => Ok(task.run::<NdArrayBackend>(Default::default())),
        #[cfg(feature = "flex")]
        BackendKind::Flex => Ok(task.run::<FlexBackend>(Default::default())),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => Ok(task.run::<WgpuBackend>(Default::default())),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => Ok(task.run::<CudaBackend>(Default::default())),
        other => {
            let _ = task;
            Err(not_compiled(other))
        }
    }
}

/// Run `task` on the autodiff wrapper of backend `kind`.
pub fn dispatch_autodiff<T: AutodiffTask>(kind: BackendKind, task: T) -> Result<T::Output> {
    use burn::backend::Autodiff;
    #[allow(unreachable_patterns)]
    match kind {
        #[cfg(feature = "ndarray")]
        BackendKind::NdArray => Ok(task.run::<Autodiff<NdArrayBackend>>(Default::default())),
        #[cfg(feature = "flex")]
        BackendKind::Flex => Ok(task.run::<Autodiff<FlexBackend>>(Default::default())),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => Ok(task.run::<Autodiff<WgpuBackend>>(Default::default())),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => Ok(task.run::<Autodiff<CudaBackend>>(Default::default())),
        other => {
            let _ = task;
            Err(not_compiled(other))
        }
    }
}

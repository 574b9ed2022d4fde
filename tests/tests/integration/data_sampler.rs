//! The domain sampler over a prepared dataset: the same seed draws the same sequences, and a
//! state saved at step k and restored *in a new process* continues exactly like the
//! uninterrupted run.

use std::collections::BTreeMap;
use std::process::Command;

use shears_data::{DomainSampler, Exhaustion, SamplerConfig, SamplerState};

fn sizes() -> BTreeMap<String, u64> {
    [("book", 700u64), ("c4", 1500), ("github", 300)]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect()
}

fn weights() -> BTreeMap<String, f64> {
    [("book", 0.2), ("c4", 0.5), ("github", 0.3)]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect()
}

fn sampler() -> DomainSampler {
    let cfg = SamplerConfig {
        seed: 11,
        rank: 0,
        world_size: 1,
        exhaustion: Exhaustion::Wrap,
    };
    DomainSampler::new(cfg, &sizes(), &weights()).unwrap()
}

fn draws(s: &mut DomainSampler, n: usize) -> Vec<(String, u64)> {
    (0..n)
        .map(|_| s.draw().map(|d| (d.domain, d.index)).unwrap())
        .collect()
}

#[test]
fn same_seed_same_draws() {
    assert_eq!(draws(&mut sampler(), 2000), draws(&mut sampler(), 2000));
}

/// Run as a child process by `restored_in_a_new_process_continues_identically`: reads a saved
/// state, draws 1,000 sequences and writes them out.
#[test]
#[ignore]
fn sampler_child_process() {
    let Ok(state_path) = std::env::var("SHEARS_SAMPLER_STATE") else {
        return;
    };
    let state: SamplerState =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    let mut s = DomainSampler::restore(state, &sizes()).unwrap();
    let out = draws(&mut s, 1000);
    std::fs::write(
        std::env::var("SHEARS_SAMPLER_OUT").unwrap(),
        serde_json::to_string(&out).unwrap(),
    )
    .unwrap();
}

#[test]
fn restored_in_a_new_process_continues_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = sampler();
    draws(&mut s, 1234);
    // A weight update mid-run (as dynamic batch loading does) is part of the state.
    let mut w = weights();
    w.insert("github".into(), 0.05);
    s.set_weights(1234, &w, None).unwrap();
    draws(&mut s, 1000);
    let state_path = tmp.path().join("state.json");
    std::fs::write(&state_path, serde_json::to_string(s.state()).unwrap()).unwrap();
    let expected = draws(&mut s, 1000);

    let out_path = tmp.path().join("draws.json");
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            // The test's full name in this binary (`data_sampler::sampler_child_process`).
            &format!(
                "{}::sampler_child_process",
                module_path!().split_once("::").map_or("", |(_, m)| m)
            ),
            "--nocapture",
        ])
        .env("SHEARS_SAMPLER_STATE", &state_path)
        .env("SHEARS_SAMPLER_OUT", &out_path)
        .status()
        .unwrap();
    assert!(status.success());
    let got: Vec<(String, u64)> =
        serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    assert_eq!(
        got, expected,
        "a restored sampler draws what the uninterrupted one draws"
    );
    assert_eq!(s.state().history.len(), 2);
}

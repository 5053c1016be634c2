//! Randomized fault schedules with real head and edge processes, each reproducible from its
//! seed. A schedule SIGKILLs and restarts the head and edges (also mid-apply), cuts and
//! degrades links (loss, delay, reordering, duplication, one-way cuts), applies and deletes
//! EdgeNodes on both sides (one side after the other, or both at once), edits and removes
//! manifests by hand and plants foreign files, and now and then settles (heals everything
//! and checks, then goes on). At the end it heals everything and checks that every
//! acknowledged edit is present or superseded, that head and edges hold the same EdgeNodes,
//! and that each manifest directory holds exactly what its documents say beside the untouched
//! foreign files; last, one edit per EdgeNode made after healing must reach everyone.
//!
//! `cargo test --test it chaos::short` runs 8 fixed seeds (about a minute, in CI);
//! `cargo test --test it chaos::long -- --ignored` runs 200. Environment:
//! `EDGESYNC_CHAOS_SEED` (first seed), `EDGESYNC_CHAOS_SCHEDULES` (how many; 1 when only the
//! seed is given), `EDGESYNC_CHAOS_PARALLEL` (schedules at once, default 2). A failure prints
//! its seed, its steps with what each did, and the directory holding the daemons' logs.

mod check;
mod plan;
mod world;

use check::Expect;
use plan::{Plan, Step};
use std::sync::Arc;
use std::time::{Duration, Instant};
use world::{CONVERGE, World};

/// How long one schedule may take in all.
const SCHEDULE_TIMEOUT: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short() {
    let seeds: Vec<u64> = (1..=8).collect();
    run(&seeds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "200 schedules, long: cargo test --test it chaos::long -- --ignored"]
async fn long() {
    let seeds: Vec<u64> = (1000..1200).collect();
    run(&seeds).await;
}

/// Runs the schedules of `default_seeds` (or those the environment names), some at once;
/// panics listing every failure.
async fn run(default_seeds: &[u64]) {
    let var = |name: &str| {
        std::env::var(name).ok().map(|v| {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{name}={v}: not a number"))
        })
    };
    let seeds: Vec<u64> = match (var("EDGESYNC_CHAOS_SEED"), var("EDGESYNC_CHAOS_SCHEDULES")) {
        (None, None) => default_seeds.to_vec(),
        (first, count) => {
            let first = first.unwrap_or(default_seeds[0]);
            (first..first + count.unwrap_or(1)).collect()
        }
    };
    let parallel = var("EDGESYNC_CHAOS_PARALLEL").unwrap_or(2).max(1) as usize;
    let started = Instant::now();
    let slots = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = tokio::task::JoinSet::new();
    let mut seed_of = std::collections::HashMap::new();
    for &seed in &seeds {
        let slots = slots.clone();
        let task = tasks.spawn(async move {
            let _slot = slots.acquire_owned().await.unwrap();
            match tokio::time::timeout(SCHEDULE_TIMEOUT, schedule(seed)).await {
                Ok(result) => result,
                Err(_) => Err(report(
                    seed,
                    &format!("exceeded {SCHEDULE_TIMEOUT:?}"),
                    None,
                )),
            }
        });
        seed_of.insert(task.id(), seed);
    }
    let mut failures = Vec::new();
    while let Some(done) = tasks.join_next_with_id().await {
        match done {
            Ok((_, Ok(summary))) => eprintln!("chaos: {summary}"),
            Ok((_, Err(failure))) => {
                eprintln!("chaos: FAILED {failure}");
                failures.push(failure);
            }
            Err(e) => {
                let seed = seed_of[&e.id()];
                let failure = report(seed, &format!("panicked: {e}"), None);
                eprintln!("chaos: FAILED {failure}");
                failures.push(failure);
            }
        }
    }
    eprintln!(
        "chaos: {} schedule(s), {} failed, in {:?}",
        seeds.len(),
        failures.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {} chaos schedules failed:\n{}",
        failures.len(),
        seeds.len(),
        failures.join("\n")
    );
}

/// Runs the schedule of `seed`: its steps, then healing and the checks. Ok: a summary line.
async fn schedule(seed: u64) -> Result<String, String> {
    let started = Instant::now();
    let plan = Plan::new(seed);
    let mut world = World::start(&plan.drift_ms).await;
    let fail = |world: &mut World, what: String| {
        let dir = world.keep_files();
        let done = plan.steps.iter().zip(&world.outcomes);
        let mut steps = done
            .enumerate()
            .map(|(i, (step, outcome))| format!("  {i:3}: {step:?} -> {outcome}\n"))
            .collect::<String>();
        for (on, spec) in &plan.finals {
            steps.push_str(&format!("  final: {on:?} applies {spec:?}\n"));
        }
        report(
            seed,
            &format!("{what}\nlogs and files: {}", dir.display()),
            Some(&steps),
        )
    };
    for (i, step) in plan.steps.iter().enumerate() {
        if let Err(e) = world.run(i, step).await {
            return Err(fail(&mut world, format!("step {i}: {e}")));
        }
    }
    world.heal().await;
    let healed = Instant::now();
    let acked = Expect::Acknowledged(&world.applies);
    if let Err(e) = check::wait_converged(&world, &acked, CONVERGE).await {
        return Err(fail(&mut world, format!("after healing: {e}")));
    }
    let converged = healed.elapsed();
    for (on, spec) in &plan.finals {
        let applied = world
            .apply(None, *on, std::slice::from_ref(spec), None)
            .await;
        if let Err(e) = applied {
            return Err(fail(&mut world, format!("final edit: {e}")));
        }
    }
    let finals = Expect::Exactly(&plan.finals);
    if let Err(e) = check::wait_converged(&world, &finals, CONVERGE).await {
        return Err(fail(&mut world, format!("after the final edits: {e}")));
    }
    let acked = world.applies.iter().filter(|a| a.acked).count();
    Ok(format!(
        "seed {seed}: {} edge(s), {} steps, {acked} of {} edits acknowledged; {}; converged {:.1}s after healing; {:.1}s in all",
        plan.edges,
        plan.steps.len(),
        world.applies.len(),
        tally(&plan, &world.outcomes),
        converged.as_secs_f64(),
        started.elapsed().as_secs_f64()
    ))
}

/// What the steps did, in numbers: how the applies killed mid-way ended (acknowledged, cut
/// off, or killed before they came) and how many hand edits found a manifest to edit.
fn tally(plan: &Plan, outcomes: &[String]) -> String {
    let (mut acked, mut cut, mut before, mut hand, mut edited) = (0, 0, 0, 0, 0);
    for (step, outcome) in plan.steps.iter().zip(outcomes) {
        match step {
            Step::Apply {
                kill_after_us: Some(_),
                ..
            } => match outcome {
                o if o.starts_with("acknowledged") => acked += 1,
                o if o.contains("cannot reach") => before += 1,
                _ => cut += 1,
            },
            Step::HandEdit { .. } => {
                hand += 1;
                edited += usize::from(outcome.starts_with("edited"));
            }
            _ => {}
        }
    }
    format!(
        "killed mid-apply: {acked} acknowledged, {cut} cut off, {before} before it came; {edited} of {hand} hand edits found a manifest"
    )
}

/// A failure report: the seed, what went wrong, the steps (with what each did, if known,
/// else as planned) and how to run the schedule again.
fn report(seed: u64, what: &str, steps: Option<&str>) -> String {
    let steps = match steps {
        Some(steps) => format!("steps and what each did:\n{steps}"),
        None => Plan::new(seed).to_string(),
    };
    format!(
        "chaos schedule of seed {seed}: {what}\n{steps}replay: EDGESYNC_CHAOS_SEED={seed} cargo test --test it chaos::short\n"
    )
}

//! Pick and snapshot-rebuild times per strategy at 10, 100 and 1,000
//! endpoints (issue 4's targets: a pick <= 250 ns and a rebuild <= 5 ms at
//! 1,000 endpoints).
//!
//! ```sh
//! cargo bench --bench balance -- --warm-up-time 1 --measurement-time 3
//! ```

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use squire::balance::{
    now_ms, pinned, Balancer, Context, EjectionPolicy, Filter, Resolved, SlowStart, Snapshot,
    Strategy,
};
use squire::registry::{Instance, Status};

const SIZES: [usize; 3] = [10, 100, 1_000];

/// `n` instances with IP hosts, as discovery hands them to a rebuild.
fn instances(n: usize) -> Vec<Resolved> {
    (0..n)
        .map(|i| Instance {
            name: "battle".into(),
            id: format!("battle-{i:05}"),
            host: "10.0.0.1".into(),
            port: 7000 + (i % 1000) as u16,
            tags: vec!["game".into()],
            metadata: [("zone".to_owned(), "a".to_owned())].into(),
            version: "1.0.0".into(),
            // Varied weights, so weighted strategies do real work.
            weight: 50 + (i as u32 * 37) % 100,
            status: Status::Healthy,
            // Every one reports a load (about 1 in 100 full), so
            // least_loaded and packed compare real shares and every
            // strategy pays for the full-endpoint test.
            load: squire::load::Load::new((i as u32 * 37) % 101, 100, std::time::SystemTime::now())
                .ok(),
        })
        .filter_map(Resolved::literal)
        .collect()
}

fn balancer(strategy: Strategy) -> Balancer {
    Balancer::new(strategy, EjectionPolicy::default(), 0.0)
}

fn picks(c: &mut Criterion) {
    let keys: Vec<u64> = (0..1024u64)
        .map(|k| squire::balance::hash::mix(k + 1))
        .collect();
    for strategy in Strategy::ALL {
        let mut group = c.benchmark_group(format!("pick/{}", strategy.name()));
        for n in SIZES {
            let b = balancer(strategy);
            let snapshot =
                Snapshot::rebuild(&Snapshot::default(), &instances(n), &Filter::default(), &b);
            // Some connections in flight, as in production.
            let _open: Vec<_> = snapshot
                .endpoints()
                .iter()
                .step_by(3)
                .map(|e| e.stats.open())
                .collect();
            let mut i = 0usize;
            group.bench_with_input(BenchmarkId::from_parameter(n), &n, |bench, _| {
                bench.iter(|| {
                    i = i.wrapping_add(1);
                    let ctx = Context::new(now_ms()).with_key(Some(keys[i & 1023]));
                    black_box(b.pick(black_box(&snapshot), &ctx))
                })
            });
        }
        group.finish();
    }
}

/// Picks at 1,000 endpoints while the last half just joined and ramps up
/// (slow start on): the admission draw, and a second pick when it fails.
fn slow_start_picks(c: &mut Criterion) {
    let keys: Vec<u64> = (0..1024u64)
        .map(|k| squire::balance::hash::mix(k + 1))
        .collect();
    let all = instances(1_000);
    let mut group = c.benchmark_group("pick_slow_start_1000");
    for strategy in Strategy::ALL {
        let b = balancer(strategy).with_slow_start(SlowStart {
            duration: std::time::Duration::from_secs(3600),
            min: 0.1,
        });
        let warm = Snapshot::rebuild(&Snapshot::default(), &all[..500], &Filter::default(), &b);
        let snapshot = Snapshot::rebuild(&warm, &all, &Filter::default(), &b);
        let mut i = 0usize;
        group.bench_function(strategy.name(), |bench| {
            bench.iter(|| {
                i = i.wrapping_add(1);
                let ctx = Context::new(now_ms()).with_key(Some(keys[i & 1023]));
                black_box(b.pick(black_box(&snapshot), &ctx))
            })
        });
    }
    group.finish();
    // A pinned pick: a binary search by id and three checks.
    let b = balancer(Strategy::RoundRobin);
    let snapshot = Snapshot::rebuild(&Snapshot::default(), &all, &Filter::default(), &b);
    let ids: Vec<String> = (0..1024)
        .map(|k| format!("battle-{:05}", k % 1000))
        .collect();
    let mut i = 0usize;
    c.bench_function("pick_pinned_1000", |bench| {
        bench.iter(|| {
            i = i.wrapping_add(1);
            black_box(pinned::pick(black_box(&snapshot), &ids[i & 1023], now_ms()))
        })
    });
}

fn rebuilds(c: &mut Criterion) {
    let mut group = c.benchmark_group("rebuild_1000");
    let all = instances(1_001);
    // A deploy adds one instance to 1,000: the common rebuild.
    let before: Vec<Resolved> = all[..1_000].to_vec();
    for strategy in Strategy::ALL {
        let b = balancer(strategy);
        let previous = Snapshot::rebuild(&Snapshot::default(), &before, &Filter::default(), &b);
        group.bench_function(strategy.name(), |bench| {
            bench.iter(|| {
                black_box(Snapshot::rebuild(
                    black_box(&previous),
                    &all,
                    &Filter::default(),
                    &b,
                ))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, picks, slow_start_picks, rebuilds);
criterion_main!(benches);

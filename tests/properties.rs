//! Properties of the pure parts, over generated inputs (proptest): where a
//! fuzzer has nothing to add (a structured value, a clock) or as the fast,
//! always-run half of the fuzz targets in `fuzz/`.
//!
//! - a registry value round-trips through its JSON, alone, in a local
//!   registry file and in a last-known snapshot;
//! - any generated valid `agent.toml` validates, and a real one with a byte
//!   changed, inserted or cut never panics the loader;
//! - the `ROUTE` line parser gives back the key it was given, keeps the
//!   bytes after the line, and never panics;
//! - the token bucket never lets more through than its burst plus one per
//!   refill, and is full again after a quiet spell;
//! - backoff delays stay within the upper half of the current step and
//!   never above the maximum.

use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;
use squire::backoff::Backoff;
use squire::balance::Strategy as Balancing;
use squire::proxy::preamble;
use squire::registry::{Instance, Status};
use squire::time::TokenBucket;
use squire::Config;

fn any_status() -> impl Strategy<Value = Status> {
    proptest::sample::select(Status::ALL.to_vec())
}

fn any_instance() -> impl Strategy<Value = Instance> {
    (
        (any::<String>(), any::<String>(), "\\PC+", 1u16..),
        (
            proptest::collection::vec(any::<String>(), 0..4),
            proptest::collection::btree_map(any::<String>(), any::<String>(), 0..4),
            any::<String>(),
            any::<u32>(),
            any_status(),
        ),
    )
        .prop_map(
            |((name, id, host, port), (tags, metadata, version, weight, status))| Instance {
                name,
                id,
                host,
                port,
                tags,
                metadata,
                version,
                weight,
                status,
                load: None,
            },
        )
}

/// The example and deployment configs, the seeds of the `config` target.
fn real_configs() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/config");
    let mut configs: Vec<String> = std::fs::read_dir(&dir)
        .expect("fuzz/seeds/config")
        .map(|e| std::fs::read_to_string(e.expect("entry").path()).expect("seed"))
        .collect();
    configs.sort();
    configs
}

/// One `[[upstream]]` of a generated config: service, listen port, strategy.
type GeneratedUpstream = (String, u16, &'static str);

fn toml_of(service: &str, port: u16, ttl: u64, upstreams: &[GeneratedUpstream]) -> String {
    let mut text = format!(
        "[agent]\nadmin = \"127.0.0.1:9911\"\n\n\
         [registry]\nkind = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\nttl = \"{ttl}s\"\n\n\
         [service]\nname = \"{service}\"\nhost = \"127.0.0.1\"\nport = {port}\n"
    );
    for (name, listen, strategy) in upstreams {
        text += &format!(
            "\n[[upstream]]\nservice = \"{name}\"\nlisten = \"127.0.0.1:{listen}\"\nstrategy = \"{strategy}\"\n"
        );
    }
    text
}

fn any_upstreams() -> impl Strategy<Value = Vec<GeneratedUpstream>> {
    let names: Vec<&'static str> = Balancing::ALL.iter().map(|s| s.name()).collect();
    // Distinct listen ports, none of them the admin port.
    proptest::collection::btree_map(
        10_000u16..60_000,
        ("[a-z][a-z0-9_.:-]{0,20}", proptest::sample::select(names)),
        0..5,
    )
    .prop_map(|by_port| {
        by_port
            .into_iter()
            .map(|(port, (name, strategy))| (name, port, strategy))
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn an_instance_round_trips_through_its_json(instance in any_instance()) {
        let json = instance.to_json();
        prop_assert!(squire::fuzzing::instance(json.as_bytes()));
        prop_assert_eq!(Instance::from_json(json.as_bytes()), Ok(instance));
    }

    #[test]
    fn a_local_entry_and_a_snapshot_round_trip(
        instances in proptest::collection::vec(any_instance(), 0..4),
        expires_at_ms in any::<u64>(),
        listed_at_ms in 0u64..253_402_300_799_999,
    ) {
        // The fuzz entry points assert the round-trips; here they get
        // structured values a byte fuzzer rarely builds.
        for instance in &instances {
            let entry = format!(r#"{{"expires_at_ms":{expires_at_ms},"instance":{}}}"#, instance.to_json());
            prop_assert!(squire::fuzzing::local_entry(entry.as_bytes()), "{}", entry);
        }
        let instances: Vec<String> = instances
            .into_iter()
            .map(|i| Instance { name: "svc".into(), ..i }.to_json())
            .collect();
        let listed_at = humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + Duration::from_millis(listed_at_ms),
        );
        let snapshot = format!(
            r#"{{"version":1,"service":"svc","listed_at":"{listed_at}","instances":[{}]}}"#,
            instances.join(",")
        );
        prop_assert!(squire::fuzzing::last_known(snapshot.as_bytes()), "{}", snapshot);
    }

    #[test]
    fn a_generated_valid_config_validates(
        service in "[a-zA-Z0-9][a-zA-Z0-9_.:-]{0,30}",
        port in 1u16..,
        ttl in 2u64..3600,
        upstreams in any_upstreams(),
    ) {
        let text = toml_of(&service, port, ttl, &upstreams);
        let config = Config::from_toml(&text);
        prop_assert!(config.is_ok(), "{}\n{}", text, config.err().map(|e| e.to_string()).unwrap_or_default());
        let config = config.expect("checked");
        prop_assert_eq!(config.upstreams.len(), upstreams.len());
        prop_assert_eq!(config.service.map(|s| (s.name, s.port)), Some((service, port)));
    }

    #[test]
    fn a_real_config_with_a_byte_changed_never_panics(
        which in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        edit in 0u8..3,
    ) {
        let configs = real_configs();
        let mut bytes = which.get(&configs).clone().into_bytes();
        let i = at.index(bytes.len());
        match edit {
            0 => bytes[i] = byte,
            1 => bytes.insert(i, byte),
            _ => bytes.truncate(i),
        }
        squire::fuzzing::config(&bytes);
    }

    #[test]
    fn the_route_line_gives_back_its_key_and_keeps_the_rest(
        key in proptest::collection::vec(any::<u8>().prop_filter("no space or newline", |b| !b.is_ascii_whitespace()), 1..64),
        crlf in any::<bool>(),
        rest in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut line = b"ROUTE ".to_vec();
        line.extend_from_slice(&key);
        prop_assert_eq!(preamble::parse(&line), Ok(Some(&key[..])));
        if crlf {
            line.push(b'\r');
        }
        line.push(b'\n');
        let mut input = line.clone();
        input.extend_from_slice(&rest);
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let mut reader = &input[..];
        let read = runtime.block_on(preamble::read(&mut reader, input.len()));
        prop_assert_eq!(read, Ok(preamble::Preamble { key: Some(key), rest }));
    }

    #[test]
    fn the_route_parser_never_panics(line in proptest::collection::vec(any::<u8>(), 0..64), extra in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(Some(key)) = preamble::parse(&line) {
            prop_assert!(!key.is_empty());
            prop_assert!(!key.first().is_some_and(u8::is_ascii_whitespace));
            prop_assert!(!key.last().is_some_and(u8::is_ascii_whitespace));
        }
        let mut bytes = vec![0u8, 32];
        bytes.extend_from_slice(&line);
        bytes.push(b'\n');
        bytes.extend_from_slice(&extra);
        squire::fuzzing::preamble(&bytes);
    }

    #[test]
    fn the_token_bucket_never_exceeds_its_burst_plus_refills(
        burst in 1u32..6,
        refill_ms in 1u64..2_000,
        steps in proptest::collection::vec((0u64..3_000, 0u32..8), 1..40),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let refill = Duration::from_millis(refill_ms);
            let mut bucket = TokenBucket::new(burst, refill);
            let start = tokio::time::Instant::now();
            let mut taken = 0u64;
            for (advance, tries) in steps {
                tokio::time::advance(Duration::from_millis(advance)).await;
                let mut now_taken = 0;
                for _ in 0..tries {
                    if bucket.ready_at() <= tokio::time::Instant::now() {
                        bucket.take();
                        taken += 1;
                        now_taken += 1;
                    }
                }
                prop_assert!(now_taken <= burst, "{} at one instant, burst {}", now_taken, burst);
                let elapsed = start.elapsed().as_millis() as u64;
                prop_assert!(
                    taken <= u64::from(burst) + elapsed / refill_ms,
                    "{} taken in {}ms, burst {} refill {}ms", taken, elapsed, burst, refill_ms
                );
            }
            // A quiet spell of burst refills fills the bucket again.
            tokio::time::advance(refill * burst).await;
            for _ in 0..burst {
                prop_assert!(bucket.ready_at() <= tokio::time::Instant::now(), "refilled");
                bucket.take();
            }
            Ok(())
        })?;
    }

    #[test]
    fn backoff_stays_within_the_current_step_and_the_maximum(
        base_ns in 1u64..,
        factor in 1u32..1_000,
        secs_max in any::<bool>(),
        retryable in proptest::collection::vec(any::<bool>(), 1..80),
    ) {
        let base = Duration::from_nanos(base_ns);
        let max = if secs_max { Duration::MAX } else { base.saturating_mul(factor) };
        let mut backoff = Backoff::new(base, max);
        let mut step = base;
        for retryable in retryable {
            let delay = backoff.next(retryable);
            if retryable {
                prop_assert!(delay >= step / 2 && delay <= step, "{:?} outside {:?}", delay, step);
                step = step.saturating_mul(2).min(max);
            } else {
                prop_assert_eq!(delay, max);
            }
            prop_assert!(delay <= max);
        }
    }
}

#[test]
fn the_generated_configs_cover_every_strategy() {
    // The strategy names the generator picks from are the ones validation
    // takes: one config naming each of them is valid.
    let upstreams: Vec<GeneratedUpstream> = Balancing::ALL
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("svc{i}"), 20_000 + i as u16, s.name()))
        .collect();
    let text = toml_of("gate", 7100, 10, &upstreams);
    if let Err(e) = Config::from_toml(&text) {
        panic!("{text}\n{e}");
    }
}

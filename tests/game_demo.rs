//! `cargo run --example game_demo` as a new user runs it, without the
//! pauses: the example's own code (included from `examples/`), its output
//! checked: rooms spread over three battle servers, the same rooms on the
//! same servers when joined again, and after `battle-2` stops only its
//! rooms move.

// The example's `main` is not called here; `demo` is.
#[allow(dead_code)]
#[path = "../examples/game_demo.rs"]
mod game_demo;

use std::collections::BTreeSet;
use std::time::Duration;

use clap::Parser;

#[test]
fn the_flags_parse() {
    let options =
        game_demo::Options::try_parse_from(["game_demo", "--rooms", "5", "--pause", "0s"])
            .expect("flags");
    assert_eq!((options.rooms, options.pause), (5, Duration::ZERO));
    assert!(game_demo::Options::try_parse_from(["game_demo", "--rooms", "0"]).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_stopped_servers_rooms_move() {
    let options = game_demo::Options {
        rooms: 24,
        pause: Duration::ZERO,
    };
    let mut out = Vec::new();
    let report = game_demo::demo(&options, &mut out)
        .await
        .expect("the demo runs");
    let text = String::from_utf8(out).expect("utf-8");
    println!("{text}");

    assert_eq!(report.before.len(), 24);
    let holders: BTreeSet<&str> = report.before.values().map(String::as_str).collect();
    assert_eq!(
        holders,
        BTreeSet::from(["battle-1", "battle-2", "battle-3"]),
        "rooms on all three servers"
    );
    assert_eq!(report.stopped, "battle-2");
    let mut moved = 0;
    for (room, was) in &report.before {
        let now = &report.after[room];
        if was == "battle-2" {
            moved += 1;
            assert!(
                now == "battle-1" || now == "battle-3",
                "{room} went to {now}"
            );
            assert!(
                text.contains(&format!("moved  {room:<8} battle-2 -> {now}")),
                "{room} not reported"
            );
        } else {
            assert_eq!(now, was, "{room} moved though {was} kept running");
        }
    }
    assert!(moved > 0);
    assert_eq!(text.matches("  moved  ").count(), moved, "{text}");
    assert!(
        text.contains(&format!(
            "{moved} rooms moved (those battle-2 held), {} stayed where they were\n",
            24 - moved
        )),
        "{text}"
    );
    assert!(!text.contains("UNEXPECTED"), "{text}");
    for line in [
        "started battle-1 on 127.0.0.1:",
        "the gate sees battle-1, battle-2, battle-3",
        "(joined again: every room on the same server)",
        "stopping battle-2: its squire deregisters it",
        "the gate sees battle-1, battle-3",
    ] {
        assert!(text.contains(line), "no {line:?} in\n{text}");
    }
}

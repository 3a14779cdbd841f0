//! `cargo run --example game_demo` as a new user runs it, without the
//! pauses: the example's own code (included from `examples/`), its report
//! and output checked step by step: rooms spread by hash over three battle
//! servers and stay put; the matchmaker's `packed` listener fills the
//! fullest server with room and never a full one, by the loads the servers
//! report through their squires; pinned clients reach exactly their
//! room's server, and once `battle-2` drains or stops are refused with the
//! reason instead of being sent elsewhere; after the stop only
//! `battle-2`'s rooms move.

// The example's `main` is not called here; `demo` is.
#[allow(dead_code)]
#[path = "../examples/game_demo.rs"]
mod game_demo;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use clap::Parser;
use game_demo::{Loads, CAPACITY, FLEET, NEW_ROOMS, ROOM_PLAYERS, STOPPED};

#[test]
fn the_flags_parse() {
    let options =
        game_demo::Options::try_parse_from(["game_demo", "--rooms", "5", "--pause", "0s"])
            .expect("flags");
    assert_eq!((options.rooms, options.pause), (5, Duration::ZERO));
    assert!(game_demo::Options::try_parse_from(["game_demo", "--rooms", "0"]).is_err());
}

/// The server `packed` must pick at `loads`: the fullest with room, ties
/// to the first by instance id; `None` when every one is full.
fn packed_choice(loads: &Loads) -> Option<&str> {
    let mut best: Option<(&str, (u32, u32))> = None;
    for (id, &(players, capacity)) in loads {
        if players >= capacity {
            continue;
        }
        match best {
            Some((_, (bp, bc)))
                if u64::from(players) * u64::from(bc) <= u64::from(bp) * u64::from(capacity) => {}
            _ => best = Some((id, (players, capacity))),
        }
    }
    best.map(|(id, _)| id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_of_the_demo_does_what_it_says() {
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
    assert_eq!(report.stopped, STOPPED);
    assert!(!text.contains("UNEXPECTED"), "{text}");

    // 1. By hash: all three servers hold rooms.
    assert_eq!(report.before.len(), 24);
    let holders: BTreeSet<&str> = report.before.values().map(String::as_str).collect();
    assert_eq!(
        holders,
        BTreeSet::from(["battle-1", "battle-2", "battle-3"]),
        "rooms on all three servers"
    );

    // 2. Placement: each room where packed must put it, by the loads the
    // gate saw, and each server's players grew by exactly its rooms.
    let reported: Loads = FLEET
        .iter()
        .map(|(name, players)| ((*name).to_owned(), (*players, CAPACITY)))
        .collect();
    assert_eq!(report.loads, reported);
    assert_eq!(report.placed.len(), NEW_ROOMS as usize);
    let mut loads = reported.clone();
    for placement in &report.placed {
        assert_eq!(
            packed_choice(&loads),
            Some(placement.server.as_str()),
            "{} at {loads:?}",
            placement.room
        );
        let (players, capacity) = loads[&placement.server];
        assert!(
            players < capacity,
            "{} went to a full server",
            placement.room
        );
        loads.insert(placement.server.clone(), (players + ROOM_PLAYERS, capacity));
        assert_eq!(placement.loads, loads, "{}", placement.room);
    }
    let placed_on: Vec<&str> = report.placed.iter().map(|p| p.server.as_str()).collect();
    assert_eq!(
        placed_on,
        ["battle-2", "battle-2", "battle-3", "battle-3"],
        "battle-2 (fullest) fills, then battle-3; battle-1, the emptiest, stays free"
    );
    assert_eq!(
        loads["battle-2"],
        (CAPACITY, CAPACITY),
        "battle-2 ends full"
    );
    assert!(
        text.contains("100/100 full"),
        "the table shows the full server: {text}"
    );
    for placement in &report.placed {
        assert!(
            text.contains(&format!("  {:<8} {:<10}", placement.room, placement.server)),
            "{} not in the table:\n{text}",
            placement.room
        );
    }

    // 3. Pinned: every room of the directory reached exactly its server,
    // the full battle-2 included.
    let mut directory: BTreeMap<String, String> = report.before.clone();
    for placement in &report.placed {
        directory.insert(placement.room.clone(), placement.server.clone());
    }
    assert_eq!(report.pinned.len(), directory.len());
    for (room, server) in &directory {
        assert_eq!(report.pinned[room].as_ref(), Ok(server), "{room}");
    }

    // 4. Draining, then stopped: pins to battle-2 refused with the reason,
    // never answered by another server; the others still reach theirs.
    let on_stopped = directory.values().filter(|s| *s == STOPPED).count();
    assert!(on_stopped >= 3, "battle-2 holds hashed and placed rooms");
    for (outcomes, reason) in [
        (&report.pinned_draining, "pinned_unavailable"),
        (&report.pinned_stopped, "pinned_unknown"),
    ] {
        assert_eq!(outcomes.len(), directory.len());
        for (room, server) in &directory {
            let want = if server == STOPPED {
                Err(reason.to_owned())
            } else {
                Ok(server.clone())
            };
            assert_eq!(outcomes[room], want, "{room}");
        }
        assert!(
            text.contains(&format!("@battle-2 refused: {reason}")),
            "{reason} not reported:\n{text}"
        );
    }

    // 5. By hash after the stop: only battle-2's rooms moved.
    let mut moved = 0;
    for (room, was) in &report.before {
        let now = &report.after[room];
        if was == STOPPED {
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
    for line in [
        "started battle-1 on 127.0.0.1:",
        "the gate sees battle-1, battle-2, battle-3",
        "(joined again: every room on the same server)",
        "battle-2 drains (maintenance on: announced draining)",
        "the gate routes to battle-1, battle-3 and still knows battle-2",
        "stopping battle-2: its squire deregisters it",
        "the gate sees battle-1, battle-3",
    ] {
        assert!(text.contains(line), "no {line:?} in\n{text}");
    }
}

//! Per-key locks: a second holder waits, and the death of the first (even by SIGKILL) frees
//! the key at once, with no cleanup.

use std::sync::mpsc;
use std::time::Duration;

use crate::support::*;
use emflow_cache::Store;

#[test]
fn a_second_handle_waits_until_the_first_releases() {
    let _no_forks = no_forks();
    let dir = tempfile::tempdir().unwrap();
    let first = Store::open(dir.path()).unwrap();
    let second = Store::open(dir.path()).unwrap();
    let held = first.lock("key").unwrap();
    assert!(second.try_lock("key").unwrap().is_none());
    assert!(
        second.try_lock("other").unwrap().is_some(),
        "keys lock independently"
    );
    let holder = second.lock_holder("key").unwrap().unwrap();
    assert_eq!(holder.pid, std::process::id());

    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let lock = second.lock("key").unwrap();
        tx.send(()).unwrap();
        drop(lock);
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the second lock must wait while the first is held"
    );
    drop(held);
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the waiter gets the lock once it is released");
    waiter.join().unwrap();
    assert!(first.lock_holder("key").unwrap().is_none());
}

#[test]
fn child_holding_a_lock() {
    if std::env::var(CHILD_ENV).as_deref() != Ok("hold-lock") {
        return;
    }
    let store = Store::open(std::env::var("EMFLOW_CACHE_TEST_STORE").unwrap().as_ref()).unwrap();
    let _lock = store.lock("shared-key").unwrap();
    println!("locked");
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn killing_the_holder_lets_the_waiter_proceed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut child = ChildProcess::spawn(
        "locks::child_holding_a_lock",
        "hold-lock",
        dir.path(),
        "locked",
    );
    let holder = store.lock_holder("shared-key").unwrap().unwrap();
    assert_eq!(holder.pid, child.id());

    let (tx, rx) = mpsc::channel();
    let waiter_store = store.clone();
    let waiter = std::thread::spawn(move || {
        let lock = waiter_store.lock("shared-key").unwrap();
        tx.send(()).unwrap();
        lock
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "must wait for the child"
    );
    child.kill9();
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the lock of a killed holder is free with no cleanup");
    let lock = waiter.join().unwrap();
    assert_eq!(
        store.lock_holder("shared-key").unwrap().unwrap().pid,
        std::process::id()
    );
    drop(lock);
}

#[test]
fn gc_removing_lock_files_never_lets_two_holders_in() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let store = Store::open(dir.path()).unwrap();
            let counter = counter.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    let _lock = store.lock("contended").unwrap();
                    let inside = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    assert_eq!(inside, 0, "two holders of one key at once");
                    std::thread::yield_now();
                    counter.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                }
            })
        })
        .collect();
    let gc_store = store.clone();
    let gc = std::thread::spawn(move || {
        for _ in 0..100 {
            // gc unlinks free lock files; a racing locker must notice and retry.
            let _ = gc_store.gc(&Default::default(), &Default::default());
        }
    });
    for t in threads {
        t.join().unwrap();
    }
    gc.join().unwrap();
}

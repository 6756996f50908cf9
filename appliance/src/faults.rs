//! Test builds only (feature `fault-injection`): wraps every backing store the daemon opens
//! in `targets`' fault-injecting engine, with the rules of the `VHOST_APPLIANCE_FAULTS`
//! environment variable, so end-to-end tests can hold, delay or fail chosen operations of
//! the real daemon (e.g. hold a write, then SIGKILL the daemon with it in flight).
//!
//! Syntax: rules separated by `,`, each `ACTION:KIND[@OFFSET][*TIMES]`, where ACTION is
//! `hold`, `fail=ERRNO` or `delay=MS`, KIND is `read`, `write`, `flush`, `discard` or
//! `write-zeroes`, OFFSET is a byte offset and TIMES how many operations the rule applies to
//! (every one if absent). Held operations are never released: they end with the process.
//!
//! Also [`FORBIDDEN_SYSCALL_ENV`]: a thread started after the sandbox makes a syscall the
//! seccomp filter forbids, to prove the filter is on in the daemon that serves.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use targets::disk::fault::{Fault, FaultDisk, OpKind, OpMatch};
use targets::disk::Disk;

/// The environment variable holding the rules.
pub const ENV: &str = "VHOST_APPLIANCE_FAULTS";

/// Milliseconds after entering the sandbox at which a new thread calls `personality(2)`
/// (a harmless query, but outside the seccomp filter's list).
pub const FORBIDDEN_SYSCALL_ENV: &str = "VHOST_APPLIANCE_FORBIDDEN_SYSCALL_AFTER_MS";

/// Called by the sandbox once entered: starts the [`FORBIDDEN_SYSCALL_ENV`] thread.
pub fn after_sandbox() {
    let Some(ms) = std::env::var(FORBIDDEN_SYSCALL_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    tracing::warn!("{FORBIDDEN_SYSCALL_ENV}: personality(2) in {ms} ms");
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(ms));
        // SAFETY: personality(0xffffffff) only reads the execution domain.
        let persona = unsafe { libc::personality(0xffff_ffff) };
        tracing::warn!(persona, "personality(2) was allowed: no seccomp filter");
    });
}

/// `disk` behind a fault-injecting engine with the rules of [`ENV`]; unchanged if it is
/// unset.
pub fn wrap(disk: Arc<dyn Disk>) -> anyhow::Result<Arc<dyn Disk>> {
    let Ok(rules) = std::env::var(ENV) else {
        return Ok(disk);
    };
    let (faulty, control) = FaultDisk::new(disk);
    for rule in rules.split(',').filter(|r| !r.trim().is_empty()) {
        let (select, fault, times) =
            parse(rule.trim()).with_context(|| format!("{ENV}: {rule}"))?;
        control.inject(select, fault, times);
    }
    tracing::warn!(rules, "fault injection is on");
    Ok(Arc::new(faulty))
}

fn parse(rule: &str) -> anyhow::Result<(OpMatch, Fault, Option<usize>)> {
    let (action, rest) = rule.split_once(':').ok_or_else(|| anyhow!("no ':'"))?;
    let fault = match action.split_once('=') {
        None if action == "hold" => Fault::Hold,
        Some(("fail", errno)) => Fault::Fail(errno.parse()?),
        Some(("delay", ms)) => Fault::Delay(Duration::from_millis(ms.parse()?)),
        _ => bail!("unknown action {action}"),
    };
    let (rest, times) = match rest.split_once('*') {
        Some((rest, times)) => (rest, Some(times.parse()?)),
        None => (rest, None),
    };
    let (kind, offset) = match rest.split_once('@') {
        Some((kind, offset)) => (kind, Some(offset.parse()?)),
        None => (rest, None),
    };
    let kind = match kind {
        "read" => OpKind::Read,
        "write" => OpKind::Write,
        "flush" => OpKind::Flush,
        "discard" => OpKind::Discard,
        "write-zeroes" => OpKind::WriteZeroes,
        other => bail!("unknown operation {other}"),
    };
    let select = OpMatch {
        kind: Some(kind),
        offset,
    };
    Ok((select, fault, times))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn rules_parse() {
        let (select, fault, times) = parse("hold:write@4096*1").unwrap();
        assert_eq!(select, OpMatch::at(OpKind::Write, 4096));
        assert_eq!((fault, times), (Fault::Hold, Some(1)));
        let (select, fault, times) = parse("fail=5:flush").unwrap();
        assert_eq!(select, OpMatch::kind(OpKind::Flush));
        assert_eq!((fault, times), (Fault::Fail(5), None));
        assert!(parse("hold:scribble").is_err());
        assert!(parse("explode:write").is_err());
    }
}

//! Records the commit the daemon is built from (`vhost_appliance_build_info{commit}`):
//! `VHOST_APPLIANCE_COMMIT` if set, else `git rev-parse --short=12 HEAD`, else `unknown`
//! (a build outside a git checkout).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo::rerun-if-env-changed=VHOST_APPLIANCE_COMMIT");
    let commit = std::env::var("VHOST_APPLIANCE_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            // Rebuild when HEAD moves: HEAD itself, the branch it points to, packed refs.
            // Only existing files: cargo would rerun for a missing one on every build.
            for path in [
                git(&["rev-parse", "--git-path", "HEAD"]),
                git(&["symbolic-ref", "-q", "HEAD"])
                    .and_then(|r| git(&["rev-parse", "--git-path", &r])),
                git(&["rev-parse", "--git-path", "packed-refs"]),
            ]
            .into_iter()
            .flatten()
            .filter(|p| std::path::Path::new(p).exists())
            {
                println!("cargo::rerun-if-changed={path}");
            }
            git(&["rev-parse", "--short=12", "HEAD"])
        })
        .filter(|c| {
            c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        })
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo::rustc-env=VHOST_APPLIANCE_COMMIT={commit}");
}

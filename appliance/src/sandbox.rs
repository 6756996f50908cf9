//! The daemon's sandbox, entered once after the configuration is read and before anything
//! serves, in virtiofsd's order: switch to the `run_as:` user and group; when still root,
//! drop every capability the I/O and control paths do not use (also from the bounding set);
//! then set no-new-privileges and a seccomp filter ([`syscalls`]) that allows only the
//! syscalls those paths make, on every thread of the process, present and future.
//!
//! A syscall outside the list is a bug or an attack. With `--seccomp kill` (the default) the
//! daemon writes the syscall's number to stderr and dies by SIGSYS (systemd restarts it; the
//! inflight regions let consumers carry on). `--seccomp log` lets the call through and has
//! the kernel log it (`dmesg`, audit type 1326), to find what a new environment needs;
//! `--seccomp off` installs no filter.

mod syscalls;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{Gid, Group, Uid, User};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// What the seccomp filter does with a syscall outside its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Log the syscall number to stderr and kill the daemon with SIGSYS.
    Kill,
    /// Allow the syscall; the kernel logs it (audit type 1326, in `dmesg`).
    Log,
    /// No filter.
    Off,
}

/// The capabilities a root daemon keeps. Sockets get the configured owner, group and mode
/// (`CHOWN`, `FOWNER`); backing files and devices of other owners are opened and created
/// as root opens them (`DAC_OVERRIDE`, `DAC_READ_SEARCH`); VFIO DMA mappings in the
/// appliance VM pin guest memory (`IPC_LOCK`). Everything else (SYS_ADMIN, SETUID, KILL,
/// NET_ADMIN, SYS_PTRACE, SYS_MODULE, ...) is dropped for good.
const KEPT_CAPABILITIES: [Capability; 5] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_FOWNER,
    Capability::CAP_IPC_LOCK,
];

/// Enters the sandbox: `run_as` (from the config) first, then capabilities, then seccomp.
/// `state_dir`, created before, is given to the `run_as` user so it can write its state.
/// Errors name what could not be done; the daemon must not serve half-sandboxed.
pub fn enter(
    run_as: Option<&config::RunAs>,
    state_dir: Option<&Path>,
    seccomp: SeccompMode,
) -> anyhow::Result<()> {
    match run_as {
        Some(run_as) => switch_user(run_as, state_dir)?,
        None if Uid::effective().is_root() => drop_capabilities()?,
        None => {}
    }
    install_seccomp(seccomp)?;
    #[cfg(feature = "fault-injection")]
    crate::faults::after_sandbox();
    Ok(())
}

/// setgroups, setgid, setuid to `run_as` (all of real, effective and saved ids); the
/// capabilities go with root.
fn switch_user(run_as: &config::RunAs, state_dir: Option<&Path>) -> anyhow::Result<()> {
    let user = match run_as.user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(&run_as.user),
    }
    .with_context(|| format!("run_as.user: cannot look up {:?}", run_as.user))?
    .with_context(|| format!("run_as.user: no user {:?}", run_as.user))?;
    let gid = match &run_as.group {
        None => user.gid,
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => Gid::from_raw(gid),
            Err(_) => {
                Group::from_name(group)
                    .with_context(|| format!("run_as.group: cannot look up {group:?}"))?
                    .with_context(|| format!("run_as.group: no group {group:?}"))?
                    .gid
            }
        },
    };
    if !Uid::effective().is_root() {
        if Uid::effective() == user.uid {
            return Ok(());
        }
        bail!(
            "run_as.user: switching to {:?} needs the daemon started as root (it runs as uid {})",
            run_as.user,
            Uid::effective()
        );
    }
    if let Some(dir) = state_dir {
        nix::unistd::chown(dir, Some(user.uid), Some(gid)).with_context(|| {
            format!(
                "cannot give the state directory {} to {:?}",
                dir.display(),
                run_as.user
            )
        })?;
    }
    nix::unistd::setgroups(&[gid]).context("run_as: setgroups")?;
    nix::unistd::setresgid(gid, gid, gid).context("run_as: setresgid")?;
    nix::unistd::setresuid(user.uid, user.uid, user.uid).context("run_as: setresuid")?;
    tracing::info!(user = run_as.user, uid = %user.uid, gid = %gid, "running as");
    Ok(())
}

/// Keeps only [`KEPT_CAPABILITIES`] (those of them the daemon has) in its effective and
/// permitted sets, and clears the inheritable and ambient ones. The bounding set is cut to
/// the same where the daemon may (CAP_SETPCAP); under systemd's CapabilityBoundingSet= it
/// is the unit's, and exec is refused by the seccomp filter anyway.
fn drop_capabilities() -> anyhow::Result<()> {
    let permitted = caps::read(None, CapSet::Permitted).context("cannot read the capabilities")?;
    let kept: CapsHashSet = KEPT_CAPABILITIES
        .into_iter()
        .filter(|c| permitted.contains(c))
        .collect();
    if permitted.contains(&Capability::CAP_SETPCAP) {
        for cap in caps::all() {
            if !kept.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
                caps::drop(None, CapSet::Bounding, cap)
                    .with_context(|| format!("cannot drop {cap} from the bounding set"))?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).context("cannot clear the ambient capabilities")?;
    caps::clear(None, CapSet::Inheritable).context("cannot clear the inheritable capabilities")?;
    caps::set(None, CapSet::Effective, &kept).context("cannot set the effective capabilities")?;
    caps::set(None, CapSet::Permitted, &kept).context("cannot set the permitted capabilities")?;
    let mut names: Vec<String> = kept.iter().map(ToString::to_string).collect();
    names.sort();
    tracing::info!(kept = names.join(","), "capabilities dropped");
    Ok(())
}

/// Compiles [`syscalls::ALLOWED`] for this architecture and applies it to every thread.
fn install_seccomp(mode: SeccompMode) -> anyhow::Result<()> {
    let mismatch = match mode {
        SeccompMode::Off => {
            tracing::warn!("seccomp filter off (--seccomp off)");
            return Ok(());
        }
        SeccompMode::Kill => {
            install_sigsys_handler()?;
            SeccompAction::Trap
        }
        SeccompMode::Log => SeccompAction::Log,
    };
    let rules = syscalls::ALLOWED
        .iter()
        .map(|&nr| (nr, Vec::new()))
        .collect::<BTreeMap<_, _>>();
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| anyhow::anyhow!("seccomp: {e:?}"))?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .context("seccomp: cannot build the filter")?;
    let program: BpfProgram = filter
        .try_into()
        .context("seccomp: cannot compile the filter")?;
    // TSYNC: threads that exist already (none should) get it too; new ones inherit it.
    seccompiler::apply_filter_all_threads(&program)
        .context("seccomp: cannot install the filter")?;
    tracing::info!(
        mode = ?mode,
        syscalls = syscalls::ALLOWED.len(),
        "seccomp filter installed"
    );
    Ok(())
}

/// `siginfo_t` of a SIGSYS from seccomp on a 64-bit Linux (`struct { int si_signo, si_errno,
/// si_code; void *_call_addr; int _syscall; unsigned _arch; }`, glibc's `_sigsys` member).
#[cfg(target_pointer_width = "64")]
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// Writes "forbidden syscall N" to stderr and re-raises SIGSYS with its default action
/// (terminate with a core). Only async-signal-safe calls, all in the allowed list.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers; for SIGSYS from
    // seccomp its union holds the `_sigsys` member laid out as SigsysInfo.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let mut msg = [0u8; 128];
    let mut len = append(&mut msg, 0, b"vhost-appliance: seccomp: forbidden syscall ");
    let mut digits = [0u8; 12];
    let mut first = digits.len();
    let mut n = nr.unsigned_abs();
    loop {
        first -= 1;
        digits[first] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || first == 0 {
            break;
        }
    }
    len = append(&mut msg, len, &digits[first..]);
    len = append(
        &mut msg,
        len,
        b" (`--seccomp log` allows and logs it): killed\n",
    );
    // SAFETY: write(2), signal(2), sigprocmask(2) and raise(3) are async-signal-safe; the
    // buffer outlives the call.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), len);
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::raise(libc::SIGSYS);
    }
}

/// Copies `bytes` into `buf` at `at` (as much as fits); returns the new length.
fn append(buf: &mut [u8], at: usize, bytes: &[u8]) -> usize {
    let n = bytes.len().min(buf.len().saturating_sub(at));
    buf[at..at + n].copy_from_slice(&bytes[..n]);
    at + n
}

/// Installs [`on_sigsys`] (SA_NODEFER, so the re-raised SIGSYS is delivered at once).
fn install_sigsys_handler() -> anyhow::Result<()> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value to fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
    // SAFETY: `action` is fully initialised and the handler is async-signal-safe.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if rc != 0 {
        bail!(
            "cannot install the SIGSYS handler: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_and_names_no_syscall_twice() {
        let mut seen = std::collections::BTreeSet::new();
        for nr in syscalls::ALLOWED {
            assert!(seen.insert(*nr), "syscall {nr} listed twice");
        }
        let rules = syscalls::ALLOWED
            .iter()
            .map(|&nr| (nr, Vec::new()))
            .collect::<BTreeMap<_, _>>();
        let arch = TargetArch::try_from(std::env::consts::ARCH).unwrap();
        let filter =
            SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch).unwrap();
        let program: BpfProgram = filter.try_into().unwrap();
        assert!(program.len() > syscalls::ALLOWED.len());
    }

    #[test]
    fn forbidden_syscalls_of_an_attacker_are_not_allowed() {
        for nr in [
            libc::SYS_execve,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_setuid,
            libc::SYS_init_module,
            libc::SYS_kexec_load,
            libc::SYS_process_vm_writev,
            libc::SYS_bpf,
            libc::SYS_unshare,
        ] {
            assert!(!syscalls::ALLOWED.contains(&nr), "syscall {nr} allowed");
        }
    }
}

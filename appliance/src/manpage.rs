//! The man pages (section 8) of the Debian package, generated from the clap definition of
//! the command line by `clap_mangen`, so they list exactly the options `--help` does.
//!
//! `vhost-appliance generate-man DIR` (hidden from `--help`) writes `vhost-appliance.8`
//! and one page per subcommand (`vhost-appliance-check-config.8`, which the main page's
//! SUBCOMMANDS section names). The main page gets the sections clap cannot know: FILES,
//! SIGNALS, EXIT STATUS and SEE ALSO.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

/// Manual section: system administration commands (daemons).
const SECTION: &str = "8";

/// The main page's hand-written sections (roff), after the generated ones.
const EXTRA_SECTIONS: &str = r#".SH FILES
.TP
\fI/etc/vhost\-appliance/exports.yaml\fR
The exports the packaged service serves (\fBvhost\-appliance.service\fR). Edits apply live:
the daemon watches the file's directory and takes SIGHUP (\fBsystemctl reload vhost\-appliance\fR).
.TP
\fI/run/vhost\-appliance/\fR
The export sockets of the example configuration (created by systemd\-tmpfiles and the unit).
.TP
\fI/var/lib/vhost\-appliance/\fR
The default \fBstate_dir\fR, where \fBcreate:\fR makes new backing files.
.TP
\fI/usr/share/vhost\-appliance/grafana/dashboard.json\fR
A Grafana dashboard for the Prometheus metrics served on \fBmetrics.listen\fR.
.SH SIGNALS
.TP
\fBSIGHUP\fR
Reload the configuration file (validated first; a file that does not validate changes nothing).
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Complete every accepted request, disconnect the frontends, sync the backing stores, remove
the sockets and exit 0.
.SH EXIT STATUS
0 after SIGTERM or SIGINT, or when \fBcheck\-config\fR finds the file valid; 1 when the
configuration cannot be served or is invalid.
.SH NOTES
The daemon never forks into the background and logs to standard error. When started with
\fBNOTIFY_SOCKET\fR set (systemd \fBType=notify\fR) it sends \fBREADY=1\fR once the exports of the
configuration are started and listening.
.SH SEE ALSO
\fBsystemctl\fR(1), \fBqemu\-system\-x86_64\fR(1), \fBvirsh\fR(1)
"#;

/// Writes the man pages of `cmd` and its visible subcommands into `dir`.
pub fn generate(cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let source = format!("vhost-appliance {}", env!("CARGO_PKG_VERSION"));
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        // The page of `vhost-appliance check-config` is named as clap_mangen's SUBCOMMANDS
        // section refers to it: vhost-appliance-check-config(8).
        let name = format!("{}-{}", cmd.get_name(), sub.get_name());
        let sub = sub.clone().display_name(name);
        let man = clap_mangen::Man::new(sub)
            .section(SECTION)
            .source(source.as_str());
        write_page(dir, &man, "")?;
    }
    let man = clap_mangen::Man::new(cmd)
        .section(SECTION)
        .source(source.as_str());
    write_page(dir, &man, EXTRA_SECTIONS)
}

fn write_page(dir: &Path, man: &clap_mangen::Man, extra: &str) -> anyhow::Result<()> {
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page)
        .with_context(|| format!("cannot render {}", path.display()))?;
    page.extend_from_slice(extra.as_bytes());
    let mut file = std::fs::File::create(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(&page)
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("{}", path.display());
    Ok(())
}

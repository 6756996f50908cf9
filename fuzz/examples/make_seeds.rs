//! Writes the seed corpora: `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds
//! -- fuzz/corpus` (each target's seeds into `<dir>/<target>/`, replacing files of the same
//! name and leaving others alone).

use std::path::PathBuf;

/// A target's name and the function making its seeds (file name and bytes).
type Target = (&'static str, fn() -> Vec<(String, Vec<u8>)>);

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".into()));
    let targets: [Target; 7] = [
        ("blk_request", appliance_fuzz::blk::seeds),
        ("scsi_cdb", appliance_fuzz::scsi::cdb_seeds),
        ("scsi_tmf_an", appliance_fuzz::scsi::tmf_seeds),
        ("exports_yaml", appliance_fuzz::yaml::seeds),
        ("qcow2_open", appliance_fuzz::qcow2::seeds),
        ("vhost_user_backend", appliance_fuzz::vhost_user::seeds),
        ("vvu_bridge", appliance_fuzz::vvu::seeds),
    ];
    for (target, seeds) in targets {
        let out = dir.join(target);
        std::fs::create_dir_all(&out)?;
        let seeds = seeds();
        for (name, bytes) in &seeds {
            std::fs::write(out.join(name), bytes)?;
        }
        println!("{target}: {} seeds", seeds.len());
    }
    Ok(())
}

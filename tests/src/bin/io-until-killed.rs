//! A frontend process for tests that kill frontends mid-I/O: connects to an export, keeps
//! writes in flight on every queue, prints `running` once the first ones completed, and
//! goes on until it is killed.
//!
//!     io-until-killed blk SOCKET QUEUES     (libblkio's virtio-blk-vhost-user driver)
//!     io-until-killed scsi SOCKET QUEUES    (the raw frontend, WRITE(10) to LUN 0)

// A test helper program: failures abort with their message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::PathBuf;

use appliance_tests::blkio_frontend::Frontend;
use appliance_tests::scsi_frontend::{ScsiFrontend, REQUEST_QUEUE};
use blkio::ReqFlags;

fn running() {
    let mut out = std::io::stdout();
    writeln!(out, "running").expect("stdout");
    out.flush().expect("stdout");
}

fn blk(socket: PathBuf, queues: usize) -> ! {
    let mut fe = Frontend::connect(&socket, queues as i32);
    const LEN: usize = 64 << 10;
    let mut first = true;
    loop {
        for q in 0..queues {
            for slot in 0..4 {
                let ptr = fe.ptr((q * 4 + slot) * LEN);
                let offset = ((q * 4 + slot) * LEN) as u64;
                fe.queues[q].write(offset, ptr, LEN, slot, ReqFlags::empty());
            }
        }
        for q in 0..queues {
            for (_, ret) in fe.wait(q, 4) {
                assert_eq!(ret, 0, "write failed");
            }
        }
        if first {
            running();
            first = false;
        }
    }
}

fn scsi(socket: PathBuf, queues: usize) -> ! {
    let mut fe = ScsiFrontend::connect(&socket, queues);
    fe.clear_ua(0);
    let data = vec![0x5au8; 64 << 10];
    let mut first = true;
    loop {
        // One WRITE(10) of 128 blocks in flight on each request queue (they share the
        // request header and data buffers: only the daemon reads them).
        for q in 0..queues {
            let cdb = [0x2a, 0, 0, 0, 0, q as u8, 0, 0, 128, 0];
            fe.submit_raw(
                REQUEST_QUEUE + q,
                ScsiFrontend::lun_field(0),
                &cdb,
                &data,
                0,
            );
        }
        for q in 0..queues {
            fe.fe
                .wait_used_on(REQUEST_QUEUE + q, std::time::Duration::from_secs(10));
        }
        if first {
            running();
            first = false;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, kind, socket, queues] = args.as_slice() else {
        panic!("usage: io-until-killed blk|scsi SOCKET QUEUES");
    };
    let socket = PathBuf::from(socket);
    let queues: usize = queues.parse().expect("QUEUES is a number");
    match kind.as_str() {
        "blk" => blk(socket, queues),
        "scsi" => scsi(socket, queues),
        other => panic!("unknown kind {other}"),
    }
}

//! Throughput of sealing and verifying a large image set (hashing on every core). Ignored by
//! default; run with
//! `cargo test --release -p mig-migrate --test imageset_speed -- --ignored --nocapture`.

use mig_migrate::imageset::{seal, verify, SealInfo};
use mig_runtime::spec::{ContainerSpec, ImageRef, Limits, ProcessSpec};
use std::time::Instant;

#[test]
#[ignore = "measurement"]
fn seal_and_verify_512_mib() {
    let dir = tempfile::tempdir().unwrap();
    let chunk: Vec<u8> = (0..(64u32 << 20)).map(|i| (i % 251) as u8).collect();
    for i in 0..8 {
        std::fs::write(dir.path().join(format!("pages-{i}.img")), &chunk).unwrap();
    }
    let spec = ContainerSpec {
        id: "0123456789abcdef0123456789abcdef".into(),
        name: "speed".into(),
        image: ImageRef {
            name: "busybox".into(),
            id: format!("sha256:{}", "a".repeat(64)),
            layers: vec![],
        },
        process: ProcessSpec {
            args: vec!["sh".into()],
            env: vec![],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
        },
        hostname: "speed".into(),
        limits: Limits::default(),
        userns: None,
        net: None,
    };
    let t = Instant::now();
    seal(
        dir.path(),
        SealInfo {
            spec,
            criu_version: "4.1.1".into(),
            pid_map: vec![],
            stdio_pipe: None,
            stats: None,
        },
    )
    .unwrap();
    let s = t.elapsed();
    let t = Instant::now();
    verify(dir.path()).unwrap();
    let v = t.elapsed();
    let mib = 512.0;
    eprintln!(
        "seal {:.0} ms ({:.0} MiB/s), verify {:.0} ms ({:.0} MiB/s)",
        s.as_secs_f64() * 1e3,
        mib / s.as_secs_f64(),
        v.as_secs_f64() * 1e3,
        mib / v.as_secs_f64()
    );
}

//! Root tests of the overlay rootfs: layer order, many long layer paths, unmount semantics.

use mig_runtime::container::{mount_rootfs, unmount_rootfs};
use std::fs;
use std::path::PathBuf;

/// Unmounts on drop (before the temp dir goes).
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = unmount_rootfs(&self.0);
    }
}

fn tempdir(test: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("mig-{test}-{}-", std::process::id()))
        .tempdir()
        .unwrap()
}

#[test]
fn container_rootfs_layers_bottom_first() {
    let dir = tempdir("rootfs_order");
    let layers: Vec<PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("layer{i}")))
        .collect();
    for (i, l) in layers.iter().enumerate() {
        fs::create_dir_all(l).unwrap();
        fs::write(l.join("f"), format!("{i}")).unwrap();
    }
    fs::write(layers[0].join("bottom-only"), "b").unwrap();
    let target = dir.path().join("merged");
    // upper, work and target do not exist yet: mount_rootfs creates them.
    mount_rootfs(
        &layers,
        &dir.path().join("upper"),
        &dir.path().join("work"),
        &target,
    )
    .unwrap();
    let m = Mounted(target.clone());
    assert_eq!(
        fs::read_to_string(target.join("f")).unwrap(),
        "2",
        "the last layer is on top"
    );
    assert_eq!(fs::read_to_string(target.join("bottom-only")).unwrap(), "b");
    fs::write(target.join("new"), "n").unwrap();
    assert_eq!(
        fs::read_to_string(dir.path().join("upper/new")).unwrap(),
        "n"
    );
    let opts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = opts
        .lines()
        .find(|l| l.contains(target.to_str().unwrap()))
        .unwrap()
        .to_owned();
    // index=off is the default here and not shown; it must not be on.
    assert!(!line.contains("index=on"), "{line}");
    drop(m);
    assert!(!fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(target.to_str().unwrap()));
    // Not mounted any more: still fine.
    unmount_rootfs(&target).unwrap();
    unmount_rootfs(&dir.path().join("never-existed")).unwrap();
}

#[test]
fn container_rootfs_many_long_layer_paths() {
    let dir = tempdir("rootfs_long");
    let long = "l".repeat(120);
    // 60 layers of ~200-byte paths: far more than a page of lowerdir= options.
    let layers: Vec<PathBuf> = (0..60)
        .map(|i| dir.path().join(format!("{long}-{i:03}")))
        .collect();
    for (i, l) in layers.iter().enumerate() {
        fs::create_dir_all(l).unwrap();
        fs::write(l.join(format!("from-{i}")), "x").unwrap();
    }
    let total: usize = layers.iter().map(|l| l.as_os_str().len() + 1).sum();
    assert!(total > 4096);
    let target = dir.path().join("merged");
    mount_rootfs(
        &layers,
        &dir.path().join("upper"),
        &dir.path().join("work"),
        &target,
    )
    .unwrap();
    let _m = Mounted(target.clone());
    assert_eq!(fs::read_dir(&target).unwrap().count(), 60);
}

#[test]
fn container_rootfs_refuses_no_layers() {
    let dir = tempdir("rootfs_none");
    let err = mount_rootfs(
        &[],
        &dir.path().join("u"),
        &dir.path().join("w"),
        &dir.path().join("m"),
    );
    assert!(err.is_err());
}

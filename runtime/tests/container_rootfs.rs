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

/// The mount points under `dir` (from our mountinfo).
fn mounts_under(dir: &std::path::Path) -> Vec<String> {
    let prefix = dir.to_str().unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// A user-namespace container's rootfs: the layers' root-owned files show as the container's
/// mapped root (and their copies up and the directories they get are written so), the layer
/// files themselves keep their owners, and the overlay is the only mount made.
#[test]
fn container_rootfs_idmapped_layers_show_the_mapped_owners() {
    use mig_runtime::container::userns::{self, LayerIds};
    use std::os::unix::fs::MetadataExt;
    let dir = tempdir("rootfs_idmap");
    let map = userns::slot(5);
    let (bottom, top) = (dir.path().join("bottom"), dir.path().join("top"));
    fs::create_dir_all(bottom.join("etc")).unwrap();
    fs::create_dir_all(top.join("var/lib")).unwrap();
    fs::write(bottom.join("etc/passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
    // An id inside the container's range on disk (a layer's `www-data`, 33) maps to HOST + 33.
    fs::write(top.join("var/lib/www"), "w").unwrap();
    std::os::unix::fs::chown(top.join("var/lib/www"), Some(33), Some(33)).unwrap();
    let target = dir.path().join("rootfs");
    let upper = dir.path().join("upper");
    let ids = userns::mount_rootfs(
        &[bottom.clone(), top.clone()],
        &upper,
        &dir.path().join("work"),
        &target,
        &map,
    )
    .unwrap();
    let m = Mounted(target.clone());
    assert_eq!(
        ids,
        LayerIds::Idmapped,
        "this kernel (6.18) takes descriptors"
    );
    let owner = |p: &std::path::Path| {
        let m = fs::symlink_metadata(p).unwrap();
        (m.uid(), m.gid())
    };
    let root = (map.host_id, map.host_id);
    assert_eq!(owner(&target.join("etc")), root);
    assert_eq!(owner(&target.join("etc/passwd")), root);
    assert_eq!(
        owner(&target.join("var/lib/www")),
        (map.host_id + 33, map.host_id + 33)
    );
    // Copy up: the copies in the writable layer belong to the mapped ids on the host.
    fs::write(
        target.join("etc/passwd"),
        "root:x:0:0::/:/bin/sh\napp:x:1:1::/:/bin/sh\n",
    )
    .unwrap();
    fs::create_dir(target.join("var/lib/x")).unwrap();
    assert_eq!(owner(&upper.join("etc")), root);
    assert_eq!(owner(&upper.join("etc/passwd")), root);
    assert_eq!(owner(&upper.join("var")), root);
    assert_eq!(owner(&upper.join("var/lib")), root);
    // The shared layers are untouched.
    assert_eq!(owner(&bottom.join("etc/passwd")), (0, 0));
    assert_eq!(
        fs::read_to_string(bottom.join("etc/passwd"))
            .unwrap()
            .lines()
            .count(),
        1
    );
    // Only the overlay: no idmapped mount and no staging directory is left on the host.
    assert_eq!(mounts_under(dir.path()), [target.to_str().unwrap()]);
    assert!(!dir.path().join("rootfs.layers").exists());
    drop(m);
    assert!(mounts_under(dir.path()).is_empty());
    // Mounted again (a restart, a restore): the same view.
    userns::mount_rootfs(
        &[bottom, top],
        &upper,
        &dir.path().join("work"),
        &target,
        &map,
    )
    .unwrap();
    let _m = Mounted(target.clone());
    assert_eq!(owner(&target.join("etc/passwd")), root);
    assert_eq!(mounts_under(dir.path()), [target.to_str().unwrap()]);
}

/// Mounts a crash left under the staging directory (stacked, even) are detached by the next
/// mount and by `unmount_rootfs`.
#[test]
fn container_rootfs_staging_leftovers_are_cleared() {
    use mig_runtime::container::userns;
    let dir = tempdir("rootfs_stage");
    let layer = dir.path().join("layer");
    fs::create_dir_all(layer.join("etc")).unwrap();
    let target = dir.path().join("rootfs");
    let staged = dir.path().join("rootfs.layers/0");
    let leave = || {
        fs::create_dir_all(&staged).unwrap();
        for _ in 0..2 {
            let o = std::process::Command::new("mount")
                .args(["--bind"])
                .arg(&layer)
                .arg(&staged)
                .status()
                .unwrap();
            assert!(o.success());
        }
    };
    // Unmounts the rootfs and clears the staging directory whatever happens.
    let _guard = Mounted(target.clone());
    leave();
    let map = userns::slot(6);
    let (upper, work) = (dir.path().join("upper"), dir.path().join("work"));
    userns::mount_rootfs(std::slice::from_ref(&layer), &upper, &work, &target, &map).unwrap();
    assert_eq!(mounts_under(dir.path()), [target.to_str().unwrap()]);
    assert!(!dir.path().join("rootfs.layers").exists());
    leave();
    unmount_rootfs(&target).unwrap();
    assert!(mounts_under(dir.path()).is_empty());
    assert!(!dir.path().join("rootfs.layers").exists());
}

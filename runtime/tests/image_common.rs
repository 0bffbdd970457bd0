//! Helpers shared by the image tests: test rootfs trees, a raw tar writer able to write the
//! hostile entries the tar crate refuses to build, and checks on the store's directories.
#![allow(dead_code)]

use mig_runtime::image::ImageStore;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Builds a small busybox rootfs in `dir`: bin/busybox, bin/sh -> /bin/busybox (absolute),
/// bin/ls -> busybox (relative), etc/hostname, and a hardlink.
pub fn busybox_rootfs(dir: &Path) {
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("/bin/busybox", dir.join("bin/sh")).unwrap();
    std::os::unix::fs::symlink("busybox", dir.join("bin/ls")).unwrap();
    fs::write(dir.join("etc/hostname"), "box\n").unwrap();
    fs::hard_link(dir.join("etc/hostname"), dir.join("etc/hostname.bak")).unwrap();
}

/// A tar stream written entry by entry, with raw names.
#[derive(Default)]
pub struct RawTar {
    pub out: Vec<u8>,
}

impl RawTar {
    fn push_header(&mut self, name: &[u8], kind: u8, size: u64, link: &[u8], dev: (u32, u32)) {
        if name.len() > 99 {
            self.push_header(b"././@LongLink", b'L', name.len() as u64 + 1, b"", (0, 0));
            self.push_data(&[name, b"\0"].concat());
        }
        if link.len() > 99 {
            self.push_header(b"././@LongLink", b'K', link.len() as u64 + 1, b"", (0, 0));
            self.push_data(&[link, b"\0"].concat());
        }
        let mut h = tar::Header::new_gnu();
        {
            let g = h.as_gnu_mut().unwrap();
            let n = name.len().min(99);
            g.name[..n].copy_from_slice(&name[..n]);
            let l = link.len().min(99);
            g.linkname[..l].copy_from_slice(&link[..l]);
        }
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(size);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_device_major(dev.0).unwrap();
        h.set_device_minor(dev.1).unwrap();
        h.set_cksum();
        self.out.extend_from_slice(h.as_bytes());
    }

    fn push_data(&mut self, data: &[u8]) {
        self.out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.out.resize(self.out.len() + pad, 0);
    }

    pub fn file(mut self, name: &[u8], data: &[u8]) -> Self {
        self.push_header(name, b'0', data.len() as u64, b"", (0, 0));
        self.push_data(data);
        self
    }
    /// An entry of any type byte with `data`.
    pub fn raw(mut self, name: &[u8], kind: u8, data: &[u8]) -> Self {
        self.push_header(name, kind, data.len() as u64, b"", (0, 0));
        self.push_data(data);
        self
    }
    /// A file header that claims `size` bytes, followed by no data.
    pub fn file_header_only(mut self, name: &[u8], size: u64) -> Self {
        self.push_header(name, b'0', size, b"", (0, 0));
        self
    }
    pub fn dir(mut self, name: &[u8]) -> Self {
        self.push_header(name, b'5', 0, b"", (0, 0));
        self
    }
    pub fn symlink(mut self, name: &[u8], target: &[u8]) -> Self {
        self.push_header(name, b'2', 0, target, (0, 0));
        self
    }
    pub fn hardlink(mut self, name: &[u8], target: &[u8]) -> Self {
        self.push_header(name, b'1', 0, target, (0, 0));
        self
    }
    pub fn chardev(mut self, name: &[u8], major: u32, minor: u32) -> Self {
        self.push_header(name, b'3', 0, b"", (major, minor));
        self
    }
    pub fn blockdev(mut self, name: &[u8], major: u32, minor: u32) -> Self {
        self.push_header(name, b'4', 0, b"", (major, minor));
        self
    }
    pub fn fifo(mut self, name: &[u8]) -> Self {
        self.push_header(name, b'6', 0, b"", (0, 0));
        self
    }
    /// A GNU long-name extension header claiming `size` bytes (the data is not written).
    pub fn longname_header(mut self, size: u64) -> Self {
        self.push_header(b"././@LongLink", b'L', size, b"", (0, 0));
        self
    }
    pub fn finish(mut self) -> Vec<u8> {
        self.out.resize(self.out.len() + 1024, 0);
        self.out
    }
}

/// A tar of a directory tree made with the tar crate (symlinks kept as symlinks).
pub fn tar_dir(dir: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// Every file or directory under `dir`, recursively (not `dir` itself).
pub fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd {
            let e = e.unwrap();
            let m = e.path().symlink_metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            }
            out.push(e.path());
        }
    }
    out
}

/// Panics unless the store holds nothing: no blob, layer, record or work file.
pub fn assert_store_empty(store: &ImageStore) {
    let root = store.root();
    for sub in ["blobs/sha256", "layers/sha256", "images", "tmp"] {
        let left = tree(&root.join(sub));
        assert!(left.is_empty(), "{sub} is not empty: {left:?}");
    }
}

/// Writes `data` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, data).unwrap();
    p
}

/// An overlay mount removed (lazily) on drop.
pub struct Overlay {
    pub target: PathBuf,
}

impl Overlay {
    /// Mounts the layer dirs (bottom first) read-only at `target`.
    pub fn mount(lowers: &[PathBuf], target: &Path) -> Overlay {
        let lower: Vec<String> = lowers
            .iter()
            .rev()
            .map(|p| p.display().to_string())
            .collect();
        let opts = format!("lowerdir={}", lower.join(":"));
        nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(opts.as_str()),
        )
        .unwrap();
        Overlay {
            target: target.to_owned(),
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH);
    }
}

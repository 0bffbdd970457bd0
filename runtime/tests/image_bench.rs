//! Timings of the importer on a real tree (run by hand:
//! `cargo test --release -p mig-runtime --test image_bench -- --ignored --nocapture`).

mod image_common;

use image_common::*;
use mig_runtime::image::ImageStore;
use std::path::Path;
use std::time::Instant;

#[test]
#[ignore]
fn image_bench_import_tree() {
    let src = Path::new("/usr/include");
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("images")).unwrap();
    let t = Instant::now();
    let img = store.import(src, "inc").unwrap();
    let dir_ms = t.elapsed().as_millis();
    let blob = store.layer_blob(&img.layers[0]).unwrap();
    let tar_len = std::fs::metadata(&blob).unwrap().len();
    let entries = tree(&store.layer_dir(&img.layers[0])).len();
    let gz = write_file(
        tmp.path(),
        "inc.tar.gz",
        &gzip(&std::fs::read(&blob).unwrap()),
    );
    store.remove("inc").unwrap();
    let t = Instant::now();
    store.import(&gz, "incgz").unwrap();
    let gz_ms = t.elapsed().as_millis();
    let t = Instant::now();
    store.import(&gz, "incgz2").unwrap();
    let again_ms = t.elapsed().as_millis();
    let t = Instant::now();
    store.remove("incgz").unwrap();
    store.remove("incgz2").unwrap();
    let rm_ms = t.elapsed().as_millis();
    eprintln!(
        "tree of {entries} entries, tar {} MiB: dir import {dir_ms} ms, tar.gz import {gz_ms} ms, \
         tar.gz re-import (layer present) {again_ms} ms, remove+gc {rm_ms} ms",
        tar_len >> 20
    );
    assert_store_empty(&store);
}

//! The staged files of an incoming migration put in place: the layers imported (and the image
//! recorded), the writable layer (presync copy plus delta) and the container's log.

use super::{io, DestError};
use crate::migration::source::{LOG_FILE, LOG_TAIL_FILE, UPPER_DELTA_TAR, UPPER_TAR};
use std::path::Path;

/// Imports the layers received into `<staging>/layers` (each verified against its digest and
/// unpacked: seconds for a distribution image) and records the container's image, so that a
/// restore only finds them. Called when the presync's files are in, while the container still
/// runs on the source: done at the restore, a 170 MiB Debian image added 2 s to the downtime of
/// its first move to a host. Recording the image at once keeps its layers referenced (an
/// `image rm` meanwhile would otherwise collect them). An image this migration added is named
/// in `<staging>/IMAGE_ADDED`: a move that rolls back removes it again when no container uses
/// it ([`cleanup_incoming`]), so a failed move (a full disk, say) gives back the space it took.
/// Idempotent: each staged layer is removed once imported.
///
/// [`cleanup_incoming`]: super::cleanup_incoming
pub(super) fn import_layers(
    images: &mig_runtime::image::ImageStore,
    staging: &Path,
    image: &mig_runtime::image::Image,
) -> Result<(), DestError> {
    let layers = staging.join("layers");
    if let Ok(rd) = std::fs::read_dir(&layers) {
        for ent in rd.flatten() {
            let digest = format!("sha256:{}", ent.file_name().to_string_lossy());
            let path = ent.path();
            let mut f = std::fs::File::open(&path).map_err(io(&path))?;
            images
                .import_layer(&digest, &mut f)
                .map_err(|source| DestError::Layer { digest, source })?;
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    if images.get(&image.id).is_err() {
        let added = staging.join(IMAGE_ADDED);
        std::fs::write(&added, &image.id).map_err(io(&added))?;
        images.add_image(image).map_err(DestError::Image)?;
    }
    Ok(())
}

/// In an incoming migration's staging directory: the id of the image the migration added.
pub(super) const IMAGE_ADDED: &str = "IMAGE_ADDED";

/// Places the container's log at `log`: the one sent whole while frozen, else the presync copy
/// with what the log gained since appended (a 1.5 source), else none (a container without one).
pub(super) fn place_log(staging: &Path, log: &Path) -> Result<(), DestError> {
    let whole = staging.join("delta").join(LOG_FILE);
    let head = staging.join("presync").join(LOG_FILE);
    let tail = staging.join("delta").join(LOG_TAIL_FILE);
    if whole.is_file() {
        return std::fs::rename(&whole, log).map_err(io(&whole));
    }
    if !tail.is_file() {
        return Ok(());
    }
    if !head.is_file() {
        return Err(DestError::NoLogHead);
    }
    let mut from = std::fs::File::open(&tail).map_err(io(&tail))?;
    let mut to = std::fs::OpenOptions::new()
        .append(true)
        .open(&head)
        .map_err(io(&head))?;
    std::io::copy(&mut from, &mut to).map_err(io(&head))?;
    std::fs::rename(&head, log).map_err(io(&head))
}

/// Unpacks the presync copy of the writable layer into `<staging>/upper` (while the container
/// still runs on the source) and drops its tar.
pub(super) fn unpack_presync(staging: &Path) -> Result<(), DestError> {
    let tar = staging.join("presync").join(UPPER_TAR);
    if !tar.is_file() {
        return Ok(());
    }
    let dir = staging.join("upper");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let f = std::fs::File::open(&tar).map_err(io(&tar))?;
    mig_migrate::archive::unpack_layer_tar(&mut std::io::BufReader::new(f), &dir)
        .map_err(DestError::Upper)?;
    std::fs::remove_file(&tar).map_err(io(&tar))
}

/// Places the writable layer at `upper`: the presync copy (already unpacked) moved in place with
/// the delta applied on top, or the whole layer when the source sent it whole while frozen.
pub(super) fn place_upper(staging: &Path, upper: &Path) -> Result<(), DestError> {
    let full = staging.join("delta").join(UPPER_TAR);
    if full.is_file() {
        std::fs::create_dir_all(upper).map_err(io(upper))?;
        let f = std::fs::File::open(&full).map_err(io(&full))?;
        return mig_migrate::archive::unpack_layer_tar(&mut std::io::BufReader::new(f), upper)
            .map_err(DestError::Upper);
    }
    let presync = staging.join("upper");
    let delta = staging.join("delta").join(UPPER_DELTA_TAR);
    if !presync.is_dir() || !delta.is_file() {
        return Err(DestError::NoUpper);
    }
    if let Some(parent) = upper.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    std::fs::rename(&presync, upper).map_err(io(&presync))?;
    let f = std::fs::File::open(&delta).map_err(io(&delta))?;
    let stats = mig_migrate::archive::apply_layer_delta(&mut std::io::BufReader::new(f), upper)
        .map_err(DestError::Upper)?;
    tracing::debug!(
        changed = stats.changed,
        deleted = stats.deleted,
        "writable-layer delta applied"
    );
    Ok(())
}

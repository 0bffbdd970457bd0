//! Frame codec: `u32` little-endian length, then a postcard payload of exactly that length.

use super::WireError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Encodes `value` as one frame (length prefix included), refusing payloads above `max` bytes.
pub fn encode_frame<T: Serialize>(value: &T, max: u32) -> Result<Vec<u8>, WireError> {
    let what = std::any::type_name::<T>();
    let mut out = vec![0u8; 4];
    out = postcard::to_extend(value, out).map_err(|source| WireError::Encode { what, source })?;
    let len = out.len() - 4;
    if len > max as usize {
        return Err(WireError::FrameTooLarge {
            len: len as u64,
            max,
        });
    }
    // len <= max <= u32::MAX, so the cast is exact.
    out[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// Decodes one frame from the start of `buf`. Returns `Ok(None)` when `buf` does not hold a whole
/// frame yet, else the value and the number of bytes consumed. The length is checked against
/// `max` before the payload is looked at.
pub fn decode_frame<T: DeserializeOwned>(
    buf: &[u8],
    max: u32,
) -> Result<Option<(T, usize)>, WireError> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    if len > max {
        return Err(WireError::FrameTooLarge {
            len: len.into(),
            max,
        });
    }
    let end = 4 + len as usize;
    let Some(payload) = buf.get(4..end) else {
        return Ok(None);
    };
    Ok(Some((decode_payload(payload)?, end)))
}

/// Decodes a whole payload, refusing trailing bytes.
pub(crate) fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, WireError> {
    let what = std::any::type_name::<T>();
    let (value, rest) =
        postcard::take_from_bytes(payload).map_err(|source| WireError::Decode { what, source })?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes {
            what,
            extra: rest.len(),
        });
    }
    Ok(value)
}

/// Reads the raw payload of one frame. `Ok(None)` on a clean end of stream before the first byte.
pub(crate) async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: u32,
) -> Result<Option<Vec<u8>>, WireError> {
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = reader
            .read(&mut head[got..])
            .await
            .map_err(|source| WireError::Read { source })?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(WireError::Truncated { got, want: 4 });
        }
        got += n;
    }
    let len = u32::from_le_bytes(head);
    if len > max {
        return Err(WireError::FrameTooLarge {
            len: len.into(),
            max,
        });
    }
    let mut payload = vec![0u8; len as usize];
    let mut got = 0;
    while got < payload.len() {
        let n = reader
            .read(&mut payload[got..])
            .await
            .map_err(|source| WireError::Read { source })?;
        if n == 0 {
            return Err(WireError::Truncated {
                got,
                want: payload.len(),
            });
        }
        got += n;
    }
    Ok(Some(payload))
}

/// Reads one frame and decodes it. `Ok(None)` on a clean end of stream between frames.
pub async fn read_frame<T: DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut R,
    max: u32,
) -> Result<Option<T>, WireError> {
    match read_payload(reader, max).await? {
        Some(payload) => decode_payload(&payload).map(Some),
        None => Ok(None),
    }
}

/// Encodes `value` and writes it as one frame (one `write_all`, not flushed beyond that).
pub async fn write_frame<T: Serialize, W: AsyncWrite + Unpin>(
    writer: &mut W,
    value: &T,
    max: u32,
) -> Result<(), WireError> {
    let frame = encode_frame(value, max)?;
    writer
        .write_all(&frame)
        .await
        .map_err(|source| WireError::Write { source })?;
    writer
        .flush()
        .await
        .map_err(|source| WireError::Write { source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_partial() {
        let f = encode_frame(&(7u32, String::from("x")), 64).unwrap();
        assert_eq!(decode_frame::<(u32, String)>(&f[..3], 64).unwrap(), None);
        assert_eq!(
            decode_frame::<(u32, String)>(&f[..f.len() - 1], 64).unwrap(),
            None
        );
        let (v, n) = decode_frame::<(u32, String)>(&f, 64).unwrap().unwrap();
        assert_eq!((v, n), ((7, "x".into()), f.len()));
    }

    #[test]
    fn length_checked_before_payload() {
        let mut f = u32::MAX.to_le_bytes().to_vec();
        f.push(0);
        assert!(matches!(
            decode_frame::<u32>(&f, 1024),
            Err(WireError::FrameTooLarge { .. })
        ));
        assert!(matches!(
            encode_frame(&vec![0u8; 100], 10),
            Err(WireError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn trailing_bytes_refused() {
        let mut f = encode_frame(&1u8, 64).unwrap();
        f[0] += 1;
        f.push(9);
        assert!(matches!(
            decode_frame::<u8>(&f, 64),
            Err(WireError::TrailingBytes { extra: 1, .. })
        ));
    }
}

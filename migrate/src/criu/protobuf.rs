//! A minimal reader of CRIU's image files: the little-endian `u32` magics, entries of a `u32`
//! length and a protobuf message, and the fields of such a message. Bounded (every length is
//! checked before use), never panicking, skipping unknown fields; errors are short
//! descriptions the callers wrap in their own error types.

/// Head magic of most images (criu/include/magic.h).
pub(crate) const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// Head magic of service images (stats, inventory).
pub(crate) const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
/// Nesting bound of the decoder.
const MAX_DEPTH: u32 = 4;

/// The little-endian `u32` at `at`.
pub(crate) fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    let b = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The entries of an image whose own magic is `magic` (after an optional head magic): each a
/// `u32` length and that many bytes.
pub(crate) fn entries(data: &[u8], magic: u32) -> Result<Vec<&[u8]>, &'static str> {
    let mut at = match (u32_at(data, 0), u32_at(data, 4)) {
        (Some(IMG_COMMON_MAGIC | IMG_SERVICE_MAGIC), Some(m)) if m == magic => 8,
        (Some(m), _) if m == magic => 4,
        _ => return Err("bad magic"),
    };
    let mut out = Vec::new();
    while at < data.len() {
        let size = u32_at(data, at).ok_or("truncated entry size")? as usize;
        at += 4;
        let end = at.checked_add(size).ok_or("entry size overflows")?;
        out.push(data.get(at..end).ok_or("truncated entry")?);
        at = end;
    }
    Ok(out)
}

/// One protobuf field value (fixed-width values are reported as varints of their bits).
pub(crate) enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

/// Iterator over the fields of one protobuf message.
pub(crate) struct Fields<'a> {
    data: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(data: &'a [u8], depth: u32) -> Fields<'a> {
        Fields {
            data,
            pos: 0,
            failed: depth > MAX_DEPTH,
        }
    }

    fn varint(&mut self) -> Result<u64, &'static str> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = *self.data.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes")
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], &'static str> {
        let n = usize::try_from(n).map_err(|_| "length overflows")?;
        let end = self.pos.checked_add(n).ok_or("length overflows")?;
        let b = self
            .data
            .get(self.pos..end)
            .ok_or("field runs past the end")?;
        self.pos = end;
        Ok(b)
    }

    fn field(&mut self) -> Result<(u64, Value<'a>), &'static str> {
        let key = self.varint()?;
        let num = key >> 3;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                let b = self.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                Value::Varint(u64::from_le_bytes(a))
            }
            2 => {
                let len = self.varint()?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                let b = self.take(4)?;
                let mut a = [0u8; 4];
                a.copy_from_slice(b);
                Value::Varint(u64::from(u32::from_le_bytes(a)))
            }
            _ => return Err("unsupported wire type"),
        };
        Ok((num, value))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            self.failed = false;
            self.pos = self.data.len();
            return Some(Err("nested too deeply"));
        }
        if self.pos >= self.data.len() {
            return None;
        }
        let r = self.field();
        if r.is_err() {
            self.pos = self.data.len();
        }
        Some(r)
    }
}

/// Appends `v` as a protobuf varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends field `num` (wire type 0, varint) with value `v`.
pub(crate) fn put_varint_field(out: &mut Vec<u8>, num: u32, v: u64) {
    put_varint(out, u64::from(num) << 3);
    put_varint(out, v);
}

/// Appends one image entry: the message's length as a little-endian `u32`, then `message`.
/// `None` if the message is longer than a `u32` can say.
pub(crate) fn put_entry(out: &mut Vec<u8>, message: &[u8]) -> Option<()> {
    let len = u32::try_from(message.len()).ok()?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(message);
    Some(())
}

#[cfg(test)]
mod encoder_tests {
    use super::*;

    #[test]
    fn varints_and_entries_read_back() {
        let mut msg = Vec::new();
        put_varint_field(&mut msg, 1, 0x7fff_f000_1000);
        put_varint_field(&mut msg, 2, 0);
        put_varint_field(&mut msg, 5, 300);
        let mut img = Vec::new();
        img.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
        img.extend_from_slice(&0x5608_4025u32.to_le_bytes());
        put_entry(&mut img, &msg).unwrap();
        let entries = entries(&img, 0x5608_4025).unwrap();
        assert_eq!(entries.len(), 1);
        let fields: Vec<(u64, u64)> = Fields::new(entries[0], 0)
            .map(|f| match f.unwrap() {
                (n, Value::Varint(v)) => (n, v),
                (n, Value::Bytes(_)) => panic!("field {n} is bytes"),
            })
            .collect();
        assert_eq!(fields, vec![(1, 0x7fff_f000_1000), (2, 0), (5, 300)]);
        let mut one = Vec::new();
        put_varint(&mut one, 300);
        assert_eq!(one, [0xac, 0x02]);
    }
}

//! The ONNX writer: protobuf messages, a typed graph builder, and the FasterRCNN exporter.

pub mod builder;
pub mod export;
pub mod ops;
pub mod proto;
pub mod quantize;

pub use export::export;

use prost::Message;

/// Serializes a model to protobuf bytes.
pub fn encode(model: &proto::ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Serializes a model straight into `out` through a 1 MiB buffer: the same bytes as
/// [`encode`], without holding a second copy of the weights in memory.
pub fn write_model(model: &proto::ModelProto, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let mut buf = WriteBuf { out, buf: Vec::with_capacity(1 << 20), error: None };
    model.encode(&mut buf).map_err(std::io::Error::other)?;
    buf.flush()
}

/// prost's output buffer ([`bytes::BufMut`]) over an [`std::io::Write`]: encoded bytes
/// collect in `buf` and go to `out` whenever it fills. `BufMut` cannot fail, so the first
/// write error is kept and returned by [`WriteBuf::flush`].
struct WriteBuf<'a> {
    out: &'a mut dyn std::io::Write,
    buf: Vec<u8>,
    error: Option<std::io::Error>,
}

impl WriteBuf<'_> {
    fn drain(&mut self) {
        if self.error.is_none() {
            if let Err(e) = self.out.write_all(&self.buf) {
                self.error = Some(e);
            }
        }
        self.buf.clear();
    }

    fn flush(mut self) -> std::io::Result<()> {
        self.drain();
        match self.error.take() {
            Some(e) => Err(e),
            None => self.out.flush(),
        }
    }
}

// SAFETY: `chunk_mut` hands out the spare capacity of `buf` (never empty: it is drained when
// full), and `advance_mut` only extends `buf`'s length over bytes the caller initialized, as
// the trait's contract requires of the caller.
unsafe impl bytes::BufMut for WriteBuf<'_> {
    fn remaining_mut(&self) -> usize {
        usize::MAX - self.buf.len()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        let len = self.buf.len() + cnt;
        assert!(len <= self.buf.capacity(), "advance_mut past the chunk");
        // SAFETY: the caller initialized `cnt` bytes of the chunk we handed out.
        unsafe { self.buf.set_len(len) };
    }

    fn chunk_mut(&mut self) -> &mut bytes::buf::UninitSlice {
        if self.buf.len() == self.buf.capacity() {
            self.drain();
        }
        bytes::buf::UninitSlice::uninit(self.buf.spare_capacity_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::proto::*;
    use super::*;

    /// A write error in the middle of the stream is returned, not swallowed.
    struct FailAfter(usize);

    impl std::io::Write for FailAfter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.0 < buf.len() {
                return Err(std::io::Error::other("disk full"));
            }
            self.0 -= buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn streaming_writes_the_same_bytes_as_encode() {
        // Initializers larger and smaller than the 1 MiB buffer, at odd sizes.
        let tensor = |name: &str, n: usize| TensorProto {
            dims: vec![n as i64],
            data_type: 1,
            name: name.into(),
            raw_data: bytes::Bytes::from((0..n * 4).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>()),
        };
        let model = ModelProto {
            ir_version: 8,
            producer_name: "mkonnx".into(),
            graph: Some(GraphProto {
                name: "g".into(),
                initializer: vec![tensor("a", 3), tensor("big", 700_001), tensor("c", 17)],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut streamed = Vec::new();
        write_model(&model, &mut streamed).unwrap();
        assert_eq!(streamed, encode(&model));
        let err = write_model(&model, &mut FailAfter(1 << 20)).unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
    }
}

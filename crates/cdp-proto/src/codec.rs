//! The gRPC codec of every `cdp.v1` service: prost, with the cost of a
//! message bounded before it is decoded.
//!
//! Protobuf lets a small request decode into a large value: an empty
//! `Touchpoint` is two bytes on the wire and several hundred in memory, so
//! 4 MB of them became 800 MB. Before decoding, [`Guard`] walks the wire
//! bytes with the message's descriptor (no allocation per element) and
//! estimates what the decoded value will hold; a request whose estimate
//! passes [`AMPLIFICATION`] times its size (plus [`SLACK`]) is refused with
//! `RESOURCE_EXHAUSTED`, naming the field that holds the most elements.
//! A message that is not valid protobuf (a truncated field, a string that
//! is not UTF-8) is `INVALID_ARGUMENT` with prost's reason, not `INTERNAL`.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::OnceLock;

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};

/// How many times its size a message may cost once decoded. Real events
/// cost 2 to 6 times their wire size (a `Struct` of small booleans is the
/// worst honest case, about 9); empty repeated messages cost 100 to 300.
pub const AMPLIFICATION: usize = 12;

/// What any message may cost beyond [`AMPLIFICATION`] times its size.
pub const SLACK: usize = 256 * 1024;

/// The deepest nesting walked (prost stops at 100 as well).
const MAX_DEPTH: usize = 100;

/// prost's codec, with the cost of every decoded message bounded.
#[derive(Debug, Clone)]
pub struct GuardedCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for GuardedCodec<T, U> {
    fn default() -> Self {
        GuardedCodec {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for GuardedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = GuardedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        GuardedDecoder { _type: PhantomData }
    }
}

/// Decodes `U` after [`Guard::check`] accepted its bytes.
#[derive(Debug, Clone)]
pub struct GuardedDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: Message + Default> Decoder for GuardedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        decode_guarded(buf).map(Some)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Checks the bytes of a buffered message, then decodes it.
fn decode_guarded<U: Message + Default>(mut buf: impl bytes::Buf) -> Result<U, Status> {
    let name = message_name::<U>();
    // tonic buffers the whole message before decoding: one chunk. Should
    // it ever not, the bytes are gathered first rather than left unchecked.
    if buf.chunk().len() == buf.remaining() {
        Guard::get().check(name, buf.chunk())?;
    } else {
        let whole = buf.copy_to_bytes(buf.remaining());
        Guard::get().check(name, &whole)?;
        return U::decode(whole).map_err(|error| {
            Status::invalid_argument(format!("the message is not a valid cdp.v1.{name}: {error}"))
        });
    }
    U::decode(&mut buf).map_err(|error| {
        Status::invalid_argument(format!("the message is not a valid cdp.v1.{name}: {error}"))
    })
}

/// The protobuf name of a generated type (`TrackBatchRequest`).
fn message_name<U>() -> &'static str {
    let full = std::any::type_name::<U>();
    full.rsplit("::").next().unwrap_or(full)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A varint or fixed-size number, a bool, an enum.
    Scalar,
    /// A string or bytes: the heap holds its length.
    Bytes,
    /// A nested message (map entries too), by index.
    Message(usize),
}

#[derive(Debug, Clone)]
struct Field {
    name: String,
    kind: Kind,
    repeated: bool,
    /// Fields of one `oneof` share their storage (a Rust enum).
    oneof: Option<i32>,
}

#[derive(Debug, Clone, Default)]
struct Shape {
    fields: HashMap<u32, Field>,
    /// The estimated size of the decoded struct itself.
    size: usize,
}

/// The descriptors of every `cdp.v1` message (and the Google types they
/// use), indexed for the walk.
#[derive(Debug, Default)]
pub struct Guard {
    shapes: Vec<Shape>,
    /// `.cdp.v1.TrackBatchRequest` -> index.
    by_full_name: HashMap<String, usize>,
    /// `TrackBatchRequest` -> index, for `cdp.v1` top-level messages.
    by_name: HashMap<String, usize>,
}

/// Why a message was refused before decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(
        "cdp.v1.{message}: {bytes} bytes would decode into about {estimate} bytes, over the bound of \
         {bound} ({AMPLIFICATION} times the size plus {SLACK}); field {field} holds {elements} \
         elements: send fewer or non-empty ones"
    )]
    Amplified {
        message: String,
        bytes: usize,
        estimate: usize,
        bound: usize,
        field: String,
        elements: usize,
    },
    #[error("cdp.v1.{message}: {reason}")]
    Malformed { message: String, reason: String },
}

impl From<Refused> for Status {
    fn from(r: Refused) -> Status {
        match r {
            Refused::Amplified { .. } => Status::resource_exhausted(r.to_string()),
            Refused::Malformed { .. } => Status::invalid_argument(r.to_string()),
        }
    }
}

struct Walk {
    estimate: usize,
    /// Elements per field path, to name the culprit (the path is built
    /// once per field, not per element).
    elements: HashMap<(usize, u32), (String, usize)>,
}

impl Guard {
    /// The guard of the `cdp.v1` descriptors, built once.
    pub fn get() -> &'static Guard {
        static GUARD: OnceLock<Guard> = OnceLock::new();
        GUARD.get_or_init(|| Guard::from_descriptors(crate::v1::FILE_DESCRIPTOR_SET))
    }

    fn from_descriptors(encoded: &[u8]) -> Guard {
        let Ok(set) = prost_types::FileDescriptorSet::decode(encoded) else {
            tracing::error!("the cdp.v1 descriptors cannot be decoded; messages are not guarded");
            return Guard::default();
        };
        // Every message, nested ones too, by full name.
        let mut all: Vec<(String, &prost_types::DescriptorProto)> = Vec::new();
        fn collect<'a>(
            prefix: &str,
            messages: &'a [prost_types::DescriptorProto],
            out: &mut Vec<(String, &'a prost_types::DescriptorProto)>,
        ) {
            for m in messages {
                let name = format!("{prefix}.{}", m.name());
                collect(&name, &m.nested_type, out);
                out.push((name, m));
            }
        }
        for file in &set.file {
            collect(
                &format!(".{}", file.package()),
                &file.message_type,
                &mut all,
            );
        }
        let mut guard = Guard::default();
        for (i, (name, _)) in all.iter().enumerate() {
            guard.by_full_name.insert(name.clone(), i);
            if let Some(short) = name.strip_prefix(".cdp.v1.")
                && !short.contains('.')
            {
                guard.by_name.insert(short.to_owned(), i);
            }
        }
        guard.shapes = all
            .iter()
            .map(|(_, m)| Shape {
                fields: m
                    .field
                    .iter()
                    .map(|f| {
                        let kind = match f.r#type() {
                            Type::String | Type::Bytes => Kind::Bytes,
                            Type::Message | Type::Group => guard
                                .by_full_name
                                .get(f.type_name())
                                .map_or(Kind::Bytes, |i| Kind::Message(*i)),
                            _ => Kind::Scalar,
                        };
                        let field = Field {
                            name: f.name().to_owned(),
                            kind,
                            repeated: f.label() == Label::Repeated,
                            oneof: f.oneof_index,
                        };
                        (u32::try_from(f.number()).unwrap_or(0), field)
                    })
                    .collect(),
                size: 0,
            })
            .collect();
        for i in 0..guard.shapes.len() {
            let size = guard.struct_size(i, &mut Vec::new());
            guard.shapes[i].size = size;
        }
        guard
    }

    /// The size of a decoded struct: 24 bytes per string, bytes or vector,
    /// 48 per map, 8 per number, singular messages inline (boxed when
    /// recursive).
    fn struct_size(&self, i: usize, path: &mut Vec<usize>) -> usize {
        if path.contains(&i) || path.len() > 16 {
            return 8;
        }
        path.push(i);
        let mut plain = 16;
        let mut oneofs: HashMap<i32, usize> = HashMap::new();
        for f in self.shapes[i].fields.values() {
            let size = match (f.kind, f.repeated) {
                (_, true) => 48,
                (Kind::Scalar, false) => 8,
                (Kind::Bytes, false) => 24,
                (Kind::Message(m), false) => 8 + self.struct_size(m, path),
            };
            match f.oneof {
                Some(o) => {
                    let slot = oneofs.entry(o).or_insert(8);
                    *slot = (*slot).max(size + 8);
                }
                None => plain += size,
            }
        }
        path.pop();
        plain + oneofs.values().sum::<usize>()
    }

    /// Refuses `bytes` if, decoded as `cdp.v1.<message>`, they would cost
    /// more than [`AMPLIFICATION`] times their size plus [`SLACK`]. Messages
    /// outside `cdp.v1` pass (prost bounds their depth).
    pub fn check(&self, message: &str, bytes: &[u8]) -> Result<(), Refused> {
        let Some(&root) = self.by_name.get(message) else {
            return Ok(());
        };
        let bound = bytes
            .len()
            .saturating_mul(AMPLIFICATION)
            .saturating_add(SLACK);
        let mut walk = Walk {
            estimate: self.shapes[root].size,
            elements: HashMap::new(),
        };
        self.walk(bytes, root, 0, &mut Vec::new(), &mut walk, bound)
            .map_err(|reason| Refused::Malformed {
                message: message.to_owned(),
                reason,
            })?;
        if walk.estimate > bound {
            // The most elements; between equals, the first name.
            let (field, elements) = walk
                .elements
                .into_values()
                .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
                .unwrap_or_default();
            return Err(Refused::Amplified {
                message: message.to_owned(),
                bytes: bytes.len(),
                estimate: walk.estimate,
                bound,
                field,
                elements,
            });
        }
        Ok(())
    }

    /// Adds what `bytes`, a message of shape `shape`, cost. Stops early (with
    /// the estimate over the bound) rather than walking a huge message whole.
    fn walk<'s>(
        &'s self,
        mut bytes: &[u8],
        shape: usize,
        depth: usize,
        path: &mut Vec<&'s str>,
        walk: &mut Walk,
        bound: usize,
    ) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("nested deeper than {MAX_DEPTH} messages"));
        }
        while !bytes.is_empty() {
            if walk.estimate > bound {
                return Ok(());
            }
            let tag = varint(&mut bytes).ok_or("a field tag is truncated")?;
            let number = u32::try_from(tag >> 3).map_err(|_| "a field number is out of range")?;
            let field = self.shapes[shape].fields.get(&number);
            let counted =
                |walk: &mut Walk, name: &str| match walk.elements.get_mut(&(shape, number)) {
                    Some((_, n)) => *n += 1,
                    None => {
                        let mut key = path.join(".");
                        if !key.is_empty() {
                            key.push('.');
                        }
                        key.push_str(name);
                        walk.elements.insert((shape, number), (key, 1));
                    }
                };
            match tag & 7 {
                0 => {
                    varint(&mut bytes).ok_or("a varint is truncated")?;
                    if let Some(f) = field.filter(|f| f.repeated) {
                        walk.estimate += 8;
                        counted(walk, &f.name);
                    }
                }
                1 | 5 => {
                    let n = if tag & 7 == 1 { 8 } else { 4 };
                    if bytes.len() < n {
                        return Err("a fixed-size field is truncated".into());
                    }
                    bytes = &bytes[n..];
                    if let Some(f) = field.filter(|f| f.repeated) {
                        walk.estimate += 8;
                        counted(walk, &f.name);
                    }
                }
                2 => {
                    let len = usize::try_from(varint(&mut bytes).ok_or("a length is truncated")?)
                        .map_err(|_| "a length is out of range")?;
                    if bytes.len() < len {
                        return Err(format!(
                            "field {number} claims {len} bytes, {} remain",
                            bytes.len()
                        ));
                    }
                    let (inner, rest) = bytes.split_at(len);
                    bytes = rest;
                    match field {
                        None => {}
                        Some(f) => {
                            if f.repeated {
                                counted(walk, &f.name);
                            }
                            match f.kind {
                                Kind::Bytes => {
                                    walk.estimate += len + if f.repeated { 24 } else { 0 }
                                }
                                // Packed numbers: at most 8 bytes per wire byte.
                                Kind::Scalar => walk.estimate += len * 8,
                                Kind::Message(m) => {
                                    // A singular message lives inline in
                                    // its parent, already counted.
                                    if f.repeated {
                                        walk.estimate += self.shapes[m].size;
                                    }
                                    path.push(&f.name);
                                    let walked = self.walk(inner, m, depth + 1, path, walk, bound);
                                    path.pop();
                                    walked?;
                                }
                            }
                        }
                    }
                }
                other => return Err(format!("wire type {other} is not supported")),
            }
        }
        Ok(())
    }
}

fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{Identifier, Touchpoint, TrackBatchRequest};

    fn realistic(i: usize) -> Touchpoint {
        let props = serde_json::json!({
            "order_id": format!("O-{i}"), "revenue": 420000, "currency": "VND",
            "coupon": null, "gift": false, "express": true,
            "products": [{"sku": "A1", "qty": 2, "price": 210000}],
        });
        Touchpoint {
            event_id: uuid::Uuid::new_v4().to_string(),
            r#type: "Order Completed".into(),
            channel: "store".into(),
            source_id: "pos-q1".into(),
            personal: Some(crate::v1::PersonalData {
                identifiers: vec![
                    Identifier {
                        kind: "phone".into(),
                        value: "0903123456".into(),
                    },
                    Identifier {
                        kind: "email".into(),
                        value: format!("lan{i}@example.vn"),
                    },
                ],
                ..Default::default()
            }),
            properties: props.as_object().map(crate::convert::json_to_struct),
            ..Default::default()
        }
    }

    #[test]
    fn the_descriptors_know_the_api() {
        assert_eq!(message_name::<TrackBatchRequest>(), "TrackBatchRequest");
        assert!(Guard::get().by_name.contains_key("TrackBatchRequest"));
        assert!(Guard::get().shapes[Guard::get().by_name["Touchpoint"]].size > 100);
    }

    #[test]
    fn real_batches_pass_and_their_estimate_is_close_to_their_size() {
        let batch = TrackBatchRequest {
            touchpoints: (0..500).map(realistic).collect(),
        };
        let bytes = batch.encode_to_vec();
        assert!(Guard::get().check("TrackBatchRequest", &bytes).is_ok());
        // Booleans only: the worst honest properties.
        let flags: serde_json::Map<String, serde_json::Value> = (0..2000)
            .map(|i| (format!("f{i}"), serde_json::Value::Bool(i % 2 == 0)))
            .collect();
        let mut t = realistic(0);
        t.properties = Some(crate::convert::json_to_struct(&flags));
        let bytes = TrackBatchRequest {
            touchpoints: vec![t; 20],
        }
        .encode_to_vec();
        assert!(Guard::get().check("TrackBatchRequest", &bytes).is_ok());
    }

    /// The estimate of `bytes`, whatever the bound.
    fn estimate(message: &str, bytes: &[u8]) -> usize {
        let g = Guard::get();
        let root = g.by_name[message];
        let mut walk = Walk {
            estimate: g.shapes[root].size,
            elements: HashMap::new(),
        };
        g.walk(bytes, root, 0, &mut Vec::new(), &mut walk, usize::MAX)
            .unwrap();
        walk.estimate
    }

    #[test]
    fn the_estimate_is_of_the_order_of_the_decoded_value() {
        let realistic_batch = TrackBatchRequest {
            touchpoints: (0..500).map(realistic).collect(),
        }
        .encode_to_vec();
        let ratio = estimate("TrackBatchRequest", &realistic_batch) / realistic_batch.len();
        assert!((2..=8).contains(&ratio), "realistic events: {ratio}x");
        let empty = TrackBatchRequest {
            touchpoints: vec![Touchpoint::default(); 1000],
        }
        .encode_to_vec();
        let ratio = estimate("TrackBatchRequest", &empty) / empty.len();
        assert!(ratio > 100, "empty events: {ratio}x");
    }

    #[test]
    fn empty_elements_are_refused_before_decoding_and_the_field_is_named() {
        let bytes = TrackBatchRequest {
            touchpoints: vec![Touchpoint::default(); 200_000],
        }
        .encode_to_vec();
        assert_eq!(bytes.len(), 400_000);
        let refused = Guard::get().check("TrackBatchRequest", &bytes).unwrap_err();
        assert!(matches!(refused, Refused::Amplified { .. }), "{refused}");
        let text = refused.to_string();
        assert!(text.contains("field touchpoints holds"), "{text}");
        // Nested: one event with 100,000 empty identifiers.
        let mut t = realistic(0);
        if let Some(p) = t.personal.as_mut() {
            p.identifiers = vec![Identifier::default(); 100_000];
        }
        let bytes = TrackBatchRequest {
            touchpoints: vec![t],
        }
        .encode_to_vec();
        let text = Guard::get()
            .check("TrackBatchRequest", &bytes)
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("field touchpoints.personal.identifiers holds"),
            "{text}"
        );
    }

    #[test]
    fn broken_bytes_are_invalid_arguments_that_say_why() {
        let refused = Guard::get()
            .check("TrackBatchRequest", &[0x0a, 0x05, 0x01])
            .unwrap_err();
        assert!(matches!(refused, Refused::Malformed { .. }));
        assert_eq!(Status::from(refused).code(), tonic::Code::InvalidArgument);
        // Not UTF-8: prost says so, as an invalid argument.
        let status = decode_guarded::<Identifier>(&[0x0a, 0x02, 0xff, 0xfe][..]).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("UTF-8"), "{}", status.message());
    }
}

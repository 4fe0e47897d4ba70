//! The protobuf codec of the generated services: tonic-prost's, except that a request nested
//! past protobuf's recursion limit is refused as INVALID_ARGUMENT naming the params.
//!
//! Params are a `google.protobuf.Struct`; each level of objects inside it is three levels of
//! messages (Struct, its map entry, Value), and prost stops decoding at 100. So params nested
//! about 32 objects deep never reach the `max_params_depth` check: the decoder refuses them
//! first, which tonic answers INTERNAL with the decoder's trace. That is bad input, not a
//! server fault, so it is answered like the depth check's own refusal. Other decoding
//! failures stay INTERNAL, as gRPC's status code table says for a request that cannot be
//! parsed.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstEncoder};

use super::status::invalid;
use crate::job::FieldViolation;

/// See the module documentation. `T` is encoded, `U` decoded.
#[derive(Debug, Clone, Default)]
pub struct LongrunCodec<T, U> {
    prost: ProstCodec<T, U>,
}

impl<T, U> Codec for LongrunCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = LongrunDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.prost.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        LongrunDecoder(PhantomData)
    }
}

/// Decodes `U`, telling nesting past the recursion limit apart (see the module).
#[derive(Debug, Clone, Default)]
pub struct LongrunDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for LongrunDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(decode_error::<U>)
    }
}

/// The status for a message that does not decode. The codec decodes requests in the server
/// and responses in a client built on these types (the CLI, embedders' tests): only a
/// request's nesting is the caller's params.
fn decode_error<U>(error: prost::DecodeError) -> Status {
    let text = error.to_string();
    if text.contains("recursion limit reached") {
        if !std::any::type_name::<U>().ends_with("Request") {
            return Status::internal(format!(
                "the {} received nests too deeply to decode (protobuf stops at 100 nested \
                 messages, about 32 levels of objects)",
                short_type_name::<U>()
            ));
        }
        return invalid(vec![FieldViolation::new(
            "actions.params",
            "nests too deeply to decode (protobuf stops at about 32 levels of objects); \
             see max_params_depth",
        )]);
    }
    Status::internal(text)
}

/// `U`'s name without its module path.
fn short_type_name<U>() -> &'static str {
    let name = std::any::type_name::<U>();
    name.rsplit("::").next().unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::{Struct, Value, value::Kind};

    fn nested(levels: usize) -> Struct {
        let mut inner = Struct::default();
        for _ in 0..levels {
            inner = Struct {
                fields: [(
                    "a".to_owned(),
                    Value {
                        kind: Some(Kind::StructValue(inner)),
                    },
                )]
                .into_iter()
                .collect(),
            };
        }
        inner
    }

    fn decode_error_of(message: &Struct) -> Option<Status> {
        let encoded = message.encode_to_vec();
        Struct::decode(encoded.as_slice())
            .err()
            .map(decode_error::<crate::api::pb::SubmitRequest>)
    }

    #[test]
    fn nesting_past_the_recursion_limit_is_invalid_argument_naming_the_params() {
        assert!(decode_error_of(&nested(30)).is_none(), "decodes");
        let status = decode_error_of(&nested(40)).expect("too deep for prost");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("actions.params"), "{status:?}");
        // A response a client decodes is no fault of its request.
        let encoded = nested(40).encode_to_vec();
        let error = Struct::decode(encoded.as_slice()).unwrap_err();
        let status = decode_error::<crate::api::pb::GetStatusResponse>(error);
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(
            status
                .message()
                .starts_with("the GetStatusResponse received nests too deeply"),
            "{status:?}"
        );
    }

    #[test]
    fn other_decoding_failures_stay_internal() {
        let status = decode_error::<crate::api::pb::SubmitRequest>(
            Struct::decode(&[0xff_u8, 0xff][..]).unwrap_err(),
        );
        assert_eq!(status.code(), tonic::Code::Internal);
    }
}

//! How a [`Job`](super::Job)'s keys, values, state and outputs become bytes and back.
//!
//! A codec is a type (usually a unit struct) implementing [`Codec<T>`] for the types it can carry:
//! [`Json`] and [`Bincode`] for anything serde can, [`Utf8`] for text, [`Bytes`] for raw bytes,
//! [`DecimalI64`] for an integer written as text, and [`Skip`] for a key the job groups by without
//! reading it. Write your own for another format (protobuf, Avro, a fixed layout) by implementing the
//! trait.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::BoxError;

/// Encodes and decodes `T`. Implemented by zero-sized codec types, so a job names its codecs as types.
pub trait Codec<T>: Send + Sync + 'static {
    /// Appends the encoding of `value` to `into`.
    ///
    /// # Errors
    /// When `value` cannot be encoded in this format.
    fn encode(value: &T, into: &mut Vec<u8>) -> Result<(), BoxError>;

    /// Decodes `bytes`.
    ///
    /// # Errors
    /// When `bytes` are not an encoding of a `T`.
    fn decode(bytes: &[u8]) -> Result<T, BoxError>;
}

/// JSON (serde_json): readable by anything downstream.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl<T: Serialize + DeserializeOwned> Codec<T> for Json {
    fn encode(value: &T, into: &mut Vec<u8>) -> Result<(), BoxError> {
        serde_json::to_writer(into, value).map_err(Into::into)
    }

    fn decode(bytes: &[u8]) -> Result<T, BoxError> {
        serde_json::from_slice(bytes).map_err(Into::into)
    }
}

/// bincode (standard configuration, variable-length integers): compact, for state.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bincode;

impl<T: Serialize + DeserializeOwned> Codec<T> for Bincode {
    fn encode(value: &T, into: &mut Vec<u8>) -> Result<(), BoxError> {
        let bytes = bincode::serde::encode_to_vec(value, bincode::config::standard())?;
        into.extend_from_slice(&bytes);
        Ok(())
    }

    fn decode(bytes: &[u8]) -> Result<T, BoxError> {
        let (value, read) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())?;
        if read != bytes.len() {
            return Err(format!("{} bytes left over after the value", bytes.len() - read).into());
        }
        Ok(value)
    }
}

/// UTF-8 text as a `String`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Utf8;

impl Codec<String> for Utf8 {
    fn encode(value: &String, into: &mut Vec<u8>) -> Result<(), BoxError> {
        into.extend_from_slice(value.as_bytes());
        Ok(())
    }

    fn decode(bytes: &[u8]) -> Result<String, BoxError> {
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| "not UTF-8".into())
    }
}

/// The bytes as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bytes;

impl Codec<Vec<u8>> for Bytes {
    fn encode(value: &Vec<u8>, into: &mut Vec<u8>) -> Result<(), BoxError> {
        into.extend_from_slice(value);
        Ok(())
    }

    fn decode(bytes: &[u8]) -> Result<Vec<u8>, BoxError> {
        Ok(bytes.to_vec())
    }
}

/// A decimal `i64` written as UTF-8 text (surrounding whitespace allowed): the built-in job's amounts.
#[derive(Debug, Clone, Copy, Default)]
pub struct DecimalI64;

impl Codec<i64> for DecimalI64 {
    fn encode(value: &i64, into: &mut Vec<u8>) -> Result<(), BoxError> {
        into.extend_from_slice(value.to_string().as_bytes());
        Ok(())
    }

    fn decode(bytes: &[u8]) -> Result<i64, BoxError> {
        let text = std::str::from_utf8(bytes).map_err(|_| "value is not UTF-8")?;
        text.trim()
            .parse::<i64>()
            .map_err(|err| format!("`{}` is not a decimal i64: {err}", text.escape_debug()).into())
    }
}

/// A key the job groups by but never reads: nothing is decoded (no cost per record). State and outputs
/// of the record's own key still work ([`Context::state`](super::Context::state),
/// [`Context::emit`](super::Context::emit)); naming another key does not (it cannot be encoded).
#[derive(Debug, Clone, Copy, Default)]
pub struct Skip;

impl Codec<()> for Skip {
    fn encode(_: &(), _: &mut Vec<u8>) -> Result<(), BoxError> {
        Err(
            "a skipped key cannot be encoded: name keys with a codec that can (Utf8, Bytes, Json)"
                .into(),
        )
    }

    fn decode(_: &[u8]) -> Result<(), BoxError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<C: Codec<T>, T: PartialEq + std::fmt::Debug>(value: T) {
        let mut bytes = Vec::new();
        C::encode(&value, &mut bytes).unwrap();
        assert_eq!(C::decode(&bytes).unwrap(), value);
    }

    #[test]
    fn codecs_round_trip_and_refuse_what_they_cannot_read() {
        round_trip::<Json, _>(vec![("a".to_owned(), 1u32)]);
        round_trip::<Bincode, _>((7u64, "x".to_owned()));
        round_trip::<Utf8, _>("héllo".to_owned());
        round_trip::<Bytes, _>(vec![0u8, 255]);
        round_trip::<DecimalI64, _>(-42);
        assert_eq!(DecimalI64::decode(b" 12\n").unwrap(), 12);
        assert!(DecimalI64::decode(b"12x").is_err());
        assert!(<Utf8 as Codec<String>>::decode(&[0xff]).is_err());
        assert!(<Json as Codec<u32>>::decode(b"{").is_err());
        assert!(
            <Bincode as Codec<u8>>::decode(&[1, 2]).is_err(),
            "trailing bytes"
        );
        assert!(Skip::encode(&(), &mut Vec::new()).is_err());
    }
}

//! The protobuf codec of every RPC, with small initial buffers.
//!
//! tonic allocates an encode buffer and a decode buffer of `buffer_size` for every RPC as it
//! starts (8 KiB each by default) and keeps them for the RPC's life. kas holds two long-lived
//! RPCs per connected agent (an idle tunnel stream and the configuration stream), so the
//! default costs ~24 KiB per agent before a single byte moves. Buffers start at 1 KiB here
//! and grow to the message size when data flows (a 64 KiB tunnel frame reserves its size in
//! one step either way), so throughput is unchanged.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial (and growth step of the) per-RPC buffers.
pub const BUFFER_SIZE: usize = 1024;
/// tonic's default: how much an encoder buffers before yielding to the runtime.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// A [`ProstCodec`] with [`BUFFER_SIZE`] buffers; generated clients and servers use it.
#[derive(Debug, Clone, Copy)]
pub struct LeanCodec<T, U>(PhantomData<fn(T) -> U>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}

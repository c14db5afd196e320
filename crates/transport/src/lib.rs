//! How agentk reaches kas: gRPC over HTTP/2 (`grpc://`, `grpcs://`) or the same HTTP/2 carried
//! inside a WebSocket (`ws://`, `wss://`) for networks that only pass HTTP/1.1, with TLS.
